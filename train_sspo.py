"""
Align a text-to-image diffusion model (a Stable Diffusion UNet, or the tiny world's pixel-space one) with SSPO,
Self-Sampling Preference Optimization (arXiv 2410.05255), or its baselines: SFT, Diffusion-DPO, SPIN-Diffusion (an
SSPO setting) and the other objectives of the literature below.

    python train_sspo.py configs/tiny_base.py                     # one process, CPU or one GPU
    torchrun --nproc_per_node=8 train_sspo.py configs/sd15.py      # DDP (nccl on GPU, gloo on CPU)
    python train_sspo.py configs/tiny_base.py --max_steps=50 --out_dir=out/try   # --key=value overrides

Importing this file runs nothing: the config reader and the loop's helpers are importable for tests and forks; the
objectives themselves are losses.py.
"""
import ast
import copy
import datetime
import json
import difflib
import math
import os
import re
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import durable
import latents
import losses
import model
import replay

# -----------------------------------------------------------------------------------------------------------------
# defaults: every tunable, one per line. A file in configs/ restates only what differs; --key=value beats both.
# I/O
out_dir = "out/run"             # run directory: ckpt.pt, log.txt, samples/, and an SD-layout model folder
init_from = "scratch"           # 'scratch' (random tiny model) | 'resume' (out_dir/ckpt.pt) | SD-layout folder or hub id
auto_resume = False             # resume from out_dir's newest checkpoint if it has one, else start as init_from says;
                                # workers that torchrun --max-restarts restarts always do
keep_checkpoints = 2            # ckpt_STEP.pt files kept (the newest is also ckpt.pt, a hard link); older ones, and pool
                                # snapshots only they name, are deleted once a newer checkpoint is complete
eval_every = 200                # optimizer steps between evals (loss, judge, sample grid); the last step always evals
save_every = 200                # optimizer steps between checkpoints; the last step always saves
log_every = 10                  # optimizer steps between log lines: the logged update's stats (mean over its
                                # micro-batches and ranks), and s/step over the stretch (evals and saves included)
# data
dataset = "tiny"                # 'tiny' (synthetic world, data.py) | 'pickapic' (parquet shards) | 'imagefolder'
data_path = ""                  # parquet file or folder (pickapic); folder with metadata.jsonl (imagefolder)
tiny_mode = "base"              # 'base': draws of the flawed base distribution | 'pairs': judge-ranked pairs
tiny_size = 50_000              # examples in the tiny world's training set (each a pure function of seed and index)
tiny_p_correct = 0.4            # share of flawless images in the base distribution
tiny_flaws = ("colour", "position", "shape", "blur")  # what the other draws get wrong, one each (data.ALL_FLAWS)
resolution = 16                 # training image side in pixels (512 for SD1.5)
random_flip = False             # horizontal flips as the peers do for real data; never the tiny world (left/right)
random_crop = False             # random instead of center crop after resizing the short side
caption_dropout = 0.1           # probability of the empty prompt: keeps an unconditional model for guidance
num_workers = 0                 # DataLoader worker processes per rank
latent_cache = ""               # folder of precomputed VAE latents of the data (python latents.py CONFIG builds it):
                                # no image is decoded or encoded while training | "": encode every image every step
bad_data = "skip"               # real data that cannot be read (corrupt or truncated image, missing bytes): 'skip' =
                                # replaced by the next readable example, counted | 'stop' naming its file and row
# model (init_from='scratch' only: the tiny world's model; an SD model brings its own architecture)
unet_channels = (32, 64)        # block_out_channels; attention at every level but the first
text_dim = 32                   # width of the tiny CLIP text encoder
train_text_encoder = False      # also train the text encoder: for pretraining from scratch, where a random frozen one
                                # is a weak condition (SD1.5 and all alignment runs keep it frozen)
noise_schedule = "scaled_linear"  # SD1.5's betas (0.00085-0.012) | 'squaredcos_cap_v2' | 'linear' (DDPM's)
prediction_type = "epsilon"     # what the UNet predicts: 'epsilon' (SD1.5) | 'v_prediction' (needed by zero_snr)
zero_snr = False                # betas rescaled to a zero terminal SNR, sampling from t = T - 1 (Lin et al. 2023)
# method (the objectives are losses.py)
method = "sft"                  # 'sft': eps-MSE on image_w (also base pretraining) | 'dpo': pairs, frozen base as
                                # reference | 'sspo': winners only, losers sampled by a replayed snapshot
                                # | on pairs, frozen base as reference: 'dmpo' (reverse KL) | 'kto' (unpaired
                                # utility) | 'see_dpo' (self-entropy) | 'dpo_cm' (timestep mask) | and 'mapo'
                                # (pairs, no reference). README's table: the paper of each, and what is reconstructed
beta = 5000.0                   # inverse temperature in the 1/2 convention (SSPO.md 2). SD1.5: dpo/sspo/see_dpo/dpo_cm
                                # 5000, dmpo 2000, kto 1000 (no 1/2 in its logit); mapo: weight of its margin term
dmpo_alpha = 0.01               # DMPO: target probability 1 - alpha of the winner (Diffusion-SDPO's SD1.5 script)
mapo_snr = 0.5                  # MaPO: s in g(x) = s x / (exp(s x) - 1) (its reference code's snr_value)
see_gamma = 500.0               # SEE-DPO: weight of the self-entropy bonus, same units as beta (our choice: beta / 10)
cm_t_range = (100, 900)         # DPO-C&M: samples with t outside [lo, hi) are masked out (our choice; see losses.dpo_cm_loss)
sdpo_safeguard = False          # Diffusion-SDPO: scale the loser branch's gradient so the winner's error does not rise
                                # to first order (dpo, sspo, dmpo)
sdpo_mu = 0.9                   # its safety margin mu in [0, 1] (Diffusion-SDPO's SD1.5 scripts: 0.9)
noising = "forward"             # x_t: 'forward' (random eps, DDPM) | 'ddim_inversion' (Inversion-DPO: deterministic
                                # DDIM inversion of each image by the reference; costs inversion_steps forwards/image)
