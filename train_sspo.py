"""
Align a text-to-image diffusion model (a Stable Diffusion UNet, or the tiny world's pixel-space one) with SSPO,
Self-Sampling Preference Optimization (arXiv 2410.05255), or its baselines: SFT, Diffusion-DPO, SPIN-Diffusion (an
SSPO setting) and the other objectives of the literature (losses.py).

    python train_sspo.py configs/tiny_base.py                     # one process, CPU or one GPU
    torchrun --nproc_per_node=8 train_sspo.py configs/sd15.py      # DDP (nccl on GPU, gloo on CPU)
    torchrun --nproc_per_node=8 train_sspo.py configs/flux_full.py # FSDP2 (parallel='fsdp'): the model sharded
    python train_sspo.py configs/tiny_base.py --max_steps=50 --out_dir=out/try   # --key=value overrides

Read top to bottom: every tunable with what it does, a few helpers of the loop, then main, whose optimizer update
is fenced by rule lines. The rest lives where its concern does: config.py (reading the config), ddp.py (processes,
logging), data.py (datasets, data order, each step's noise), model.py (the diffusers parts and LoRA), diffusion.py
(noising, errors, the sampler), losses.py (the objectives), replay.py (the reference pool), checkpoint.py (saving,
resuming).
"""
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import config
import data
import ddp
import diffusion
import losses
import model
import replay
from ddp import print0
from tiny import build

# -----------------------------------------------------------------------------------------------------------------
# defaults: every tunable, one per line. A file in configs/ restates only what differs; --key=value beats both.
# SSPO (SSPO.md 4): winners only; a snapshot of the policy's history draws each loser and is the reference
method = "sft"                  # 'sspo' | 'sft': eps-MSE on image_w (also base pretraining) | 'dpo': pairs, frozen base
                                # as reference | on pairs, frozen base as reference: 'dmpo' (reverse KL) | 'kto'
                                # (unpaired utility) | 'see_dpo' (self-entropy) | 'dpo_cm' (timestep mask) | and 'mapo'
                                # (pairs, no reference). README's table: the paper of each, and what is reconstructed
beta = 5000.0                   # inverse temperature in the 1/2 convention (SSPO.md 2). SD1.5: dpo/sspo/see_dpo/dpo_cm
                                # 5000, dmpo 2000, kto 1000 (no 1/2 in its logit); mapo: weight of its margin term
ssr = "sign"                    # Self-Sampling Regularization: 'sign' (v1) | 'indicator' (v2) | 'off' | 'oracle' (tiny
                                # worlds: flip where the judge finds the self-sample at least as good as its winner,
                                # not by the errors; the upper bound of the SSR idea)
ssr_draws = 0                   # (eps, t) draws whose winner errors SSR's criterion averages: 0 = the loss's own draw
                                # (the paper); K > 0: K draws of their own, 2K no-grad forwards an update
ssr_t_max = 1000                # those K draws' timesteps are below this (SSR by the fine detail only: e.g. 300)
ssr_margin = 0.0                # |ref_err_w - err_w| below ssr_margin x ref_err_w is a tie (s = 0): 0 = the hard sign
ref_policy = "uniform"          # Random Checkpoint Replay's draw: 'uniform' over all snapshots | 'first' | 'last' (SPIN)
ref_redraw = "stretch"          # new reference every ckpt_every updates ('stretch'; not stated in the paper) | 'step'
ckpt_every = 30                 # updates between snapshots pushed into the reference pool (paper: 30)
pool_capacity = 0               # snapshots kept: 0 = all (paper); else theta_0 + a reservoir sample (replay.py)
pool_storage = "memory"         # 'memory' (CPU RAM) | 'disk' (out_dir/pool/*.safetensors)
ref_dtype = "float32"           # the reference UNet and the snapshots: 'float32' | 'bfloat16' (fine for SD1.5)
self_sample_steps = 20          # DDIM steps of SSPO's self-sampling (not stated in the paper; our choice)
self_sample_guidance = 3.0      # its guidance (the paper's eval pipeline uses 7.5 on SD1.5; not stated for training)
self_sample_eta = 0.0           # its DDIM eta
# the other objectives (losses.py)
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
ema_decay = 0.0                 # >0: evaluate and save an exponential moving average of the weights (pretraining);
                                # 0 for alignment, as Diffusion-DPO and SSPO train without one
