"""
Train a text-to-image diffusion model (a Stable Diffusion UNet, or the tiny world's pixel-space one) with SFT, and
soon Diffusion-DPO and SSPO (Self-Sampling Preference Optimization, arXiv 2410.05255).

    python train_sspo.py configs/tiny_base.py                     # one process, CPU or one GPU
    torchrun --nproc_per_node=8 train_sspo.py configs/sd15.py      # DDP (nccl on GPU, gloo on CPU)
    python train_sspo.py configs/tiny_base.py --max_steps=50 --out_dir=out/try   # --key=value overrides

Importing this file runs nothing: the loss functions and the config reader are importable for tests and forks.
"""
import ast
import difflib
import math
import os
import shutil
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
import model

# -----------------------------------------------------------------------------------------------------------------
# defaults: every tunable, one per line. A file in configs/ restates only what differs; --key=value beats both.
# I/O
out_dir = "out/run"             # run directory: ckpt.pt, log.txt, samples/, and an SD-layout model folder
init_from = "scratch"           # 'scratch' (random tiny model) | 'resume' (out_dir/ckpt.pt) | SD-layout folder or hub id
eval_every = 200                # optimizer steps between evals (loss, judge, sample grid); the last step always evals
save_every = 200                # optimizer steps between checkpoints; the last step always saves
log_every = 10                  # optimizer steps between log lines
# data
dataset = "tiny"                # 'tiny' (synthetic world, data.py) | 'pickapic' (parquet shards) | 'imagefolder'
data_path = ""                  # parquet file or folder (pickapic); folder with metadata.jsonl (imagefolder)
tiny_mode = "base"              # 'base': draws of the flawed base distribution | 'pairs': judge-ranked pairs
tiny_size = 50_000              # examples in the tiny world's training set (each a pure function of seed and index)
tiny_p_correct = 0.4            # share of flawless images in the base distribution
resolution = 16                 # training image side in pixels (512 for SD1.5)
random_flip = False             # horizontal flips as the peers do for real data; never the tiny world (left/right)
random_crop = False             # random instead of center crop after resizing the short side
caption_dropout = 0.1           # probability of the empty prompt: keeps an unconditional model for guidance
num_workers = 0                 # DataLoader worker processes per rank
# model (init_from='scratch' only: the tiny world's model; an SD model brings its own architecture)
unet_channels = (32, 64)        # block_out_channels; attention at every level but the first
text_dim = 32                   # width of the tiny CLIP text encoder
# method (the loss functions below; 'dpo' and 'sspo' arrive with the checkpoint ring)
method = "sft"                  # 'sft': eps-MSE on image_w (also how the base is pretrained)
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
# sampling (eval grids; the shared DDIM sampler)
sample_steps = 20               # DDIM steps
guidance = 3.0                  # classifier-free guidance scale (SD1.5: 7.5); 1.0 = no guidance, one forward
eta = 0.0                       # DDIM noise: 0 deterministic, 1 DDPM-like
n_eval_images = 8               # images in the sample grid for real data (the tiny world draws all its 48 prompts)
# system
device = "auto"                 # 'auto' (cuda if available) | 'cpu' | 'cuda'
mixed_precision = "bf16"        # 'bf16' autocast on CUDA with fp32 master weights | 'no'. CPU always runs fp32
seed = 0                        # model init, data order, noise: a run is a pure function of its config
# -----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (bool, int, float, str, tuple)}
CHOICES = {"dataset": ("tiny", "pickapic", "imagefolder"), "tiny_mode": ("base", "pairs"), "method": ("sft",),
           "lr_schedule": ("constant", "cosine"), "device": ("auto", "cpu", "cuda"), "mixed_precision": ("bf16", "no")}


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

    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"config error: {arg!r} must be --key=value")
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
            for key, val in scope.items():
                if not key.startswith("_") and type(val) in (bool, int, float, str, tuple, list, dict):
                    put(key, val, arg)
    for key, options in CHOICES.items():
        if cfg[key] not in options:
            raise SystemExit(f"config error: {key}={cfg[key]!r} is not one of {', '.join(map(repr, options))}")
    if cfg["dataset"] != "tiny" and not cfg["data_path"]:
        raise SystemExit(f"config error: dataset={cfg['dataset']!r} needs data_path")
    if cfg["dataset"] != "tiny" and not os.path.exists(cfg["data_path"]):
        raise SystemExit(f"config error: data_path {cfg['data_path']!r} does not exist")
    for key in ("batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every", "sample_steps"):
        if cfg[key] < 1:
            raise SystemExit(f"config error: {key} must be >= 1, got {cfg[key]}")
    return cfg