inversion_steps = 20            # DDIM steps from x0 to t (Inversion-DPO's code: 40)
inversion_guidance = 1.0        # guidance during inversion (Inversion-DPO's SDXL code: 2.0; 1.0 inverts most exactly)
ssr = "sign"                    # SSPO's Self-Sampling Regularization: 'sign' (v1) | 'indicator' (v2) | 'off'
ref_policy = "uniform"          # SSPO reference draw: 'uniform' over all snapshots (RCR) | 'first' | 'last' (SPIN)
ref_redraw = "stretch"          # new reference every ckpt_every updates ('stretch'; not stated in the paper) | 'step'
ckpt_every = 30                 # updates between snapshots pushed into the reference pool (paper: 30)
pool_capacity = 0               # snapshots kept: 0 = all (paper); else theta_0 + a reservoir sample (replay.py)
pool_storage = "memory"         # 'memory' (CPU RAM) | 'disk' (out_dir/pool/*.safetensors)
ref_dtype = "float32"           # the reference UNet and the snapshots: 'float32' | 'bfloat16' (fine for SD1.5)
self_sample_steps = 20          # DDIM steps of SSPO's self-sampling (not stated in the paper; our choice)
self_sample_guidance = 3.0      # its guidance (the paper's eval pipeline uses 7.5 on SD1.5; not stated for training)
self_sample_eta = 0.0           # its DDIM eta
base_config = ""                # a config that trains init_from first if that folder is missing (tiny quick start)
# optimizer
batch_size = 64                 # per process per micro-step; effective batch = batch_size x grad_accum x processes
grad_accum = 1                  # micro-steps per optimizer update
max_steps = 1000                # optimizer updates
lr = 5e-4                       # peak learning rate (AdamW)
lr_schedule = "cosine"          # 'constant' (Diffusion-DPO) | 'cosine' (to 10% of lr at max_steps), after warmup
warmup_steps = 50               # linear warmup from 0
weight_decay = 1e-2
adam_beta1 = 0.9
adam_beta2 = 0.999
grad_clip = 1.0                 # max global grad norm; 0 disables
grad_checkpointing = False      # trade compute for UNet activation memory (SD1.5 at batch > 1 per GPU)
nonfinite = "skip"              # a NaN/inf loss or gradient: 'skip' the update (counted, logged; all ranks agree) |
                                # 'stop' naming the step and the batch's prompts
text_cache = 4096               # distinct prompts whose frozen text-encoder output is kept (0: encode every micro-step)
channels_last = False           # UNets in channels_last memory format (python bench.py measures it; off: as published)
compile_unet = False            # torch.compile the policy and reference UNets in place (compiles first; each new
                                # input shape recompiles). Off: the published results were trained without it
ema_decay = 0.0                 # >0: evaluate and save an exponential moving average of the weights (pretraining);
                                # 0 for alignment, as Diffusion-DPO and SSPO train without one
# sampling (eval grids; the shared DDIM sampler)
sample_steps = 20               # DDIM steps
guidance = 3.0                  # classifier-free guidance scale (SD1.5: 7.5); 1.0 = no guidance, one forward
eta = 0.0                       # DDIM noise: 0 deterministic, 1 DDPM-like
n_eval_images = 8               # images in the sample grid for real data (the tiny world draws all its 48 prompts)
# system
device = "auto"                 # 'auto' (cuda if available) | 'cpu' | 'cuda'
mixed_precision = "bf16"        # 'bf16' autocast on CUDA with fp32 master weights | 'no'. CPU always runs fp32
seed = 0                        # model init, data order, noise: a run is a pure function of its config
ddp_timeout = 1800              # seconds a collective waits for a rank that is gone before the run stops (gloo sees a
                                # dead peer's closed socket at once; NCCL waits this long)
# -----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (bool, int, float, str, tuple)}
PAIR_METHODS = ("dpo", "dmpo", "kto", "mapo", "see_dpo", "dpo_cm")  # read image_l from the data
REF_METHODS = ("dpo", "sspo", "dmpo", "kto", "see_dpo", "dpo_cm")    # compare with a frozen reference UNet
CHOICES = {"dataset": ("tiny", "pickapic", "imagefolder"), "tiny_mode": ("base", "pairs"),
           "method": ("sft", "dpo", "sspo", "dmpo", "kto", "mapo", "see_dpo", "dpo_cm"),
           "noising": ("forward", "ddim_inversion"), "ssr": ("sign", "indicator", "off"), "ref_policy": replay.DRAWS,
           "ref_redraw": ("stretch", "step"), "pool_storage": ("memory", "disk"), "ref_dtype": ("float32", "bfloat16"),
           "lr_schedule": ("constant", "cosine"),
           "bad_data": ("skip", "stop"), "nonfinite": ("skip", "stop"),
           "noise_schedule": ("scaled_linear", "squaredcos_cap_v2", "linear"),
           "prediction_type": ("epsilon", "v_prediction"), "device": ("auto", "cpu", "cuda"), "mixed_precision": ("bf16", "no")}