# I/O
out_dir = "out/run"             # run directory: ckpt.pt, log.txt, samples/, and an SD-layout model folder
init_from = "scratch"           # 'scratch' (random tiny model) | 'resume' (out_dir/ckpt.pt) | SD/SDXL-layout folder or hub id
vae = ""                        # another VAE in place of init_from's (a folder or hub id): SDXL's fp16-safe
                                # madebyollin/sdxl-vae-fp16-fix, as the peers pass it; the run folder saves the one used
auto_resume = False             # resume from out_dir's newest checkpoint if it has one, else start as init_from says;
                                # workers that torchrun --max-restarts restarts always do
keep_checkpoints = 2            # ckpt_STEP.pt files kept (the newest is also ckpt.pt, a hard link); older ones, and pool
                                # snapshots only they name, are deleted once a newer checkpoint is complete
eval_every = 200                # optimizer steps between evals (loss, judge, sample grid); the last step always evals
save_every = 200                # optimizer steps between checkpoints; the last step always saves
log_every = 10                  # optimizer steps between log lines: the logged update's stats (mean over its
                                # micro-batches and ranks), and s/step over the stretch (evals and saves included)
log_theta0 = False              # SFT (other methods ignore it): also log the winners' error of a frozen theta_0 on the
                                # same draws (d_w; a no-grad forward an update), what a preference method's d_w is read
                                # against
# data
dataset = "tiny"                # 'tiny' (synthetic world, tiny/world.py) | 'pickapic' (parquet shards) | 'imagefolder'
                                # | video: 'tiny_video' (synthetic clips, tiny/video.py) | 'clipfolder' (metadata.jsonl)
data_path = ""                  # parquet file or folder (pickapic); folder with metadata.jsonl (imagefolder)
tiny_mode = "base"              # 'base': draws of the flawed base distribution | 'pairs': judge-ranked pairs
tiny_size = 50_000              # examples in the tiny world's training set (each a pure function of seed and index)
tiny_p_correct = 0.4            # share of flawless images in the base distribution
tiny_flaws = ("colour", "position", "shape", "blur")  # what the other draws get wrong, one each (tiny/world.py's
                                # ALL_FLAWS; tiny_video: tiny/video.py's FLAWS, e.g. ("static", "direction", "jitter"))
resolution = 16                 # training image side in pixels (512 for SD1.5)
frames = 8                      # video: frames a clip (AnimateDiff: 16)
frame_stride = 1                # video: clipfolder keeps every frame_stride-th frame of a clip
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
motion_adapter = ""             # video: a MotionAdapter (folder or hub id) that makes init_from's SD1.5 UNet an
                                # AnimateDiff UNetMotionModel (guoyww/animatediff-motion-adapter-v1-5-2)
trained_modules = "all"         # 'all': the whole UNet | 'motion': an AnimateDiff UNet's motion modules only (what
                                # AnimateDiff and MagicTime train)
text_dim = 32                   # width of the tiny CLIP text encoder
train_text_encoder = False      # also train the text encoder: for pretraining from scratch, where a random frozen one
                                # is a weak condition (SD1.5 and all alignment runs keep it frozen)
t5_max_length = 0               # SD3 / FLUX.1: T5 tokens of a prompt (0: the pipeline's, SD3 256, FLUX.1 512; the
                                # peers train SD3 at 77-128: shorter context, cheaper steps)