# -----------------------------------------------------------------------------------------------------------------
# losses: pure functions of per-sample errors (shape (B,), float32 mean over C,H,W); each returns (loss, stats)

def sft_loss(err_w):
    """Supervised fine-tuning: plain eps-MSE on the (winning) images. Also how a base model is pretrained."""
    return err_w.mean(), {}


# -----------------------------------------------------------------------------------------------------------------
# setup and teardown; logging

def setup(cfg):
    """-> (rank, world, device). DDP when torchrun set the environment, else one process."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    want_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("config error: device='cuda' but no CUDA device is visible")
    if ddp:
        dist.init_process_group("nccl" if want_cuda else "gloo")
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


# -----------------------------------------------------------------------------------------------------------------
# data, randomness, learning rate

def make_dataset(cfg):
    if cfg["dataset"] == "tiny":
        return data.TinyWorld(cfg["tiny_mode"], cfg["tiny_size"], cfg["resolution"], cfg["tiny_p_correct"], cfg["seed"])
    cls = data.PickAPic if cfg["dataset"] == "pickapic" else data.ImageFolder
    return cls(cfg["data_path"], cfg["resolution"], cfg["random_crop"], cfg["random_flip"], cfg["seed"])


def micro_batches(ds, cfg, rank, world, epoch, start):
    """Yield (batch, (epoch, index of the next micro-batch)) forever, from micro-batch `start` of `epoch` on.
    DistributedSampler deals rank r the positions r, r + world, ... of one seeded permutation per epoch, so the
    global micro-batch is the same set of examples for any number of processes at a fixed global batch."""
    while True:
        sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=cfg["seed"], drop_last=True)
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        order = list(sampler)[start * cfg["batch_size"]:]  # fast-forward on resume: no batch is loaded twice
        loader = DataLoader(ds, cfg["batch_size"], sampler=order, num_workers=cfg["num_workers"], drop_last=True)
        for i, batch in enumerate(loader, start + 1):
            yield batch, (epoch, i)
        epoch, start = epoch + 1, 0


def step_randomness(cfg, step, micro, rank, world, shape, num_timesteps):
    """Noise, timesteps and caption-dropout draws of one micro-step, a pure function of (seed, step, micro).
    Drawn for the whole global micro-batch and dealt like DistributedSampler deals examples (rank r takes rows
    r, r + world, ...): each example gets the same draws whatever the number of processes, and resume is exact."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg["seed"], step, micro]).generate_state(1)[0]))
    n = world * shape[0]
    eps = torch.randn((n, *shape[1:]), generator=g)[rank::world]
    t = torch.randint(0, num_timesteps, (n,), generator=g)[rank::world]
    drop = (torch.rand(n, generator=g) < cfg["caption_dropout"])[rank::world]
    return eps, t, drop


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
    """Held-out denoising loss (fixed examples, noise and timesteps), samples for the eval prompts from fixed
    noise (the same every eval, so grids are comparable), and for the tiny world the judge's mean score."""
    unet.eval()
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    batch = [ds[i] for i in range(min(cfg["batch_size"], len(ds)))]
    x0 = model.images_to_latents(m["vae"], torch.stack([b["image_w"] for b in batch]).to(device), g)
    eps = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, m["scheduler"].config.num_train_timesteps, (len(batch),), generator=g).to(device)
    ctx = model.encode_prompts(m["tokenizer"], m["text_encoder"], [b["prompt"] for b in batch])
    with autocast:
        loss = model.denoising_error(unet, m["scheduler"].alphas_cumprod, x0, eps, t, ctx).mean().item()
    prompts = eval_prompts(cfg, ds)
    cond = model.encode_prompts(m["tokenizer"], m["text_encoder"], prompts)
    uncond = model.encode_prompts(m["tokenizer"], m["text_encoder"], [""])
    noise = torch.randn((len(prompts), *x0.shape[1:]), generator=g).to(device)
    with autocast:
        x = model.ddim_sample(unet, m["scheduler"], cond, uncond, noise, cfg["sample_steps"], cfg["guidance"], cfg["eta"], g)
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