def get_config(argv):
    """nanoGPT-style: config files (Python, executed) then --key=value; strict about names, types and choices."""
    cfg = dict(DEFAULTS)

    def put(key, val, where):
        if key not in cfg:
            near = difflib.get_close_matches(key, cfg, n=1)
            raise SystemExit(f"config error: unknown key {key!r} in {where}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        want = type(DEFAULTS[key])
        if want is float and type(val) is int:
            val = float(val)
        if type(val) is not want:
            raise SystemExit(f"config error: {key} in {where} must be {want.__name__} like {DEFAULTS[key]!r}, "
                             f"got {type(val).__name__} {val!r}")
        cfg[key] = val

    if "-h" in argv or "--help" in argv:  # the running script's usage, then every key with its default
        print((sys.modules["__main__"].__doc__ or "").strip() + "\n\nkeys and defaults (what each does: the comment "
              "beside it at the top of train_sspo.py):\n" + "\n".join(f"  --{k}={v!r}" for k, v in DEFAULTS.items()))
        raise SystemExit(0)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"config error: {arg!r} must be --key=value"
                                 + (" (to resume a run: --init_from=resume)" if key == "resume" else ""))
            if type(DEFAULTS.get(key)) is str and not text.startswith(("'", '"')):
                val = text  # a string key takes the text as it is: --out_dir=2025 is the folder '2025'
            else:
                try:
                    val = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    val = text  # a bare string
            put(key, val, arg)
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"config error: config file {arg!r} not found")
            scope = {}
            try:
                exec(compile(open(arg).read(), arg, "exec"), scope)
            except Exception as e:
                raise SystemExit(f"config error: {arg} does not run: {type(e).__name__}: {e}")
            for key, val in scope.items():  # every public name but imported modules, functions and classes
                if not key.startswith("_") and not isinstance(val, (type(os), type(put), type)):
                    put(key, val, arg)
    for key, options in CHOICES.items():
        if cfg[key] not in options:
            raise SystemExit(f"config error: {key}={cfg[key]!r} is not one of {', '.join(map(repr, options))}")
    if cfg["zero_snr"] and cfg["prediction_type"] != "v_prediction":
        raise SystemExit("config error: zero_snr=True needs prediction_type='v_prediction' (at a zero terminal SNR "
                         "the noise cannot be told from x_t = eps)")
    if cfg["train_text_encoder"] and cfg["method"] != "sft":
        raise SystemExit("config error: train_text_encoder is for SFT pretraining; alignment keeps the encoder frozen")
    if cfg["latent_cache"]:
        latents.check_config(cfg)
    if cfg["text_cache"] < 0:
        raise SystemExit(f"config error: text_cache must be >= 0 (0: no cache), got {cfg['text_cache']}")
    if cfg["pool_capacity"] < 0 or cfg["pool_capacity"] == 1:
        raise SystemExit(f"config error: pool_capacity must be 0 (keep all) or >= 2, got {cfg['pool_capacity']}")
    bad = [f for f in cfg["tiny_flaws"] if f not in data.ALL_FLAWS]
    if bad:
        raise SystemExit(f"config error: tiny_flaws has {bad}; known flaws: {', '.join(data.ALL_FLAWS)}")
    if cfg["sdpo_safeguard"] and cfg["method"] not in ("dpo", "sspo", "dmpo"):
        raise SystemExit(f"config error: sdpo_safeguard is for method 'dpo', 'sspo' or 'dmpo', not {cfg['method']!r}")
    if cfg["noising"] != "forward" and cfg["method"] == "sft":
        raise SystemExit("config error: noising='ddim_inversion' is for the preference methods, not sft")
    if not 0 <= cfg["sdpo_mu"] <= 1:
        raise SystemExit(f"config error: sdpo_mu must be in [0, 1], got {cfg['sdpo_mu']}")
    if not 0 < cfg["dmpo_alpha"] < 1:
        raise SystemExit(f"config error: dmpo_alpha must be in (0, 1), got {cfg['dmpo_alpha']}")
    if cfg["mapo_snr"] <= 0 or cfg["see_gamma"] < 0:
        raise SystemExit("config error: mapo_snr must be > 0 and see_gamma >= 0")
    lo_hi = cfg["cm_t_range"]
    if len(lo_hi) != 2 or not all(type(v) is int for v in lo_hi) or not 0 <= lo_hi[0] < lo_hi[1]:
        raise SystemExit(f"config error: cm_t_range must be two ints (lo, hi) with 0 <= lo < hi, got {lo_hi}")
    if cfg["dataset"] == "tiny" and cfg["data_path"]:
        raise SystemExit(f"config error: data_path={cfg['data_path']!r} is set but dataset='tiny' draws its own images "
                         "(dataset='pickapic' or 'imagefolder' to read it)")
    if not cfg["out_dir"]:
        raise SystemExit("config error: out_dir is empty (the run directory, like 'out/run')")
    if cfg["base_config"] and not os.path.isfile(cfg["base_config"]):
        raise SystemExit(f"config error: base_config {cfg['base_config']!r} not found")
    if cfg["dataset"] != "tiny" and not cfg["data_path"]:
        raise SystemExit(f"config error: dataset={cfg['dataset']!r} needs data_path")
    if cfg["dataset"] != "tiny" and not os.path.exists(cfg["data_path"]):
        raise SystemExit(f"config error: data_path {cfg['data_path']!r} does not exist")
    for key in ("batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every", "sample_steps",
                "ckpt_every", "self_sample_steps", "inversion_steps", "keep_checkpoints", "ddp_timeout", "resolution",
                "n_eval_images"):
        if cfg[key] < 1:
            raise SystemExit(f"config error: {key} must be >= 1, got {cfg[key]}")
    channels = cfg["unet_channels"]
    for key, ok, want in (  # values of the right type that would train something else than asked, silently
            ("beta", cfg["beta"] > 0, "> 0 (a negative beta prefers the losers)"),
            ("lr", cfg["lr"] > 0, "> 0"),
            ("grad_clip", cfg["grad_clip"] >= 0, ">= 0 (0: no clipping)"),
            ("weight_decay", cfg["weight_decay"] >= 0, ">= 0"),
            ("warmup_steps", cfg["warmup_steps"] >= 0, ">= 0"),
            ("num_workers", cfg["num_workers"] >= 0, ">= 0 (0: load in the training process)"),
            ("text_dim", cfg["text_dim"] > 0 and cfg["text_dim"] % 4 == 0, "a positive multiple of 4 (the tiny CLIP's heads)"),
            ("guidance", cfg["guidance"] >= 0, ">= 0 (1.0: no guidance)"),
            ("self_sample_guidance", cfg["self_sample_guidance"] >= 0, ">= 0 (1.0: no guidance)"),
            ("inversion_guidance", cfg["inversion_guidance"] >= 0, ">= 0 (1.0: no guidance)"),
            ("seed", cfg["seed"] >= 0, ">= 0 (numpy's generators take no negative seeds)"),
            ("tiny_p_correct", 0 <= cfg["tiny_p_correct"] <= 1, "in [0, 1]"),
            ("ema_decay", 0 <= cfg["ema_decay"] < 1, "in [0, 1) (0: no EMA)"),
            ("caption_dropout", 0 <= cfg["caption_dropout"] <= 1, "in [0, 1]"),
            ("eta", 0 <= cfg["eta"] <= 1, "in [0, 1]"),
            ("self_sample_eta", 0 <= cfg["self_sample_eta"] <= 1, "in [0, 1]"),
            ("adam_beta1", 0 <= cfg["adam_beta1"] < 1, "in [0, 1)"),
            ("adam_beta2", 0 <= cfg["adam_beta2"] < 1, "in [0, 1)"),
            ("unet_channels", len(channels) >= 2 and all(type(c) is int and c > 0 and c % 8 == 0 for c in channels),
             "two or more positive multiples of 8 (the GroupNorm's 8 groups), like (32, 64)")):
        if not ok:
            raise SystemExit(f"config error: {key} must be {want}, got {cfg[key]!r}")
    return cfg


# -----------------------------------------------------------------------------------------------------------------
# setup and teardown; logging

def setup(cfg):
    """-> (rank, world, device). DDP when torchrun set the environment, else one process."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    want_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("config error: device='cuda' but no CUDA device is visible")
    if ddp:
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(seconds=cfg["ddp_timeout"]))
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local = 0, 1, 0
    if want_cuda:
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, torch.device(f"cuda:{local}" if want_cuda else "cpu")


def teardown():
    if dist.is_initialized():
        dist.barrier()  # the rank hosting the store (rank 0 when torchrun does not share its own) leaves last
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_mean(values, device):
    """Average a dict of floats over ranks, so the printed numbers are the global batch's."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def together(run_here, fn, *args):
    """fn(*args) where run_here (rank 0's file writes), then one collective: an OSError on any rank (disk full, no
    permission: one line naming the file) stops every rank with that line, rather than leaving the others waiting
    for a rank that is gone. Also a barrier: nobody reads a file before it is complete. Returns fn's result."""
    err = out = None
    try:
        if run_here:
            out = fn(*args)
    except OSError as e:
        err = f"error: {e} (stopped; what was saved before is intact)"
    errs = [err]
    if dist.is_initialized():
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
    if any(errs):
        raise SystemExit(next(e for e in errs if e))
    return out


_log_file = None