timestep_density = "uniform"    # training timesteps: 'uniform' (SSPO.md 1; FLUX.1's trainers) | 'logit_normal' (SD3's,
                                # Esser et al. 2024: the middle noise levels drawn most)
noise_schedule = "scaled_linear"  # SD1.5's betas (0.00085-0.012) | 'squaredcos_cap_v2' | 'linear' (DDPM's)
prediction_type = "epsilon"     # what the UNet predicts: 'epsilon' (SD1.5) | 'v_prediction' (needed by zero_snr)
zero_snr = False                # betas rescaled to a zero terminal SNR, sampling from t = T - 1 (Lin et al. 2023)
# LoRA (peft adapters as diffusers adds them; the run folder gets lora/, which load_lora_weights reads)
lora_rank = 0                   # 0: full fine-tuning | r > 0: train rank-r adapters only (diffusers' LoRA trainers: 4)
lora_alpha = 0.0                # adapter scale alpha / rank; 0.0 means alpha = lora_rank (scale 1, diffusers' trainers)
lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the adapted modules: attention projections, as diffusers'
# sampling (eval grids; the shared DDIM sampler)
sample_steps = 20               # DDIM steps
guidance = 3.0                  # classifier-free guidance scale (SD1.5: 7.5); 1.0 = no guidance, one forward
eta = 0.0                       # DDIM noise: 0 deterministic, 1 DDPM-like
n_eval_images = 8               # images in the sample grid for real data (the tiny world draws all its 48 prompts)
# system
device = "auto"                 # 'auto' (cuda if available) | 'cpu' | 'cuda'
mixed_precision = "bf16"        # bf16 autocast, fp32 masters: 'bf16' on CUDA (frozen models bf16) | 'bf16_cpu' CPU too | 'no'
seed = 0                        # model init, data order, noise: a run is a pure function of its config
parallel = "ddp"                # several processes: 'ddp' (each holds the whole model) | 'fsdp' (FSDP2: the policy, its
                                # reference and EMA sharded per block over the processes, the optimizer state too; the
                                # pool on disk, each rank its shard: models larger than one GPU, docs/memory.md)
ddp_timeout = 1800              # seconds a collective waits for a rank that is gone before the run stops (gloo sees a
                                # dead peer's closed socket at once; NCCL waits this long)
text_cache = 4096               # distinct prompts whose frozen text-encoder output is kept (0: encode every micro-step)
channels_last = False           # UNets in channels_last memory format (python -m dev.bench measures it; off: as published)
compile_unet = "off"            # torch.compile the policy and reference UNets in place: off, whole or regional (each new
                                # input shape recompiles). Off: the published results were trained without it
# -----------------------------------------------------------------------------------------------------------------
# helpers of the loop: the learning rate, the eval, the self-sample's judge, a skipped update, building the model