def save_checkpoint(cfg, unet, opt, step, data_pos):
    """ckpt.pt: everything to resume exactly; unet/: the same weights for StableDiffusionPipeline. Each written
    under a temporary name and renamed, so a crash mid-write leaves the previous one intact."""
    ckpt = {"unet": unet.state_dict(), "optimizer": opt.state_dict(), "step": step, "data_pos": data_pos,
            "rng": torch.get_rng_state(), "config": cfg}
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)
    final, tmp, old = (os.path.join(cfg["out_dir"], d) for d in ("unet", "unet.tmp", "unet.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------------------------------------------

def main(cfg):
    global _log_file
    rank, world, device = setup(cfg)
    master = rank == 0
    out = cfg["out_dir"]
    resume = cfg["init_from"] == "resume"
    ckpt_path = os.path.join(out, "ckpt.pt")
    if resume and not os.path.isfile(ckpt_path):
        raise SystemExit(f"init_from='resume' but {ckpt_path} does not exist")
    if not resume and os.path.isfile(ckpt_path):
        raise SystemExit(f"{out} already holds a run ({ckpt_path}); resume it with --init_from=resume or choose "
                         "another out_dir (nothing is overwritten)")
    torch.manual_seed(cfg["seed"])
    try:  # bad input is a one-line error before any work: data first (seconds), then the model
        ds = make_dataset(cfg)
        if cfg["init_from"] not in ("scratch", "resume"):
            model.check_model_path(cfg["init_from"])
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    if master:
        os.makedirs(out, exist_ok=True)
        _log_file = open(os.path.join(out, "log.txt"), "a")
        if cfg["init_from"] == "scratch":
            model.build_tiny_model(out, data.WORDS, cfg["resolution"], cfg["unet_channels"], cfg["text_dim"],
                                   seed=cfg["seed"])
    barrier()
    use_bf16 = device.type == "cuda" and cfg["mixed_precision"] == "bf16"
    # the run directory is an SD-layout model folder: scratch and resume load from it, a model path from itself
    m = model.load_model(out if cfg["init_from"] in ("scratch", "resume") else cfg["init_from"], device,
                         torch.bfloat16 if use_bf16 else torch.float32)
    if master and cfg["init_from"] not in ("scratch", "resume"):
        model.save_frozen_parts(m, out)
    unet = m["unet"].train()
    if cfg["grad_checkpointing"]:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                            weight_decay=cfg["weight_decay"])
    step, data_pos = 0, (0, 0)
    if resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        unet.load_state_dict(ckpt["unet"])
        opt.load_state_dict(ckpt["optimizer"])
        step, data_pos = ckpt["step"], tuple(ckpt["data_pos"])
        torch.set_rng_state(ckpt["rng"])
        changed = {k: (ckpt["config"].get(k), v) for k, v in cfg.items()
                   if ckpt["config"].get(k) != v and k != "init_from"}
        print0(f"resuming {ckpt_path} at step {step}" + (f"; config changed since: {changed}" if changed else ""))
    ddp_unet = DDP(unet, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else unet
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    abar = m["scheduler"].alphas_cumprod.to(device)
    T = m["scheduler"].config.num_train_timesteps

    print0("config:", {k: v for k, v in cfg.items()})
    print0(f"{world} process(es) on {device}, bf16 autocast: {use_bf16}; UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M "
           f"params; effective batch {cfg['batch_size'] * cfg['grad_accum'] * world}; {len(ds)} examples")
    if master and cfg["dataset"] == "tiny":  # what the judge gives the data itself: the ceiling and the base
        rng = np.random.default_rng(cfg["seed"])
        correct = np.mean([data.judge(data.render(c, cfg["resolution"], rng), data.prompt_of(c))[0] for c in data.ALL_COMBOS])
        drawn = np.mean([data.judge(data.to_uint8(ds[i]["image_w"]), ds[i]["prompt"])[0] for i in range(256)])
        print0(f"judge of the data: correct renders {correct:.3f}, training images ({cfg['tiny_mode']}) {drawn:.3f}")
    if master:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)

    batches = micro_batches(ds, cfg, rank, world, *data_pos)
    start_step = step
    first_eval = None
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, desc="train", dynamic_ncols=True)
    t_last = time.time()
    while True:
        last = step == cfg["max_steps"]
        # once in a while (the last step too): eval + sample grid, then checkpoint
        if step % cfg["eval_every"] == 0 or last:
            if master:
                res, images, prompts, labels = run_eval(m, unet, cfg, ds, device, autocast)
                first_eval = first_eval or res
                print0(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
                data.save_grid(images, os.path.join(out, "samples", f"step{step:06d}.png"), labels)
                with open(os.path.join(out, "samples", "prompts.txt"), "w") as f:
                    f.write("\n".join(prompts) + "\n")
            barrier()
        if (step % cfg["save_every"] == 0 or last) and step > 0 and not (resume and step == ckpt["step"]):
            if master:
                save_checkpoint(cfg, unet, opt, step, data_pos)
            barrier()
        if last:
            break

        # ---------------------------------------------------------------------------------------------------------
        # one optimizer update: grad_accum micro-steps of the loss, then clip and step
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        stats_sum = {"loss": 0.0}
        for micro in range(cfg["grad_accum"]):
            batch, data_pos = next(batches)
            x0_w = model.images_to_latents(m["vae"], batch["image_w"].to(device))  # (B, C, H, W)
            eps, t, drop = step_randomness(cfg, step, micro, rank, world, x0_w.shape, T)
            eps, t = eps.to(device), t.to(device)
            prompts = ["" if d else p for p, d in zip(batch["prompt"], drop.tolist())]
            ctx = model.encode_prompts(m["tokenizer"], m["text_encoder"], prompts)  # (B, 77, D)
            # DDP syncs gradients on the last micro-step only
            sync = nullcontext() if world == 1 or micro == cfg["grad_accum"] - 1 else ddp_unet.no_sync()
            with sync, autocast:
                err_w = model.denoising_error(ddp_unet, abar, x0_w, eps, t, ctx)
                # the preference losses (dpo, sspo) go here, on the same (eps, t) draw
                loss, stats = sft_loss(err_w)
                (loss / cfg["grad_accum"]).backward()
            stats_sum["loss"] += loss.item() / cfg["grad_accum"]
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) / cfg["grad_accum"]
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg["grad_clip"] or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        # ---------------------------------------------------------------------------------------------------------

        bar.update(1)
        if step % cfg["log_every"] == 0 or step == cfg["max_steps"]:
            stats = all_mean(stats_sum, device)
            dt = (time.time() - t_last) / cfg["log_every"]
            t_last = time.time()
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
            print0(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()) +
                   f", lr {lr:.2e}, grad_norm {grad_norm.item():.3f}, {dt:.2f} s/step, "
                   f"{cfg['batch_size'] * cfg['grad_accum'] * world / dt:.0f} samples/s")
    bar.close()
    if master and cfg["dataset"] == "tiny" and first_eval is not None:
        print0(f"judge on seen / held-out prompts: step {start_step} "
               f"{first_eval['judge_seen']:.3f} / {first_eval['judge_heldout']:.3f} -> step {step} "
               f"{res['judge_seen']:.3f} / {res['judge_heldout']:.3f}")
    print0(f"done: {out}/ckpt.pt, {out}/unet/, samples in {out}/samples/")
    teardown()


if __name__ == "__main__":
    main(get_config(sys.argv[1:]))