def print0(*args):
    """Print on rank 0 only (above the progress bar) and append to out_dir/log.txt."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    msg = " ".join(str(a) for a in args)
    tqdm.write(msg)
    if _log_file is not None:
        _log_file.write(msg + "\n")
        _log_file.flush()


def log_json(record):
    """Rank 0 appends one JSON line to out_dir/log.jsonl: the numbers of log.txt, for plots and scripts."""
    if _log_file is not None:
        with open(os.path.join(os.path.dirname(_log_file.name), "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------------------------------------------
# data, randomness, learning rate

def make_dataset(cfg, stream=0):
    """The config's dataset. stream 1 (fine-tuning): the tiny world draws other examples than pretraining's (0)."""
    if cfg["dataset"] == "tiny":
        return data.TinyWorld(cfg["tiny_mode"], cfg["tiny_size"], cfg["resolution"], cfg["tiny_p_correct"], cfg["seed"],
                              flaws=cfg["tiny_flaws"], stream=stream)
    if cfg["latent_cache"]:
        ds = latents.CachedLatents(cfg["latent_cache"], cfg["seed"], cfg["random_flip"])
        ds.check_config(cfg)
        return ds
    cls = data.PickAPic if cfg["dataset"] == "pickapic" else data.ImageFolder
    return data.SkipBad(cls(cfg["data_path"], cfg["resolution"], cfg["random_crop"], cfg["random_flip"], cfg["seed"],
                            losers=cfg["method"] in PAIR_METHODS))  # SFT and SSPO never decode the losers


DATA_TALLIES = ("skipped", "converted", "upscaled", "empty_caption", "long_caption")


def tally_data(counts, batch, tokenizer, bad_data):
    """Count, per micro-batch, what the data needed: examples skipped as unreadable and images converted or
    upscaled (data.SkipBad), empty captions (trained as the unconditional prompt) and captions longer than the
    tokenizer's 77 tokens (encode_prompts truncates them). bad_data='stop' stops at the first unreadable example."""
    for err in batch.get("error", ()):
        if err and bad_data == "stop":
            raise SystemExit(f"error: {err} (bad_data='stop'; 'skip' replaces such examples)")
        if err:  # every rank's (log.txt gets rank 0's; the epoch's counts sum all ranks)
            rank = dist.get_rank() if dist.is_initialized() else 0
            msg = (f"rank {rank}: " if dist.is_initialized() else "") + f"skipped unreadable data: {err}"
            if rank == 0:
                print0(msg)
            else:
                tqdm.write(msg)
    for k in ("skipped", "converted", "upscaled"):
        counts[k] += int(batch[k].sum()) if k in batch else 0
    counts["empty_caption"] += sum(not p.strip() for p in batch["prompt"])
    counts["long_caption"] += sum(len(ids) > tokenizer.model_max_length for ids in tokenizer(list(batch["prompt"])).input_ids)


def report_data(tallies, epoch, device, partial=False):
    """One line per epoch (summed over ranks), then the counts start again."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    c = {k: v * world for k, v in all_mean(tallies["data"], device).items()}
    print0(f"data of epoch {epoch}{' so far' if partial else ''}: " + ", ".join(f"{k} {v:.0f}" for k, v in c.items()))
    tallies["data"] = dict.fromkeys(DATA_TALLIES, 0)


def stream_of(cfg, ckpt=None):
    """Which random stream a run draws from: 0 for pretraining (a run from scratch), 1 for fine-tuning. A fine-tune
    with the pretraining's seed must not replay its data order, noise and examples (it would re-train on exactly
    what the base saw first). A resumed run keeps the stream of the run it resumes."""
    return int((ckpt["config"] if ckpt else cfg)["init_from"] != "scratch")


def micro_batches(ds, cfg, rank, world, epoch, start, stream=0):
    """Yield (batch, (epoch, index of the next micro-batch)) forever, from micro-batch `start` of `epoch` on.
    DistributedSampler deals rank r the positions r, r + world, ... of one seeded permutation per epoch, so the
    global micro-batch is the same set of examples for any number of processes at a fixed global batch."""
    seed = cfg["seed"] if stream == 0 else int(np.random.SeedSequence([cfg["seed"], stream]).generate_state(1)[0])
    while True:
        sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        order = list(sampler)[start * cfg["batch_size"]:]  # fast-forward on resume: no batch is loaded twice
        loader = DataLoader(ds, cfg["batch_size"], sampler=order, num_workers=cfg["num_workers"], drop_last=True)
        for i, batch in enumerate(loader, start + 1):
            yield batch, (epoch, i)
        epoch, start = epoch + 1, 0


def step_randomness(cfg, step, micro, rank, world, shape, num_timesteps, stream=0):
    """Noise, timesteps, caption-dropout draws, the self-sampler's x_T, the VAE's latent noise (winner, loser) and
    the self-sampler's per-step noise (K, B, ...; None unless SSPO samples with self_sample_eta > 0) of one
    micro-step, a pure function of (seed, step, micro, stream).
    Drawn for the whole global micro-batch and dealt like DistributedSampler deals examples (rank r takes rows
    r, r + world, ...): each example gets the same draws whatever the number of processes, and resume is exact."""
    # SeedSequence pads its entropy with zeros to 4 words: stream 0 is [seed, step, micro] as before streams existed
    key = np.random.SeedSequence([cfg["seed"], step, micro, stream]).generate_state(1)[0]
    g = torch.Generator().manual_seed(int(key))
    n = world * shape[0]
    eps = torch.randn((n, *shape[1:]), generator=g)[rank::world]
    t = torch.randint(0, num_timesteps, (n,), generator=g)[rank::world]
    drop = (torch.rand(n, generator=g) < cfg["caption_dropout"])[rank::world]
    x_T = torch.randn((n, *shape[1:]), generator=g)[rank::world]
    vae_noise = torch.randn((2, n, *shape[1:]), generator=g)[:, rank::world]
    eta_noise = None
    if cfg["method"] == "sspo" and cfg["self_sample_eta"] > 0:  # drawn last: the draws above do not depend on it
        eta_noise = torch.randn((cfg["self_sample_steps"], n, *shape[1:]), generator=g)[:, rank::world]
    return eps, t, drop, x_T, vae_noise, eta_noise


def to_latents(vae, batch, which, device, noise=None, generator=None):
    """A batch's winners (which='w') or losers ('l') in diffusion space: its images VAE-encoded, or the moments
    that latents.py stored for them, drawn with the same noise."""
    if f"latent_{which}" in batch:
        return model.sample_latents(vae, batch[f"latent_{which}"].to(device), noise, generator)
    return model.images_to_latents(vae, batch[f"image_{which}"].to(device), noise, generator)


def lr_at(step, cfg):
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    if cfg["lr_schedule"] == "constant":
        return cfg["lr"]
    p = (step - cfg["warmup_steps"]) / max(1, cfg["max_steps"] - cfg["warmup_steps"])
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# -----------------------------------------------------------------------------------------------------------------
# evaluation and checkpoints

def eval_prompts(cfg, ds):
    """The tiny world: all 48 prompts, seen ones first. Real data: the first n_eval_images prompts of the data."""
    if cfg["dataset"] == "tiny":
        return [data.prompt_of(c) for c in data.TRAIN_COMBOS + data.HELD_OUT]
    return [ds[i]["prompt"] for i in range(min(cfg["n_eval_images"], len(ds)))]


@torch.no_grad()
def run_eval(m, unet, cfg, ds, device, autocast):
    """Denoising loss on the data's first examples (fixed noise and timesteps), samples for the eval prompts from fixed
    noise (the same every eval, so grids are comparable), and for the tiny world the judge's mean score.
    The loss is over one global micro-batch of examples, run a process's batch_size at a time with its draws made
    for all of them first: the same numbers for any number of processes at the same global batch. The samples' noise
    has a generator of its own, so the images and the judge do not depend on the batch size either."""
    unet.eval()
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    n, B = min(cfg["batch_size"] * (dist.get_world_size() if dist.is_initialized() else 1), len(ds)), cfg["batch_size"]
    shape = model.latent_shape(m, cfg["resolution"])
    vae_noise = torch.randn((n, *shape), generator=g) if m["vae"] is not None else None  # as to_latents draws it
    eps = torch.randn((n, *shape), generator=g)
    t = torch.randint(0, m["scheduler"].config.num_train_timesteps, (n,), generator=g)
    errs = []
    for i in range(0, n, B):
        batch = torch.utils.data.default_collate([ds[j] for j in range(i, min(i + B, n))])
        x0 = to_latents(m["vae"], batch, "w", device, None if vae_noise is None else vae_noise[i:i + B])
        ctx = model.encode_prompts(m["tokenizer"], m["text_encoder"], batch["prompt"])
        with autocast:
            errs.append(model.denoising_error(unet, m["scheduler"], x0, eps[i:i + B].to(device),
                                              t[i:i + B].to(device), ctx))
    loss = torch.cat(errs).mean().item()
    prompts = eval_prompts(cfg, ds)
    cond = model.encode_prompts(m["tokenizer"], m["text_encoder"], prompts)
    uncond = model.encode_prompts(m["tokenizer"], m["text_encoder"], [""])
    gs = torch.Generator().manual_seed(cfg["seed"] + 2)
    noise = torch.randn((len(prompts), *shape), generator=gs).to(device)
    step_noise = torch.randn((cfg["sample_steps"], *noise.shape), generator=gs).to(device) if cfg["eta"] > 0 else None
    with autocast:
        x = model.ddim_sample(unet, m["scheduler"], cond, uncond, noise, cfg["sample_steps"], cfg["guidance"], cfg["eta"],
                              step_noise)
    images = model.latents_to_images(m["vae"], x).cpu()
    out = {"eval_loss": loss}
    labels = None
    if cfg["dataset"] == "tiny":
        scores = [data.judge(img, p)[0] for img, p in zip(images, prompts)]
        n_seen = len(data.TRAIN_COMBOS)
        out["judge_seen"], out["judge_heldout"] = float(np.mean(scores[:n_seen])), float(np.mean(scores[n_seen:]))
        labels = [f"{s:.2f}" for s in scores]
    unet.train()
    return out, images, prompts, labels


def checkpoints(out):
    """[(step, path)] of the step-named checkpoints in out_dir, oldest first. Each is complete: durable.py only
    ever gives a file its final name whole."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted((int(m[1]), os.path.join(out, m[0])) for m in map(re.compile(r"ckpt_(\d+)\.pt").fullmatch, names) if m)