def lr_at(step, cfg):
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    if cfg["lr_schedule"] == "constant":
        return cfg["lr"]
    p = (step - cfg["warmup_steps"]) / max(1, cfg["max_steps"] - cfg["warmup_steps"])
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def run_eval(m, unet, cfg, ds, device, autocast, step):
    """Denoising loss on the data's first examples (fixed noise and timesteps), samples for the eval prompts from fixed
    noise (the same every eval, so grids are comparable), and, where the dataset has a judge (the tiny worlds), the
    judge's mean score per group of its prompts (seen, held-out): logged, the samples saved as
    out_dir/samples/stepNNNNNN.png; returns the numbers.
    The loss is over one global micro-batch of examples, run a process's batch_size at a time with its draws made
    for all of them first: the same numbers for any number of processes at the same global batch. The samples' noise
    has a generator of its own, so the images and the judge do not depend on the batch size either."""
    unet.eval()
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    n, B = min(cfg["batch_size"] * ddp.world_size(), len(ds)), cfg["batch_size"]
    shape = model.latent_shape(m, cfg["resolution"], cfg["frames"])
    vae_noise = torch.randn((n, *shape), generator=g) if m["vae"] is not None else None  # as to_latents draws it
    eps = torch.randn((n, *shape), generator=g)
    t = diffusion.sample_timesteps(n, m["scheduler"].config.num_train_timesteps, g)
    errs = []
    for i in range(0, n, B):
        batch = torch.utils.data.default_collate([ds[j] for j in range(i, min(i + B, n))])
        x0 = model.to_latents(m["vae"], batch, "w", device, None if vae_noise is None else vae_noise[i:i + B])
        ctx = model.encode_prompts(m, batch["prompt"], cfg["resolution"])
        with autocast:
            errs.append(diffusion.denoising_error(model.net(unet, cfg["guidance"]), m["scheduler"], x0,
                                                  eps[i:i + B].to(device), t[i:i + B].to(device), ctx))
    loss = torch.cat(errs).mean().item()
    groups = ds.eval_prompts() if hasattr(ds, "eval_prompts") else {
        "": [ds[i]["prompt"] for i in range(min(cfg["n_eval_images"], len(ds)))]}  # real data: its first prompts
    prompts = [p for ps in groups.values() for p in ps]
    cond = model.encode_prompts(m, prompts, cfg["resolution"])
    uncond = model.encode_prompts(m, [""], cfg["resolution"])
    gs = torch.Generator().manual_seed(cfg["seed"] + 2)
    noise = torch.randn((len(prompts), *shape), generator=gs).to(device)
    step_noise = torch.randn((cfg["sample_steps"], *noise.shape), generator=gs).to(device) if cfg["eta"] > 0 else None
    with autocast:
        x = diffusion.sample(model.net(unet), m["scheduler"], cond, uncond, noise, cfg["sample_steps"], cfg["guidance"],
                             cfg["eta"], step_noise)
    images = model.latents_to_images(m["vae"], x).cpu()
    out, labels = {"eval_loss": loss}, None
    if hasattr(ds, "judge_batch"):
        scores, i = ds.judge_batch(images, prompts), 0
        for name, ps in groups.items():
            out[f"judge_{name}"], i = float(scores[i:i + len(ps)].mean()), i + len(ps)
        labels = [f"{s:.2f}" for s in scores]
    unet.train()
    print0(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    ddp.log_json({"kind": "eval", "step": step, **out})
    if ddp.rank() > 0:  # under FSDP every rank evaluates (the model is in pieces); rank 0 writes
        return out
    path = os.path.join(cfg["out_dir"], "samples", f"step{step:06d}")
    if images.dim() == 5:  # clips: a strip of frames a row, and a GIF of the first 16
        data.save_clip_strip(images, path + ".png", labels)
        data.save_gif(images[:16], path + ".gif")
    else:
        data.save_grid(images, path + ".png", labels)
    with open(os.path.join(cfg["out_dir"], "samples", "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    return out


def judge_self_samples(ds, m, batch, x0_s, device):
    """Where the dataset has a judge (the tiny worlds): whether each self-sample is at least as good as its winner
    (above it, or within the pairs' tie margin) -> ({"judge_ok": (B,) bool}, the log's means); else ({}, {})."""
    if not hasattr(ds, "judge_batch"):
        return {}, {}
    j_w = torch.as_tensor(ds.judge_batch(batch["image_w"], batch["prompt"]))
    j_s = torch.as_tensor(ds.judge_batch(model.latents_to_images(m["vae"], x0_s).cpu(), batch["prompt"]))
    ok = j_s >= j_w - ds.tie_margin
    return {"judge_ok": ok.to(device)}, {"judge_w": j_w.mean(), "judge_s": j_s.mean(), "judge_s_ok": ok.double().mean()}


def skip_update(cfg, step, loss, grad_norm, prompts, tallies):
    """A non-finite loss or gradient norm on some rank: stop naming the step and its prompts (nonfinite='stop'),
    else skip the update (every rank does) and count it."""
    why = f"non-finite loss ({loss}) or gradient norm ({grad_norm.item()})"
    if cfg["nonfinite"] == "stop":
        raise SystemExit(f"error: {why} in step {step + 1} on rank {ddp.rank()}; its prompts: {prompts}")
    tallies["skipped_updates"] += 1
    print0(f"step {step + 1}: {why} on some rank: update skipped ({tallies['skipped_updates']} so far)")


def load_for_training(cfg, source, ds, device, use_bf16, master):
    """The model parts from `source` (the run directory is an SD-layout folder: scratch and resume load from it),
    the UNet in train mode, the trained parameters (model.trainable: the UNet, its motion modules or its LoRA
    adapter), AdamW, the EMA copy (None without ema_decay) and the reference's UNet (None for a method without one).
    Under parallel='fsdp' the three UNets are sharded (ddp.shard) once the copies are made: a sharded one cannot be
    copied."""
    own = source == cfg["out_dir"]  # scratch or resume: a LoRA run's lora/ is resumed from ckpt.pt, not fused here
    try:
        m = model.load_model(source, device, torch.bfloat16 if use_bf16 else torch.float32, fuse_lora=not own,
                             vae="" if own else cfg["vae"], motion_adapter="" if own else cfg["motion_adapter"],
                             t5_max_length=cfg["t5_max_length"])
        model.check_model_fits(cfg, m)
        if cfg["latent_cache"]:
            ds.check_vae(m["vae"])
    except (OSError, ValueError) as e:  # a missing or damaged weights file, a hub id that does not resolve
        raise SystemExit(f"error: {e}" if str(source) in str(e) else f"error: {source}: {e}")
    if master and not own:  # the run folder gets everything the trained weights do not change
        model.save_frozen_parts(m, cfg["out_dir"], cfg, checkpoint.write_folder)
    unet = m["unet"].train()
    params = model.trainable(unet, cfg)
    if cfg["train_text_encoder"]:
        m["text_encoder"].float().train().requires_grad_(True)
        params += list(m["text_encoder"].parameters())
    if cfg["grad_checkpointing"]:
        unet.enable_gradient_checkpointing()
    ema = model.ema_copy(unet) if cfg["ema_decay"] > 0 else None
    ref_unet = model.reference(unet, torch.bfloat16 if cfg["ref_dtype"] == "bfloat16" else torch.float32) \
        if losses.needs_reference(cfg) else None
    if cfg["parallel"] == "fsdp":
        for u in (unet, ref_unet, ema):
            if u is not None:
                ddp.shard(u, use_bf16)
        params = list(unet.parameters())  # now each rank's shards
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                            weight_decay=cfg["weight_decay"], fused=True)  # one kernel for all tensors (CPU too)
    return m, unet, params, opt, ema, ref_unet


# -----------------------------------------------------------------------------------------------------------------

def prepare(cfg, rank, world_size, device):
    """Everything the loop starts from: a resumed run's state; the dataset, checked; the model, optimizer and EMA;
    the reference pool. None when a resumed run is already done."""
    master, out = rank == 0, cfg["out_dir"]
    resume, latest, tidied = checkpoint.resume_point(cfg, master)
    source = out if resume or cfg["init_from"] == "scratch" else cfg["init_from"]  # the run directory is SD-layout
    torch.manual_seed(cfg["seed"])
    stream = data.stream_of(cfg, checkpoint.read_checkpoint(latest, mmap=True) if resume else None)
    try:  # bad input is a one-line error before any work: data first (seconds), then the model's path
        ds = data.open_dataset(cfg, stream, world_size)
        if source != out:
            model.check_model_path(source)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    if master:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        ddp.open_log(out)
        if not resume and cfg["init_from"] == "scratch":  # a random model of the tiny worlds' kind, with their words
            build.build_tiny_model(out, getattr(ds, "words", None), cfg["resolution"], cfg["unet_channels"],
                                   cfg["text_dim"], seed=cfg["seed"], schedule=cfg["noise_schedule"],
                                   prediction_type=cfg["prediction_type"], zero_snr=cfg["zero_snr"],
                                   frames=getattr(ds, "frames", 0))
    ddp.barrier()
    use_bf16 = device.type == "cuda" and cfg["mixed_precision"] != "no"  # frozen models in bf16
    m, unet, params, opt, ema, ref_unet = load_for_training(cfg, source, ds, device, use_bf16, master)
    # counts for the log: updates skipped for a non-finite loss or gradient; per epoch, what the data needed
    r = dict(m=m, unet=unet, params=params, opt=opt, ema=ema, ds=ds, stream=stream, ckpt=None, step=0,
             data_pos=(0, 0), tallies={"skipped_updates": 0, "data": dict.fromkeys(data.DATA_TALLIES, 0)},
             pool=None, ref_unet=None, autocast=config.bf16_autocast(cfg, device))
    if resume:
        r["ckpt"], r["step"], r["data_pos"], r["tallies"] = checkpoint.load_state(
            latest, cfg, world_size, unet, m["text_encoder"], ema, opt, r["tallies"], tidied, master)
    if ref_unet is not None:
        r["pool"], r["ref_unet"] = replay.make_pool(cfg, unet, out, master, r["ckpt"], latest), ref_unet
    if resume:  # a kill may have come after a new checkpoint but before the old ones went
        ddp.together(master, checkpoint.drop_old_checkpoints, cfg, r["pool"])
        if r["step"] == cfg["max_steps"]:  # its last eval and save are done: running them again would log them twice
            print0(f"{latest} is at max_steps={r['step']}: the run is finished (raise --max_steps to train on)")
            return None
    model.speed_up([unet, r["ref_unet"], ema], cfg["channels_last"], cfg["compile_unet"])
    print0("config:", {k: v for k, v in cfg.items()})
    n = lambda ps: f"{sum(p.numel() for p in ps) / 1e6:.3g}M"
    print0(f"{world_size} process(es) on {device}, bf16 autocast: {r['autocast']}; UNet {n(unet.parameters())} params, "
           f"{n(params)} trained; effective batch {cfg['batch_size'] * cfg['grad_accum'] * world_size}; {len(ds)} "
           f"examples; random stream {stream} ({'fine-tuning' if stream else 'pretraining'})")
    if master and hasattr(ds, "judge_the_data"):  # the tiny worlds: what the judge gives the data itself
        print0(ds.judge_the_data())
    return r


# -----------------------------------------------------------------------------------------------------------------

def main(cfg):
    data.check_config(cfg)  # what the dataset and the model ask of the config: one line before any work
    model.check_config(cfg)
    rank, world_size, device = ddp.setup(cfg)
    master, out = rank == 0, cfg["out_dir"]
    r = prepare(cfg, rank, world_size, device)
    if r is None:
        return ddp.teardown()
    m, unet, params, opt, ema, ds, stream = (r[k] for k in ("m", "unet", "params", "opt", "ema", "ds", "stream"))
    pool, ref_unet, ckpt, step, data_pos, tallies = (r[k] for k in ("pool", "ref_unet", "ckpt", "step", "data_pos",
                                                                       "tallies"))
    ref_step = None  # the step of the snapshot in ref_unet (0: theta_0)
    fsdp = cfg["parallel"] == "fsdp"  # then every rank runs the eval and the save: the model is in pieces
    # gradients as views into DDP's all-reduce buckets: one copy of the UNet's gradients, not two (3.4 GB on SD1.5)
    ddp_unet = DDP(unet, device_ids=[device.index] if device.type == "cuda" else None,
                   gradient_as_bucket_view=True) if world_size > 1 and not fsdp else unet
    policy = model.net(ddp_unet, cfg["guidance"])  # as diffusion.py calls a network (FLUX.1-dev trains at its guidance)
    reference = None if ref_unet is None else model.net(ref_unet, cfg["guidance"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if r["autocast"] else nullcontext()
    sched, T = m["scheduler"], m["scheduler"].config.num_train_timesteps
    if not diffusion.is_flow(sched):
        sched.alphas_cumprod = sched.alphas_cumprod.to(device)  # read at every step: moved once
    latent_shape = model.latent_shape(m, cfg["resolution"], cfg["frames"])  # (C, H, W) or (C, F, H, W) for clips
    with torch.no_grad():
        uncond = model.encode_prompts(m, [""], cfg["resolution"])  # (1, 77, D) (SDXL: 78 rows), for guidance
    encode = model.PromptCache(m, 0 if cfg["train_text_encoder"] else cfg["text_cache"],  # frozen: once a prompt
                               cfg["resolution"])
    batches = data.counted(data.micro_batches(ds, cfg, rank, world_size, *data_pos, stream), tallies, data_pos[0],
                           m["tokenizer"], cfg["bad_data"], device)  # what each epoch's data needed, reported
    inversion = (reference or model.net(unet), cfg["inversion_steps"], cfg["inversion_guidance"]) \
        if cfg["noising"] == "ddim_inversion" else None  # Inversion-DPO: by the reference (the policy for MaPO)
    start_step, first_eval = step, None
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, desc="train", dynamic_ncols=True)
    t_last = time.time()
    while True:
        last = step == cfg["max_steps"]
        # once in a while (the last step too): eval + sample grid, then checkpoint
        if step % cfg["eval_every"] == 0 or last:
            if master or fsdp:
                res = run_eval(m, ema or unet, cfg, ds, device, autocast, step)
                first_eval = first_eval or res
            ddp.barrier()
        if (step % cfg["save_every"] == 0 or last) and step > 0 and not (ckpt and step == ckpt["step"]):
            ddp.together(master or fsdp, checkpoint.save_checkpoint, cfg, unet, ema, m["text_encoder"], opt, step,
                         data_pos, pool, tallies, world_size)
        if last:
            break

        # ---------------------------------------------------------------------------------------------------------
        # one optimizer update: the reference (Random Checkpoint Replay), grad_accum micro-steps, then clip and step
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        t_start, stats_sum, prompts = time.time(), {"loss": 0.0}, []
        if pool is not None:  # SSPO.md 4: the policy joins the pool, the reference is redrawn (alike on every rank)
            if cfg["method"] == "sspo" and step > 0 and step % cfg["ckpt_every"] == 0:
                ddp.together(True, pool.push, model.trained_state(unet, cfg), step)
            if ref_step is None or cfg["ref_redraw"] == "step" or step % cfg["ckpt_every"] == 0:
                ref_step = pool.load_into(pool.draw(step if cfg["ref_redraw"] == "step" else
                                                    step - step % cfg["ckpt_every"]), ref_unet)
        for micro in range(cfg["grad_accum"]):
            batch, data_pos = next(batches)
            prompts += batch["prompt"]
            eps, t, drop, x_T, vae_noise, eta_noise, extra = data.step_randomness(
                cfg, step, micro, rank, world_size, (len(batch["prompt"]), *latent_shape), T, stream, device)
            x0_w = model.to_latents(m["vae"], batch, "w", device, vae_noise[0])  # (B, C, H, W)
            ctx = encode(["" if d else p for p, d in zip(batch["prompt"], drop.tolist())])  # (B, 77, D)
            x0_l, judged = None, ({}, {})  # the losers: the data's (pairs), or SSPO's self-samples
            if cfg["method"] in losses.PAIR_METHODS:
                x0_l = model.to_latents(m["vae"], batch, "l", device, vae_noise[1])
            elif cfg["method"] == "sspo":  # the reference draws its own image for each prompt, no caption dropout;
                t0, cond = time.time(), encode(batch["prompt"])  # its final latent is the loser candidate (no
                with autocast:  # decode/encode round trip); the text encoder, as every frozen part, outside autocast
                    x0_l = diffusion.sample(reference, sched, cond, uncond, x_T, cfg["self_sample_steps"],
                                            cfg["self_sample_guidance"], cfg["self_sample_eta"], eta_noise)
                stats_sum["t_sample"] = stats_sum.get("t_sample", 0.0) + time.time() - t0
                judged = judge_self_samples(ds, m, batch, x0_l, device)  # tiny worlds: the log, ssr='oracle'
            with ddp.grad_sync(ddp_unet, micro == cfg["grad_accum"] - 1), autocast:  # on the last micro-step only
                e = diffusion.pair_errors(policy, reference, sched, x0_w, x0_l, eps, t, ctx, uncond, inversion,
                                          cfg["sdpo_mu"] if cfg["sdpo_safeguard"] else None, extra)
                loss, stats = losses.OBJECTIVES[cfg["method"]]({**e, **judged[0]}, cfg)
                loss = loss * float("nan") if checkpoint.fault("nan_loss", kill=False) else loss  # tests' NaN
                (loss / cfg["grad_accum"]).backward()
            ddp.accumulate(stats_sum, {"loss": loss, **stats, **judged[1], **e["logged"]}, cfg["grad_accum"])
        if cfg["train_text_encoder"]:  # DDP averages the UNet's gradients; these we average here
            ddp.average_grads(m["text_encoder"])
        grad_norm = ddp.full(torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf")))
        if ddp.all_finite(stats_sum["loss"], grad_norm, device):  # every rank steps or none does
            opt.step()
            if ema is not None:
                model.ema_update(ema, unet, cfg["ema_decay"])
        else:
            skip_update(cfg, step, stats_sum["loss"], grad_norm, prompts, tallies)
        opt.zero_grad(set_to_none=ddp_unet is unet)  # under DDP, zeroed in place: still the bucket views (freed, the
        # next no_sync micro-steps would accumulate into new tensors, a second copy until the all-reduce)
        stats_sum["t_train"] = time.time() - t_start - stats_sum.get("t_sample", 0.0)  # seconds, this update
        step += 1
        checkpoint.fault("step")
        # ---------------------------------------------------------------------------------------------------------

        bar.update(1)
        if step % cfg["log_every"] == 0 or step == cfg["max_steps"]:
            dt, t_last = (time.time() - t_last) / cfg["log_every"], time.time()
            stats = ddp.log_update(step, stats_sum, lr, grad_norm.item(), dt, world_size, ref_step, device, cfg)
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
    bar.close()
    data.report_data(tallies, data_pos[0], device, partial=True)
    if tallies["skipped_updates"]:
        print0(f"updates skipped for a non-finite loss or gradient: {tallies['skipped_updates']} of {step}")
    lora = f" + {out}/{model.LORA_DIR}/" * model.has_adapters(unet)
    print0(f"done: {out}/ckpt.pt, {out}/{model.denoiser_dir(unet)}/{lora}, {out}/samples/")
    if master and first_eval is not None and "judge_seen" in first_eval:  # the last line: what the run did
        print0(f"judge on seen / held-out prompts: step {start_step} "
               f"{first_eval['judge_seen']:.3f} / {first_eval['judge_heldout']:.3f} -> step {step} "
               f"{res['judge_seen']:.3f} / {res['judge_heldout']:.3f}")
    del ddp_unet  # DDP's reducer holds the process group: free it while every rank is still here
    ddp.teardown()


if __name__ == "__main__":
    try:
        main(config.get_config(sys.argv[1:]))
    except SystemExit as e:  # a one-line error: also the last line of rank 0's log.txt, where the run is read later
        if isinstance(e.code, str):
            ddp.log_line(e.code)
        raise
    except RuntimeError as e:  # a collective failed (a peer died or hangs): one line, then out without cleanup
        ddp.exit_if_collective_failed(e)
        raise