def latest_checkpoint(out):
    """The newest complete checkpoint: the highest ckpt_STEP.pt (after a kill ckpt.pt may still name the one before
    it), else ckpt.pt (a run saved before keep_checkpoints existed), else None."""
    found = checkpoints(out)
    legacy = os.path.join(out, "ckpt.pt")
    return found[-1][1] if found else legacy if os.path.isfile(legacy) else None


def read_checkpoint(path, mmap=False):
    """torch.load of a checkpoint; one that is damaged (durable.py writes whole files, so something else changed or
    truncated it) is an error naming it and the older checkpoint to resume from instead."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:  # a truncated zip, a file that is not one
        named = [p for _, p in checkpoints(os.path.dirname(path))]
        older = named[:named.index(path)] if path in named else []
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:100]})" + (f"; the one before it is {older[-1]}: move "
                         f"{os.path.basename(path)} away to resume from that" if older else ""))


def save_checkpoint(cfg, unet, ema, text_encoder, opt, step, data_pos, pool, tallies, world):
    """unet/ (text_encoder/): the weights for StableDiffusionPipeline (the EMA if there is one); then
    ckpt_STEP.pt: everything to resume exactly, also named ckpt.pt; then the checkpoints beyond keep_checkpoints go,
    with the pool snapshots only they named. Every file is written whole or not at all (durable.py) and nothing is
    deleted before the new checkpoint is complete, so a kill at any moment leaves the newest complete checkpoint
    loadable. unet/ first: wherever a checkpoint exists, a unet/ to load it into exists too."""
    out = cfg["out_dir"]
    trained = {"unet": ema or unet, **({"text_encoder": text_encoder} if cfg["train_text_encoder"] else {})}
    for name, module in trained.items():
        durable.write_folder(os.path.join(out, name), module.save_pretrained, point=name)
    ckpt = {"unet": unet.state_dict(), "ema": ema.state_dict() if ema else None,
            "text_encoder": text_encoder.state_dict() if cfg["train_text_encoder"] else None, "optimizer": opt.state_dict(),
            "step": step, "data_pos": data_pos, "tallies": tallies, "world": world,
            "rng": torch.get_rng_state(), "config": cfg, "pool": pool.state_dict() if pool else None}
    path = os.path.join(out, f"ckpt_{step:08d}.pt")
    durable.write_file(path, lambda f: torch.save(ckpt, f), point="ckpt")
    durable.fault("ckpt:renamed")
    durable.link(path, os.path.join(out, "ckpt.pt"))
    durable.fault("ckpt:linked")
    drop_old_checkpoints(cfg, pool)


def drop_old_checkpoints(cfg, pool):
    """Keep the newest keep_checkpoints checkpoints, and the disk pool's snapshot files that they name."""
    kept = checkpoints(cfg["out_dir"])
    for _, old in kept[:-cfg["keep_checkpoints"]]:
        os.remove(old)
    if pool is not None and pool.storage == "disk":  # the pool holds the newest's; the others' are read, mmapped
        older = [read_checkpoint(p, mmap=True)["pool"]
                 for _, p in kept[-cfg["keep_checkpoints"]:-1]]
        pool.prune(also={e["path"] for d in older if d for e in d["entries"]})


# what a checkpoint's state depends on (the pool's entries: its draw policy, which decides what it keeps, and its size)
RESUME_FIXED = ("method", "dataset", "pool_storage", "ref_policy", "pool_capacity", "train_text_encoder")


def check_resumable(cfg, ckpt, world, path):
    """SystemExit unless the run can go on from this checkpoint exactly: the same kind of run, and the same global
    micro-batch (processes x batch_size), which the data position and the per-step noise are counted in."""
    for k in RESUME_FIXED:
        if ckpt["config"].get(k, cfg[k]) != cfg[k]:
            raise SystemExit(f"error: {path} is a run with {k}={ckpt['config'][k]!r}; it cannot resume as "
                             f"{k}={cfg[k]!r} (start a new run with init_from set to that run's folder)")
    if "world" not in ckpt:  # written before the process count was saved: the global micro-batch is not known
        return
    was = ckpt["world"] * ckpt["config"]["batch_size"]
    if was != world * cfg["batch_size"]:
        b = f"batch_size={was // world}" if was % world == 0 else f"a process count that divides {was}"
        raise SystemExit(f"error: {path} was written with a global micro-batch of {was} (processes x batch_size); this "
                         f"run has {world} x {cfg['batch_size']} = {world * cfg['batch_size']}. Resume with {b} (the "
                         "data position and the noise are counted in global micro-batches)")


def check_model_fits(cfg, m):
    """ValueError if the config asks what the loaded model cannot do: more sampler steps than its schedule takes, or a
    resolution its VAE and UNet do not divide."""
    T = m["scheduler"].config.num_train_timesteps
    for k in ("sample_steps", "self_sample_steps"):
        model.check_sampler_steps(m["scheduler"], cfg[k], k)
    if cfg["inversion_steps"] > T:
        raise ValueError(f"inversion_steps={cfg['inversion_steps']} is more than the scheduler's {T} timesteps")
    f = model.vae_factor(m) * 2 ** (len(m["unet"].config.block_out_channels) - 1)  # the UNet halves the side too
    if cfg["resolution"] % f:
        raise ValueError(f"resolution={cfg['resolution']} is not a multiple of {f} (the VAE's and the UNet's "
                         "downsampling)")


# -----------------------------------------------------------------------------------------------------------------

def main(cfg):
    global _log_file
    rank, world, device = setup(cfg)
    master = rank == 0
    out = cfg["out_dir"]
    tidied = durable.tidy(out) + durable.tidy(os.path.join(out, "pool")) if master else []  # what a kill left
    barrier()
    ckpt_path, latest = os.path.join(out, "ckpt.pt"), latest_checkpoint(out)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun --max-restarts relaunched us
    resume = cfg["init_from"] == "resume" or (latest is not None and (cfg["auto_resume"] or restarted))
    if resume and latest is None:
        raise SystemExit(f"error: init_from='resume' but {ckpt_path} does not exist")
    if not resume and latest is not None:
        raise SystemExit(f"error: {out} already holds a run ({latest}); resume it with --init_from=resume or choose "
                         "another out_dir (nothing is overwritten)")
    source = out if resume or cfg["init_from"] == "scratch" else cfg["init_from"]  # the run directory is SD-layout
    torch.manual_seed(cfg["seed"])
    if cfg["base_config"] and source != out and not os.path.isdir(cfg["init_from"]):
        trains = get_config([cfg["base_config"]])["out_dir"]
        if os.path.abspath(trains) != os.path.abspath(cfg["init_from"]):  # a typo must not train another folder
            raise SystemExit(f"error: init_from {cfg['init_from']!r} does not exist, and base_config "
                             f"{cfg['base_config']} would train {trains!r}, not it (--base_config= to only load)")
        ok = [True]
        if master:  # the tiny quick start: train the base this run starts from, as its own plain run
            print(f"{cfg['init_from']} is missing: training it first with {cfg['base_config']}")
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                   "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
            ok[0] = subprocess.run([sys.executable, __file__, cfg["base_config"]], env=env).returncode == 0
        if dist.is_initialized():
            dist.broadcast_object_list(ok, src=0)  # every rank stops together, none waits at a barrier
        if not ok[0]:
            raise SystemExit(f"error: training the base with {cfg['base_config']} failed")
    try:  # bad input is a one-line error before any work: data first (seconds), then the model
        stream = stream_of(cfg, read_checkpoint(latest, mmap=True) if resume else None)
        ds = make_dataset(cfg, stream)
        if cfg["method"] in PAIR_METHODS and not {"image_l", "latent_l"} & ds[0].keys():
            raise ValueError(f"method={cfg['method']!r} needs paired data (image_l), but dataset={cfg['dataset']!r} "
                             "has none" + (" (set tiny_mode='pairs')" if cfg["dataset"] == "tiny" else "")
                             + (": winners are its desirable, losers its undesirable samples"
                                if cfg["method"] == "kto" else ""))
        if len(ds) // world < cfg["batch_size"]:
            raise ValueError(f"the dataset has {len(ds)} examples, fewer than one micro-batch of {cfg['batch_size']} "
                             f"per process x {world} process(es)")
        if source != out:
            model.check_model_path(source)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    if master:
        os.makedirs(out, exist_ok=True)
        _log_file = open(os.path.join(out, "log.txt"), "a")
        if not resume and cfg["init_from"] == "scratch":
            model.build_tiny_model(out, data.WORDS, cfg["resolution"], cfg["unet_channels"], cfg["text_dim"],
                                   seed=cfg["seed"], schedule=cfg["noise_schedule"],
                                   prediction_type=cfg["prediction_type"], zero_snr=cfg["zero_snr"])
    barrier()
    use_bf16 = device.type == "cuda" and cfg["mixed_precision"] == "bf16"
    # the run directory is an SD-layout model folder: scratch and resume load from it, a model path from itself
    try:
        m = model.load_model(source, device, torch.bfloat16 if use_bf16 else torch.float32)
        check_model_fits(cfg, m)
        if cfg["latent_cache"]:
            ds.check_vae(m["vae"])
    except (OSError, ValueError) as e:  # a missing or damaged weights file, a hub id that does not resolve
        raise SystemExit(f"error: {e}" if str(source) in str(e) else f"error: {source}: {e}")
    if master and source != out:
        model.save_frozen_parts(m, out)
    unet = m["unet"].train()
    text_encoder = m["text_encoder"]
    params = list(unet.parameters())
    if cfg["train_text_encoder"]:
        text_encoder.float().train().requires_grad_(True)
        params += list(text_encoder.parameters())
    if cfg["grad_checkpointing"]:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                            weight_decay=cfg["weight_decay"])
    ema = copy.deepcopy(unet).requires_grad_(False) if cfg["ema_decay"] > 0 else None
    step, data_pos = 0, (0, 0)
    # counts for the log: updates skipped for a non-finite loss or gradient; per epoch, what the data needed
    tallies = {"skipped_updates": 0, "data": dict.fromkeys(DATA_TALLIES, 0)}
    if resume:
        ckpt = read_checkpoint(latest)
        check_resumable(cfg, ckpt, world, latest)
        unet.load_state_dict(ckpt["unet"])
        if cfg["train_text_encoder"]:
            text_encoder.load_state_dict(ckpt["text_encoder"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"] if ckpt.get("ema") else ckpt["unet"])
        opt.load_state_dict(ckpt["optimizer"])
        step, data_pos = ckpt["step"], tuple(ckpt["data_pos"])
        tallies = ckpt.get("tallies") or tallies
        if step > cfg["max_steps"]:
            raise SystemExit(f"error: {latest} is at step {step}, past max_steps={cfg['max_steps']}")
        torch.set_rng_state(ckpt["rng"])
        changed = {k: (ckpt["config"].get(k), v) for k, v in cfg.items()
                   if ckpt["config"].get(k) != v and k != "init_from"}
        print0(f"resuming {latest} at step {step}" + (f"; config changed since: {changed}" if changed else "")
               + (f"; after a kill: {', '.join(tidied)}" if tidied else ""))
        if master and not (os.path.isfile(ckpt_path) and os.path.samefile(latest, ckpt_path)):
            durable.link(latest, ckpt_path)  # a kill fell between the new checkpoint and its link
    pool, ref_unet, ref_index, ref_step = None, None, None, None
    if cfg["method"] in REF_METHODS:
        # one resident reference UNet; snapshots are copied into it in place (replay.py). DPO's pool is theta_0 only
        ref_dtype = torch.bfloat16 if cfg["ref_dtype"] == "bfloat16" else torch.float32
        ref_unet = copy.deepcopy(unet).to(ref_dtype).eval().requires_grad_(False)
        pool = together(True, replay.ReferencePool, None if resume else unet.state_dict(),  # a disk pool writes theta_0
                        cfg["ref_policy"] if cfg["method"] == "sspo" else "first", cfg["pool_capacity"],
                        cfg["pool_storage"], os.path.join(out, "pool"), cfg["seed"], ref_dtype, master)
        if resume:
            try:
                pool.load_state_dict(ckpt["pool"])
            except FileNotFoundError as e:
                raise SystemExit(f"error: {latest}: {e}")
    if resume:  # a kill may have come after a new checkpoint but before the old ones went
        together(master, drop_old_checkpoints, cfg, pool)
        if step == cfg["max_steps"]:  # its last eval and save are done: running them again would log them twice
            print0(f"{latest} is at max_steps={step}: the run is finished (raise --max_steps to train on)")
            teardown()
            return
    for u in (unet, ref_unet, ema) if cfg["channels_last"] else ():  # opt-in fast path (bench.py)
        if u is not None:
            u.to(memory_format=torch.channels_last)
    for u in (unet, ref_unet) if cfg["compile_unet"] else ():  # in place: state_dict keys, checkpoints unchanged
        if u is not None:
            u.compile(dynamic=False)
    # gradients as views into DDP's all-reduce buckets: one copy of the UNet's gradients, not two (3.4 GB on SD1.5)
    ddp_unet = DDP(unet, device_ids=[device.index] if device.type == "cuda" else None,
                   gradient_as_bucket_view=True) if world > 1 else unet
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    sched = m["scheduler"]
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)  # read at every step: moved once
    T = m["scheduler"].config.num_train_timesteps
    latent_shape = model.latent_shape(m, cfg["resolution"])  # (C, H, W) of what the UNet denoises
    with torch.no_grad():
        uncond = model.encode_prompts(m["tokenizer"], m["text_encoder"], [""])  # (1, 77, D), for guidance
    encode = model.PromptCache(m["tokenizer"], m["text_encoder"],  # a frozen encoder: once per prompt
                               0 if cfg["train_text_encoder"] else cfg["text_cache"])

    print0("config:", {k: v for k, v in cfg.items()})
    print0(f"{world} process(es) on {device}, bf16 autocast: {use_bf16}; UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M "
           f"params; effective batch {cfg['batch_size'] * cfg['grad_accum'] * world}; {len(ds)} examples; random stream "
           f"{stream} ({'fine-tuning' if stream else 'pretraining'})")
    if master and cfg["dataset"] == "tiny":  # what the judge gives the data itself: the ceiling and the base
        rng = np.random.default_rng(cfg["seed"])
        correct = np.mean([data.judge(data.render(c, cfg["resolution"], rng), data.prompt_of(c))[0] for c in data.ALL_COMBOS])
        drawn = np.mean([data.judge(data.to_uint8(ds[i]["image_w"]), ds[i]["prompt"])[0] for i in range(256)])
        print0(f"judge of the data: correct renders {correct:.3f}, training images ({cfg['tiny_mode']}) {drawn:.3f}")
    if master:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)

    batches = micro_batches(ds, cfg, rank, world, *data_pos, stream)
    start_step = step
    first_eval = None
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, desc="train", dynamic_ncols=True)
    t_last = time.time()
    while True:
        last = step == cfg["max_steps"]
        # once in a while (the last step too): eval + sample grid, then checkpoint
        if step % cfg["eval_every"] == 0 or last:
            if master:
                res, images, prompts, labels = run_eval(m, ema or unet, cfg, ds, device, autocast)
                first_eval = first_eval or res
                print0(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
                log_json({"kind": "eval", "step": step, **res})
                data.save_grid(images, os.path.join(out, "samples", f"step{step:06d}.png"), labels)
                with open(os.path.join(out, "samples", "prompts.txt"), "w") as f:
                    f.write("\n".join(prompts) + "\n")
            barrier()
        if (step % cfg["save_every"] == 0 or last) and step > 0 and not (resume and step == ckpt["step"]):
            together(master, save_checkpoint, cfg, unet, ema, text_encoder, opt, step, data_pos, pool, tallies, world)
        if last:
            break

        # ---------------------------------------------------------------------------------------------------------
        # one optimizer update: grad_accum micro-steps of the loss, then clip and step
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        t_start = time.time()
        if pool is not None:  # the reference of this update (SSPO.md 4: Random Checkpoint Replay)
            if cfg["method"] == "sspo" and step > 0 and step % cfg["ckpt_every"] == 0:
                together(True, pool.push, unet.state_dict(), step)  # a disk pool's file: rank 0 writes it
            if ref_index is None or cfg["ref_redraw"] == "step" or step % cfg["ckpt_every"] == 0:
                # every rank draws the same snapshot: the draw is a function of (seed, step) only
                ref_index = pool.draw(step if cfg["ref_redraw"] == "step" else step - step % cfg["ckpt_every"])
                ref_step = pool.load_into(ref_index, ref_unet)
        stats_sum = {"loss": 0.0, **({"t_sample": 0.0} if cfg["method"] == "sspo" else {})}
        update_prompts = []
        for micro in range(cfg["grad_accum"]):
            batch, pos = next(batches)
            if pos[0] != data_pos[0]:  # a new epoch: what the one before needed
                report_data(tallies, data_pos[0], device)
            data_pos = pos
            tally_data(tallies["data"], batch, m["tokenizer"], cfg["bad_data"])
            update_prompts += batch["prompt"]
            B = len(batch["prompt"])
            eps, t, drop, x_T, vae_noise, eta_noise = step_randomness(cfg, step, micro, rank, world, (B, *latent_shape), T,
                                                                      stream)
            eps, t = eps.to(device), t.to(device)
            x0_w = to_latents(m["vae"], batch, "w", device, vae_noise[0])  # (B, C, H, W)
            prompts = ["" if d else p for p, d in zip(batch["prompt"], drop.tolist())]
            ctx = encode(prompts)  # (B, 77, D)
            if cfg["method"] in PAIR_METHODS:
                x0_l = to_latents(m["vae"], batch, "l", device, vae_noise[1])
            elif cfg["method"] == "sspo":  # the reference draws its own image for each prompt: the loser candidate
                t0 = time.time()
                cond = encode(batch["prompt"])  # no dropout here
                with autocast:  # the final latent is used directly: no decode/encode round trip
                    x0_l = model.ddim_sample(ref_unet, m["scheduler"], cond, uncond, x_T.to(device),
                                             cfg["self_sample_steps"], cfg["self_sample_guidance"], cfg["self_sample_eta"],
                                             None if eta_noise is None else eta_noise.to(device))
                stats_sum["t_sample"] += time.time() - t0
            # DDP syncs gradients on the last micro-step only
            sync = nullcontext() if world == 1 or micro == cfg["grad_accum"] - 1 else ddp_unet.no_sync()
            with sync, autocast:
                if cfg["method"] == "sft":
                    loss, stats = losses.sft_loss(model.denoising_error(ddp_unet, sched, x0_w, eps, t, ctx))
                else:  # winners first; winner and loser share the noise, the timestep and the (dropped) prompt
                    x0, e2, t2, c2 = torch.cat([x0_w, x0_l]), torch.cat([eps, eps]), torch.cat([t, t]), torch.cat([ctx, ctx])
                    if cfg["noising"] == "ddim_inversion":  # Inversion-DPO: x_t (and the eps it implies) from the
                        # deterministic inversion of each image by the reference (the policy for reference-free MaPO)
                        inverter = unet if ref_unet is None else ref_unet
                        _, e2 = model.ddim_invert(inverter, sched, x0, t2, c2, uncond, cfg["inversion_steps"],
                                                  cfg["inversion_guidance"])
                    err, pred, target = model.denoising_error(ddp_unet, sched, x0, e2, t2, c2, return_pred=True)  # (2B,)
                    err_w, err_l = err.chunk(2)  # (B,) each
                    if cfg["sdpo_safeguard"]:  # the loser's gradient x lambda, its value unchanged (Diffusion-SDPO):
                        # err_l depends on the weights only through the loser's prediction, so this equals scaling
                        # the gradient reaching that prediction by lambda
                        lam = losses.sdpo_scale(*pred.chunk(2), *target.chunk(2), cfg["sdpo_mu"])
                        err_l = err_l.detach() + lam * (err_l - err_l.detach())
                    if ref_unet is not None:
                        with torch.no_grad():
                            ref_w, ref_l = model.denoising_error(ref_unet, sched, x0, e2, t2, c2).chunk(2)
                    meth, beta = cfg["method"], cfg["beta"]
                    if meth == "dpo":
                        loss, stats = losses.dpo_loss(err_w, err_l, ref_w, ref_l, beta)
                    elif meth == "sspo":
                        loss, stats = losses.sspo_loss(err_w, err_l, ref_w, ref_l, beta, cfg["ssr"])
                    elif meth == "dmpo":
                        loss, stats = losses.dmpo_loss(err_w, err_l, ref_w, ref_l, beta, cfg["dmpo_alpha"])
                    elif meth == "kto":  # unpaired: winners desirable, losers undesirable
                        desirable = torch.arange(2 * B, device=device) < B
                        loss, stats = losses.kto_loss(err, torch.cat([ref_w, ref_l]), desirable, beta)
                    elif meth == "mapo":
                        loss, stats = losses.mapo_loss(err_w, err_l, beta, cfg["mapo_snr"], T)
                    elif meth == "see_dpo":
                        loss, stats = losses.see_dpo_loss(err_w, err_l, ref_w, ref_l, beta, cfg["see_gamma"])
                    else:
                        loss, stats = losses.dpo_cm_loss(err_w, err_l, ref_w, ref_l, t, beta, cfg["cm_t_range"])
                    if cfg["sdpo_safeguard"]:
                        stats["sdpo_lambda"] = lam
                if durable.fault("nan_loss", kill=False):
                    loss = loss * float("nan")
                (loss / cfg["grad_accum"]).backward()
            for k, v in {"loss": loss, **stats}.items():  # summed as float64 tensors and read at log time: a .item()
                # here would wait for the GPU every micro-step (the same numbers as Python floats, bit for bit)
                stats_sum[k] = stats_sum.get(k, 0.0) + torch.as_tensor(v).detach().double() / cfg["grad_accum"]
        if cfg["train_text_encoder"] and world > 1:  # DDP averages the UNet's gradients; these we average here
            for p in text_encoder.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
        # the one host-device sync of an update: whether to step (every rank steps or none does: a NaN on one
        # rank's batch must not split the replicas)
        finite = (torch.isfinite(torch.as_tensor(stats_sum["loss"], device=device)) & torch.isfinite(grad_norm)).float()
        if world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item():
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - cfg["ema_decay"])
        elif cfg["nonfinite"] == "stop":
            raise SystemExit(f"error: non-finite loss ({stats_sum['loss']}) or gradient norm ({grad_norm.item()}) in "
                             f"step {step + 1} on rank {rank}; its prompts: {update_prompts}")
        else:
            tallies["skipped_updates"] += 1
            print0(f"step {step + 1}: non-finite loss ({stats_sum['loss']}) or gradient norm ({grad_norm.item()}) on some "
                   f"rank: update skipped ({tallies['skipped_updates']} so far)")
        opt.zero_grad(set_to_none=world == 1)  # under DDP, zeroed in place: still the bucket views (freed, the next
        # no_sync micro-steps would accumulate into new tensors, a second copy until the all-reduce)
        stats_sum["t_train"] = time.time() - t_start - stats_sum.get("t_sample", 0.0)  # seconds, this update
        step += 1
        durable.fault("step")
        # ---------------------------------------------------------------------------------------------------------

        bar.update(1)
        if step % cfg["log_every"] == 0 or step == cfg["max_steps"]:
            stats = all_mean({k: float(v) for k, v in stats_sum.items()}, device)
            dt = (time.time() - t_last) / cfg["log_every"]
            t_last = time.time()
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if device.type == "cuda":
                mem_key, mem = "peak_gib", torch.cuda.max_memory_allocated(device) / 2 ** 30
            else:  # this process's peak resident set; ru_maxrss is in KiB on Linux, bytes on macOS
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                mem_key, mem = "peak_rss_gib", rss * (1 if sys.platform == "darwin" else 1024) / 2 ** 30
            log_json({"kind": "train", "step": step, **stats, "lr": lr, "grad_norm": grad_norm.item(), "s_per_step": dt,
                      mem_key: mem})
            rate = cfg["batch_size"] * cfg["grad_accum"] * world / dt
            print0(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()) +
                   (f", ref = snapshot of step {ref_step}" if pool is not None else "") +
                   f", lr {lr:.2e}, grad_norm {grad_norm.item():.3f}, {dt:.2f} s/step, " +
                   (f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}") + " samples/s" +
                   f", peak {'GPU memory' if device.type == 'cuda' else 'RSS'} so far {mem:.2f} GiB")
    bar.close()
    report_data(tallies, data_pos[0], device, partial=True)
    if tallies["skipped_updates"]:
        print0(f"updates skipped for a non-finite loss or gradient: {tallies['skipped_updates']} of {step}")
    if master and cfg["dataset"] == "tiny" and first_eval is not None:
        print0(f"judge on seen / held-out prompts: step {start_step} "
               f"{first_eval['judge_seen']:.3f} / {first_eval['judge_heldout']:.3f} -> step {step} "
               f"{res['judge_seen']:.3f} / {res['judge_heldout']:.3f}")
    print0(f"done: {out}/ckpt.pt, {out}/unet/, samples in {out}/samples/")
    del ddp_unet  # DDP's reducer holds the process group: free it while every rank is still here
    teardown()


if __name__ == "__main__":
    try:
        main(get_config(sys.argv[1:]))
    except SystemExit as e:  # a one-line error: also the last line of rank 0's log.txt, where the run is read later
        if isinstance(e.code, str) and _log_file is not None and not _log_file.closed:
            _log_file.write(e.code + "\n")
            _log_file.flush()
        raise
    except RuntimeError as e:  # a collective failed: gloo saw a peer's socket close, or ddp_timeout passed
        if not (isinstance(e, dist.DistError) or "gloo" in str(e) or "NCCL" in str(e)):
            raise
        msg = (f"error: rank {os.environ.get('RANK')}: a collective failed, another rank has died or hangs "
               f"(see its log): {str(e).strip().splitlines()[0]}")
        print(msg, file=sys.stderr, flush=True)
        sys.stdout.flush()
        if _log_file is not None:  # rank 0's log.txt (flushed after every line)
            _log_file.write(msg + "\n")
            _log_file.flush()
        # not SystemExit: the interpreter's exit would destroy the broken process group, whose threads can then
        # abort the process ("terminate called without an active exception", exit -6); every file is already closed
        os._exit(1)
