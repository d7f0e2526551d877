"""
Where a training step's time goes, per method, and how far SSPO is from its floor.

    python -m dev.bench                           # the tiny world (configs/tiny.py, its base's width) on CPU: minutes
    python -m dev.bench --sd15                    # the SD1.5-shaped UNet (random weights, configs/sd15.py) on one GPU
    python -m dev.bench --sd15 --compile          # the same with torch.compile'd UNets (compile time printed apart)
    python -m dev.bench --sd15 --compile regional # each ResNet and transformer block compiled apart (compiles faster)
    python -m dev.bench --sd15 --profile          # where the time goes: wall against kernels, the top kernels
    python -m dev.bench --sd15 --latents          # steps read precomputed VAE latents, as with latent_cache (latents.py)
    python -m dev.bench --sd15 --resolution 64    # on CPU: a smoke run of the SD1.5 code path at 8x8 latents

A step here is one micro-batch of `batch_size`, made by the same calls as train_sspo.py's update (model.py's
encoders, diffusion.py's sampler and pair_errors, data.py's randomness, losses.py's objective), split into phases:
data (load + host-to-device), encode (text encoder, VAE), sample (SSPO's self-sampling), policy (forward +
backward), ref (reference forwards), opt (clip + AdamW, amortized over grad_accum) and swap (snapshot push and
load, amortized over the ckpt_every x grad_accum micro-batches of a stretch). On a GPU each phase ends with a
torch.cuda.synchronize: a few microseconds each, but the phases add up to the step. Medians over --iters.

SSPO's floor = (measured DPO step) + K x (measured guided reference forward): the same step as Diffusion-DPO plus
K sampler steps, each one forward of the reference on cond and uncond batched (2B; B at guidance 1). Anything above
is overhead. FLOPs are counted from the models (torch.utils.flop_counter on one step of each method; model FLOPs,
so neither gradient checkpointing's recompute nor attention's recompute of its scores in the backward is counted),
and utilization is against a big matmul timed on the same device.
Nothing here changes training: the variants (two forwards, classic attention, channels_last, fp32, compile) are
built here and put back.
"""
import argparse
import copy
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop
from transformers import CLIPTextConfig, CLIPTextModel

import config
import data
import diffusion
import losses
import model
import replay
from tiny import world
from tiny.build import build_tiny_model, build_tokenizer

# SD1.5's UNet (stable-diffusion-v1-5/unet/config.json), written out so nothing is downloaded; the rest default
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=512)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def _as_raw(formula):  # torch's registered formulas already take raw arguments; tell FlopCounterMode so
    def f(*args, **kwargs):
        return formula(*args, **kwargs)
    f._get_raw = True
    return f


def _sdpa_backward_model_flops(grad_out, query, key, value, *args, **kwargs):
    """torch counts attention's backward as its kernels run it: 5 matmuls, one of them recomputing the scores
    q @ k^T. Model FLOPs (as for gradient checkpointing's recompute) count the 4 of the backward proper."""
    b, h, s_q, d = query.shape
    return sdpa_backward_flop(grad_out, query, key, value, *args, **kwargs) - 2 * b * h * s_q * d * key.shape[2]


# torch's counter knows the CUDA attention kernels; the CPU one has the same cost. Backward: model FLOPs.
aten = torch.ops.aten
SDPA_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _as_raw(sdpa_flop),
              **{op: _as_raw(_sdpa_backward_model_flops) for op in (
                  aten._scaled_dot_product_flash_attention_for_cpu_backward,
                  aten._scaled_dot_product_flash_attention_backward,
                  aten._scaled_dot_product_efficient_attention_backward,
                  aten._scaled_dot_product_cudnn_attention_backward)}}
TARGETS_CPU = {"sspo step / floor": 1.15, "snapshot swap / sspo step": 0.02}  # at most
TARGETS_GPU = {"sft": 0.45, "dpo": 0.40, "self-sampling": 0.40}  # at least, of the bf16 matmul peak
# config keys that change a training step but that the step timed here does not apply: refused, not ignored
NOT_TIMED = {"compile_unet": "pass --compile instead", "ema_decay": "the EMA update is not timed",
             "train_text_encoder": "the text encoder's backward is not timed",
             "noising": "only the forward process's noising is timed", "sdpo_safeguard": "its lambda is not timed"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device, warmup, iters):
    """Median seconds of fn() over iters calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device, warmup, iters):
    """Measured dense matmul rate in FLOP/s: bf16 8192^3 on a GPU, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / time_it(lambda: a @ b, device, max(warmup, 1), max(iters, 3))


# -----------------------------------------------------------------------------------------------------------------
# the pieces: the config's tiny world model, or an SD1.5-shaped one with random weights

def sd15_parts(device, tmp):
    """SD1.5's UNet, VAE, text encoder (random weights) and scheduler; our small CLIPTokenizer (written to tmp)."""
    with torch.device(device):
        m = {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD15_VAE),
             "tokenizer": build_tokenizer(world.WORDS, os.path.join(tmp, "tokenizer")),
             "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT))}
    m["scheduler"] = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # SD1.5's
    return m


def write_sd15(out, n_rows=32):
    """--write_sd15 DIR: the random SD1.5-shaped model as a diffusers folder, and DIR/train/shard.parquet with
    n_rows Pick-a-Pic rows of random 512 px JPEGs, so that the real loop runs on a GPU with nothing downloaded:
    torchrun --nproc_per_node=1 train_sspo.py configs/sd15.py --init_from=DIR --data_path=DIR/train ..."""
    import io
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    torch.manual_seed(0)
    m = sd15_parts("cpu", out)
    m["unet"].save_pretrained(os.path.join(out, "unet"))
    model.save_frozen_parts(m, out)
    rng = np.random.default_rng(0)
    def jpeg():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()
    prompts = [world.prompt_of(c) for c in world.ALL_COMBOS]
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    pq.write_table(pa.table({"caption": [prompts[i % len(prompts)] for i in range(n_rows)],
                             "jpg_0": pa.array([jpeg() for _ in range(n_rows)], pa.binary()),
                             "jpg_1": pa.array([jpeg() for _ in range(n_rows)], pa.binary()),
                             "label_0": [float(i % 2) for i in range(n_rows)]}), os.path.join(out, "train", "shard.parquet"))
    print(f"wrote {out}: SD1.5-shaped model (random weights) and train/shard.parquet ({n_rows} random pairs)")


def build(cfg, sd15, device, tmp, from_cache=False):
    """-> P, everything a step needs: the model parts (model.load_model's dict), policy, reference, optimizer,
    reference pool, a batch source and the shapes. from_cache: the batches carry the VAE encoder's moments, as
    latents.py stores them and a latent_cache run's workers hand them over, instead of images."""
    use_bf16 = device.type == "cuda" and cfg["mixed_precision"] != "no"
    frozen = torch.bfloat16 if use_bf16 else torch.float32
    if sd15:
        torch.manual_seed(cfg["seed"])
        m = sd15_parts(device, tmp)
        for k in ("text_encoder", "vae"):
            m[k].to(dtype=frozen).eval().requires_grad_(False)
    else:
        build_tiny_model(tmp, world.WORDS, cfg["resolution"], cfg["unet_channels"], cfg["text_dim"],
                               seed=cfg["seed"], schedule=cfg["noise_schedule"])
        m = model.load_model(tmp, device, frozen)
    unet = m["unet"].train()
    if cfg["grad_checkpointing"]:
        unet.enable_gradient_checkpointing()
    ref_dtype = torch.bfloat16 if cfg["ref_dtype"] == "bfloat16" else torch.float32
    ref_unet = model.reference(unet, ref_dtype)
    for u in (unet, ref_unet) if cfg["channels_last"] else ():  # as train_sspo.main
        u.to(memory_format=torch.channels_last)
    pool = replay.ReferencePool(unet.state_dict(), "uniform", 0, cfg["pool_storage"], os.path.join(tmp, "pool"),
                                cfg["seed"], ref_dtype)
    pool.push(unet.state_dict(), 1)  # two snapshots to swap between
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=True)
    shape = model.latent_shape(m, cfg["resolution"])
    B = cfg["batch_size"]
    if sd15:  # random images made once: the data phase is the host-to-device copy (the loop's workers decode ahead)
        prompts = [world.prompt_of(c) for c in world.ALL_COMBOS]
        images = torch.rand(2, 2, B, 3, cfg["resolution"], cfg["resolution"]) * 2 - 1  # (2 batches, w/l, B, 3, R, R)
        key = "latent" if from_cache else "image"
        if from_cache:  # (2, 2, B, 2C, R/8, R/8) in the VAE's dtype, on the host like the workers' output
            with torch.no_grad():
                images = torch.stack([torch.stack([model.encode_moments(m["vae"], x.to(device)).cpu() for x in wl])
                                      for wl in images])
        def batches():
            for i in itertools.count():
                yield {"prompt": [prompts[(i * B + j) % len(prompts)] for j in range(B)],
                       f"{key}_w": images[i % 2, 0], f"{key}_l": images[i % 2, 1]}, None
        batch_iter = batches()
    else:  # the real tiny world, pairs so that DPO has losers
        ds = data.make_dataset(cfg)
        if len(ds) < B:
            raise SystemExit(f"bench error: the dataset has {len(ds)} examples, fewer than one micro-batch of {B}")
        batch_iter = data.micro_batches(ds, cfg, 0, 1, 0, 0)
    with torch.no_grad():
        uncond = model.encode_prompts(m, [""])
    encode = model.PromptCache(m, cfg["text_cache"])  # as train_sspo.py's loop
    m["scheduler"].alphas_cumprod = m["scheduler"].alphas_cumprod.to(device)
    return dict(m=m, unet=unet, ref_unet=ref_unet, pool=pool, opt=opt, batches=batch_iter, shape=shape, B=B, encode=encode, tmp=tmp,
                uncond=uncond, sched=m["scheduler"], device=device,
                autocast=torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16_autocast(cfg, device)
                else nullcontext())


# -----------------------------------------------------------------------------------------------------------------
# one step, as train_sspo.py's loop does it (one micro-step, then the update)

def train_step(method, P, cfg, lap, step=0):
    """One micro-batch of `method` and an optimizer update, as train_sspo.py's update makes it (the same calls:
    step_randomness, the self-sample, diffusion.pair_errors, the objective); lap(name) closes a phase. The reference
    network is wrapped so that its forward is a phase of its own."""
    m, dev, B, T = P["m"], P["device"], P["B"], P["m"]["scheduler"].config.num_train_timesteps
    batch, _ = next(P["batches"])
    eps, t, drop, x_T, vae_noise, eta_noise, _ = data.step_randomness({**cfg, "method": method}, step, 0, 0, 1,
                                                                         (B, *P["shape"]), T, device=dev)
    # images (or, with --latents, the VAE's moments) of the winners, and of the losers for DPO
    on_dev = {k: v.to(dev) for k, v in batch.items() if k.endswith("_w") or (method == "dpo" and k.endswith("_l"))}
    lap("data")
    x0_w = model.to_latents(m["vae"], on_dev, "w", dev, vae_noise[0])
    ctx = P["encode"](["" if d else p for p, d in zip(batch["prompt"], drop.tolist())])
    x0_l = model.to_latents(m["vae"], on_dev, "l", dev, vae_noise[1]) if method == "dpo" else None
    cond = P["encode"](batch["prompt"]) if method == "sspo" else None
    lap("encode")
    ref_net = model.net(P["ref_unet"])

    def reference(*args):  # the policy's forward came before it
        lap("policy")
        out = ref_net(*args)
        lap("ref")
        return out
    if method == "sspo":
        with P["autocast"]:
            x0_l = diffusion.ddim_sample(ref_net, m["scheduler"], cond, P["uncond"], x_T, cfg["self_sample_steps"],
                                         cfg["self_sample_guidance"], cfg["self_sample_eta"], eta_noise)
        lap("sample")
    with P["autocast"]:
        e = diffusion.pair_errors(model.net(P["unet"]), None if method == "sft" else reference, P["sched"], x0_w, x0_l,
                                  eps, t, ctx)
        loss, _ = losses.OBJECTIVES[method](e, cfg)
        loss.backward()
    lap("policy")
    torch.nn.utils.clip_grad_norm_(P["unet"].parameters(), cfg["grad_clip"] or float("inf"))
    P["opt"].step()
    P["opt"].zero_grad(set_to_none=False)  # kept, zeroed in place: as DDP's buckets or grad_accum > 1 hold them
    lap("opt")


def time_step(method, P, cfg, warmup, iters):
    """-> {phase: median seconds} over iters steps after warmup steps."""
    runs = []
    for i in range(warmup + iters):
        phases = {}
        sync(P["device"])
        last = [time.perf_counter()]

        def lap(name):
            sync(P["device"])
            now = time.perf_counter()
            phases[name] = phases.get(name, 0.0) + now - last[0]
            last[0] = now
        train_step(method, P, cfg, lap, step=i)
        if i >= warmup:
            runs.append(phases)
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def count_flops(method, P, cfg):
    """-> {phase: FLOPs} of one step, counted by torch's dispatcher (model FLOPs: no checkpoint recompute)."""
    if cfg["grad_checkpointing"]:
        P["unet"].disable_gradient_checkpointing()
    counts = {}
    with FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as fc:
        last = [0]

        def lap(name):
            now = fc.get_total_flops()
            counts[name] = counts.get(name, 0) + now - last[0]
            last[0] = now
        train_step(method, P, cfg, lap)
    if cfg["grad_checkpointing"]:
        P["unet"].enable_gradient_checkpointing()
    return counts


# -----------------------------------------------------------------------------------------------------------------
# the fast-path variants, each measured before and after on the same pieces

def guided_inputs(P, cfg, B=None):
    B, dev = B or P["B"], P["device"]
    dtype = next(P["ref_unet"].parameters()).dtype
    x = torch.randn(B, *P["shape"], device=dev)
    ctx = torch.randn(B, 77, P["uncond"].shape[-1], device=dev, dtype=dtype)
    context = torch.cat([P["uncond"].expand(B, -1, -1).to(dtype), ctx])
    return x, ctx, context, torch.tensor(500, device=dev), dtype


def guided_forward(P, cfg, batched=True, autocast=None, B=None):
    """One sampler step's UNet work: cond and uncond in one forward of 2B (ddim_sample), or two of B; at guidance
    1.0 one forward of B on the prompts alone, as ddim_sample then runs."""
    x, ctx, context, t, dtype = guided_inputs(P, cfg, B)
    B, ref = x.shape[0], P["ref_unet"]

    @torch.no_grad()
    def fn():
        with autocast or P["autocast"]:
            if cfg["self_sample_guidance"] == 1.0:
                return ref(x.to(dtype), t, encoder_hidden_states=ctx).sample
            if batched:
                return ref(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=context).sample
            ref(x.to(dtype), t, encoder_hidden_states=context[:B]).sample
            return ref(x.to(dtype), t, encoder_hidden_states=ctx).sample
    return fn


def policy_fwd_bwd(P, cfg, memory_format=torch.contiguous_format, autocast=None, B=None):
    """The policy's forward + backward on a DPO-shaped batch (2B)."""
    B2, dev = 2 * (B or P["B"]), P["device"]
    x0 = torch.randn(B2, *P["shape"], device=dev).contiguous(memory_format=memory_format)
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (B2,), device=dev)
    ctx = torch.randn(B2, 77, P["uncond"].shape[-1], device=dev)

    def fn():
        with autocast or P["autocast"]:
            diffusion.denoising_error(model.net(P["unet"]), P["sched"], x0, eps, t, ctx).mean().backward()
        P["unet"].zero_grad(set_to_none=True)
    return fn


def variants(P, cfg, args):
    """-> list of (what, before s, after s, note), each measured on the pieces in P and put back after."""
    dev, w, n = P["device"], args.warmup, args.iters
    out = []
    one, two = (time_it(guided_forward(P, cfg, b), dev, w, n) for b in (True, False))
    out.append(("sampler step: two forwards of B -> cond+uncond in one of 2B", two, one, "diffusion.ddim_sample"))
    unet = P["unet"]
    procs = unet.attn_processors  # diffusers' default is AttnProcessor2_0: F.scaled_dot_product_attention
    in_use = ", ".join(sorted({type(p).__name__ for p in procs.values()}))
    def timed_or_oom(fn):  # -> (seconds, note): a variant that does not fit in GPU memory is reported, not fatal
        try:
            return time_it(fn, dev, w, n), ""
        except torch.OutOfMemoryError:
            unet.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return float("nan"), f"; before: out of GPU memory at batch {P['B']}"
    base = time_it(policy_fwd_bwd(P, cfg), dev, w, n)
    unet.set_attn_processor(AttnProcessor())
    classic, oom = timed_or_oom(policy_fwd_bwd(P, cfg))  # classic attention holds (2B x heads x 4096^2) scores
    unet.set_attn_processor(procs)  # (it empties the dict it is given)
    out.append(("attention: classic AttnProcessor -> SDPA", classic, base, f"in use: {in_use}{oom}"))
    def fwd_bwd_with_checkpointing(on):  # -> (seconds, peak GPU GiB or None, OOM note)
        (unet.enable_gradient_checkpointing if on else unet.disable_gradient_checkpointing)()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        s, oom = timed_or_oom(policy_fwd_bwd(P, cfg))
        return s, torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None, oom
    (ckpt_s, ckpt_mem, ckpt_oom), (none_s, none_mem, none_oom) = (fwd_bwd_with_checkpointing(on) for on in (True, False))
    (unet.enable_gradient_checkpointing if cfg["grad_checkpointing"] else unet.disable_gradient_checkpointing)()
    fits = ckpt_mem is not None and not ckpt_oom and not none_oom
    mem = f"; peak GPU memory {ckpt_mem:.1f} -> {none_mem:.1f} GiB" if fits else ""
    out.append(("policy fwd+bwd: gradient checkpointing -> none", ckpt_s, none_s, f"grad_checkpointing = "
                f"{cfg['grad_checkpointing']}{mem}{ckpt_oom}{none_oom.replace('before', 'none')}"))
    if dev.type == "cuda":
        out += gpu_variants(P, cfg, w, n)
    unet.to(memory_format=torch.contiguous_format)
    contiguous = time_it(policy_fwd_bwd(P, cfg), dev, w, n) if cfg["channels_last"] else base
    unet.to(memory_format=torch.channels_last)
    cl = time_it(policy_fwd_bwd(P, cfg, torch.channels_last), dev, w, n)
    unet.to(memory_format=torch.channels_last if cfg["channels_last"] else torch.contiguous_format)
    out.append(("policy fwd+bwd: contiguous -> channels_last", contiguous, cl,
                "in use: channels_last = True" if cfg["channels_last"] else "opt-in: channels_last = True"))
    if dev.type == "cuda":
        fp32, oom = timed_or_oom(policy_fwd_bwd(P, cfg, autocast=nullcontext()))
        out.append(("policy fwd+bwd: fp32 (tf32) -> bf16 autocast", fp32, base, f"mixed_precision = 'bf16'{oom}"))
    else:  # fp32 against bf16 autocast with every model fp32 (mixed_precision = 'bf16_cpu', configs/tiny.py)
        cpu_bf16, fp32 = torch.autocast("cpu", dtype=torch.bfloat16), nullcontext()
        note = f"mixed_precision = {cfg['mixed_precision']!r}"
        out.append(("guided forward: fp32 -> bf16 autocast (CPU)", time_it(guided_forward(P, cfg, autocast=fp32), dev, w, n),
                    time_it(guided_forward(P, cfg, autocast=cpu_bf16), dev, w, n), note))
        out.append(("policy fwd+bwd: fp32 -> bf16 autocast (CPU)", time_it(policy_fwd_bwd(P, cfg, autocast=fp32), dev, w, n),
                    time_it(policy_fwd_bwd(P, cfg, autocast=cpu_bf16), dev, w, n), note))
    prompts = [world.prompt_of(c) for c in world.ALL_COMBOS[:P["B"]]]
    cache = model.PromptCache(P["m"], len(prompts))
    cache(prompts)
    every = time_it(lambda: model.encode_prompts(P["m"], prompts), dev, w, n)
    out.append(("text encoder per micro-batch -> cached prompts", every, time_it(lambda: cache(prompts), dev, w, n),
                f"text_cache = {cfg['text_cache']}" + (" (off: encode includes the text encoder)" * (not cfg["text_cache"]))))
    vae = P["m"]["vae"]
    if vae is not None:  # latents.py: the encoder's output stored once; the loader's workers read it back
        images = torch.rand(P["B"], 3, cfg["resolution"], cfg["resolution"]) * 2 - 1  # on the host, as from the workers
        noise = torch.randn((P["B"], *P["shape"]))
        folder = os.path.join(P["tmp"], "latents")
        with torch.no_grad():
            moments = model.encode_moments(vae, images.to(dev)).cpu()
        data.write_meta(folder, {"examples": P["B"], "images": 1, "vae_dtype": str(vae.dtype).removeprefix("torch.")})
        data.write_shard(folder, 0, moments[:, None, None], {"prompt": ["a prompt"] * P["B"]})
        ds = data.CachedLatents(folder)
        read = lambda: torch.utils.data.default_collate([ds[i] for i in range(P["B"])])["latent_w"]
        t_read = time_it(read, torch.device("cpu"), w, n)
        cached = read()
        with torch.no_grad():
            enc = time_it(lambda: model.images_to_latents(vae, images.to(dev), noise), dev, w, n)
            lat = time_it(lambda: model.sample_latents(vae, cached.to(dev), noise), dev, w, n)
        out.append((f"VAE: encode {P['B']} images -> latent cache (latents.py)", enc, lat,
                    f"latent_cache; the workers' read {t_read * 1e3:.1f} ms (page cache)"))
    pool, ref = P["pool"], P["ref_unet"]
    swap = time_it(lambda: pool.load_into(1, ref), dev, w, n)
    def rebuild():
        new = copy.deepcopy(unet).to(ref.dtype).eval().requires_grad_(False)
        pool.load_into(1, new)
    out.append(("snapshot swap: new module -> in-place copy (replay.load_into)", time_it(rebuild, dev, 0, n), swap, ""))
    return out


def profile(fn, device, top=8):
    """One fn() after a warmup call, under torch.profiler -> (seconds in kernels, kernel launches, the `top` kernels
    as (name, seconds, calls)). On a GPU: the device's own events (a kernel's time is also copied onto the CPU op that
    launched it); on CPU: the aten ops' self time. Against fn's wall time, near 1 the kernels are the limit (fusion,
    compile); well below, the host's launching is (CUDA graphs)."""
    fn()
    acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * (device.type == "cuda")
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        sync(device)
    if device.type == "cuda":
        events = [(e.key, e.self_device_time_total / 1e6, e.count) for e in prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        events = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages() if e.key.startswith("aten::")]
    events.sort(key=lambda e: -e[1])
    return sum(e[1] for e in events), sum(e[2] for e in events), events[:top]


def kernel_seconds(fn, device):
    """Seconds the GPU spends in kernels during one fn() after a warmup call (profile()); 0 on CPU."""
    return profile(fn, device)[0] if device.type == "cuda" else 0.0


def print_profiles(P, cfg, args):
    """--profile: wall time against the kernels' own time and the top kernels, for the sampler's guided forward and
    the policy's forward + backward, at the config's batch and at batch 1: what does not grow with the batch is the
    host's (launches, Python) or a kernel's fixed cost."""
    dev = P["device"]
    print("\nprofile (torch.profiler, one call after a warmup; wall: median of --iters)")
    for b in sorted({P["B"], 1}, reverse=True):
        for what, fn in (("guided forward", guided_forward(P, cfg, B=b)), ("policy fwd+bwd", policy_fwd_bwd(P, cfg, B=b))):
            wall = time_it(fn, dev, args.warmup, args.iters)
            busy, launches, top = profile(fn, dev)
            print(f"  {what}, batch {b}: wall {wall * 1e3:.1f} ms, {'kernels' if dev.type == 'cuda' else 'ops'} "
                  f"{busy * 1e3:.1f} ms ({busy / wall:.0%} of the wall) in {launches} launches")
            for name, sec, calls in top:
                print(f"      {sec * 1e3:8.2f} ms {calls:6d}x  {name[:90]}")


def gpu_variants(P, cfg, w, n):
    """Rows that only a GPU can tell (here so that a CPU test runs them too); none is used in training yet.
    Wall time against the kernels' own time: what the host's launching costs. cuDNN's benchmark mode times its
    convolution algorithms once per input shape and keeps the fastest. A bf16 reference under autocast still runs
    GroupNorm in float32 (autocast's float32 list), a float32 round trip of every normalized activation; without
    autocast it stays bf16 throughout."""
    dev, rows = P["device"], []
    for what, fn in (("guided forward", guided_forward(P, cfg)), ("policy fwd+bwd", policy_fwd_bwd(P, cfg))):
        heuristic = time_it(fn, dev, w, n)
        rows.append((f"{what}: wall -> GPU kernels alone", heuristic, kernel_seconds(fn, dev),
                     "the difference is host time: launches, Python"))
        was, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
        try:
            tuned = time_it(fn, dev, w + 1, n)
        finally:
            torch.backends.cudnn.benchmark = was
        rows.append((f"{what}: cuDNN's heuristics -> cudnn.benchmark", heuristic, tuned, "not in training yet"))
    if cfg["ref_dtype"] == "bfloat16":
        rows.append(("guided forward, bf16 reference: autocast -> none", time_it(guided_forward(P, cfg), dev, w, n),
                     time_it(guided_forward(P, cfg, autocast=nullcontext()), dev, w, n), "not in training yet"))
    return rows


def short_run(P, cfg, steps, autocast):
    """`steps` AdamW updates of the policy from its current weights on seeded SFT-shaped batches (B) -> the weights
    it ends with (a copy; the policy is put back). The comparison behind making a fast path the default."""
    unet, dev, B = P["unet"], P["device"], P["B"]
    start = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=True)
    g = torch.Generator(dev).manual_seed(cfg["seed"])
    for _ in range(steps):
        x0 = torch.randn(B, *P["shape"], device=dev, generator=g)
        eps = torch.randn(x0.shape, device=dev, generator=g)
        t = torch.randint(0, 1000, (B,), device=dev, generator=g)
        ctx = torch.randn(B, 77, P["uncond"].shape[-1], device=dev, generator=g)
        with autocast:
            diffusion.denoising_error(model.net(unet), P["sched"], x0, eps, t, ctx).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    end = [p.detach().clone() for p in unet.parameters()]
    unet.load_state_dict(start)
    return [start[k] for k, _ in unet.named_parameters()], end


def distance(a, b):
    return math.sqrt(sum((x.double() - y.double()).pow(2).sum().item() for x, y in zip(a, b)))


def bench_compile(P, cfg, args, steps=5):
    """torch.compile both UNets in place as compile_unet does (model.speed_up) -> (rows like variants(), compile
    seconds, check): the eager and compiled times, and a short run's weights compiled against eager, set beside
    the difference bf16 autocast itself makes (eager fp32 against eager bf16): compile is within bf16's tolerance
    when its difference is not larger."""
    dev, w, n = P["device"], args.warmup, args.iters
    fwd_eager = time_it(guided_forward(P, cfg), dev, w, n)
    fb_eager = time_it(policy_fwd_bwd(P, cfg), dev, w, n)
    start, eager = short_run(P, cfg, steps, P["autocast"])
    _, fp32 = short_run(P, cfg, steps, nullcontext())
    t0 = time.perf_counter()
    model.speed_up([P["unet"], P["ref_unet"]], compile_unet=args.compile)
    guided_forward(P, cfg)()
    policy_fwd_bwd(P, cfg)()
    sync(dev)
    t_compile = time.perf_counter() - t0
    _, compiled = short_run(P, cfg, steps, P["autocast"])
    moved = distance(eager, start)
    check = {"short run: compiled vs eager": distance(compiled, eager) / moved,
             "short run: fp32 vs bf16 autocast": distance(fp32, eager) / moved}
    how = f"torch.compile ({args.compile})"
    return [(f"guided forward: eager -> {how}", fwd_eager, time_it(guided_forward(P, cfg), dev, w, n), ""),
            (f"policy fwd+bwd: eager -> {how}", fb_eager, time_it(policy_fwd_bwd(P, cfg), dev, w, n), "")], t_compile, check


# -----------------------------------------------------------------------------------------------------------------

def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="", help="a configs/ file (default: configs/tiny.py, or configs/sd15.py with --sd15)")
    ap.add_argument("--sd15", action="store_true", help="SD1.5-shaped UNet, VAE and text encoder with random weights")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per measurement (medians)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--batch_size", type=int, default=0, help="per-device micro-batch (default: the config's)")
    ap.add_argument("--resolution", type=int, default=0, help="image side (default: the config's)")
    ap.add_argument("--compile", nargs="?", const="whole", default="", choices=("whole", "regional"),
                    help="also torch.compile the UNets and time them compiled: whole (the default) or regional "
                    "(each ResNet and transformer block apart: compiles faster)")
    ap.add_argument("--methods", default="sft,dpo,sspo", help="comma-separated; the floor needs dpo and sspo")
    ap.add_argument("--latents", action="store_true", help="steps read the VAE's moments, as a run with latent_cache "
                    "does (latents.py), instead of encoding images (--sd15: the tiny world has no VAE)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override, as train_sspo.py takes it (e.g. --set grad_checkpointing=False); repeatable")
    ap.add_argument("--no_variants", action="store_true", help="skip the fast-path before/after table")
    ap.add_argument("--profile", action="store_true", help="wall against kernel time and the top kernels of the "
                    "guided forward and the policy fwd+bwd, at the config's batch and at batch 1 (torch.profiler)")
    ap.add_argument("--write_sd15", default="", metavar="DIR", help="write the random SD1.5-shaped model and a "
                    "Pick-a-Pic shard of random images to DIR (for train_sspo.py configs/sd15.py), then exit")
    args = ap.parse_args(argv)
    if args.write_sd15:
        return write_sd15(args.write_sd15)
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 0 or args.resolution < 0:
        raise SystemExit("bench error: --iters must be >= 1, --warmup, --batch_size and --resolution >= 0")
    methods = args.methods.split(",")
    if not methods or any(x not in ("sft", "dpo", "sspo") for x in methods):
        raise SystemExit(f"bench error: --methods takes sft, dpo, sspo; got {args.methods!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.latents and not args.sd15:
        raise SystemExit("bench error: --latents needs --sd15 (the tiny world's model has no VAE: nothing to cache)")
    if args.sd15 and device.type == "cpu" and not 0 < args.resolution <= 128:
        raise SystemExit("bench error: --sd15 needs a GPU (a step is minutes on CPU); on CPU pass --resolution 64 "
                         "for a smoke run of the code path at 8x8 latents")
    over = ["--data_path=."] if args.sd15 else ["--tiny_mode=pairs"]  # no shard read; tiny: DPO needs losers
    over += [f"--batch_size={args.batch_size}"] * bool(args.batch_size) + [f"--resolution={args.resolution}"] * bool(args.resolution)
    over += [f"--{kv}" for kv in args.set]
    cfg = config.get_config([args.config or ("configs/sd15.py" if args.sd15 else "configs/tiny.py"), *over])
    if not args.sd15 and cfg["init_from"] != "scratch" and not any(kv.startswith("unet_channels=") for kv in args.set):
        cfg["unet_channels"] = config.get_config(["configs/tiny_base.py"])["unet_channels"]  # what a fine-tune trains
    for k, why in NOT_TIMED.items():
        if cfg[k] != config.defaults()[k]:
            raise SystemExit(f"bench error: {k}={cfg[k]!r} (from the config or --set) is not applied here: {why}")
    if device.type == "cuda":  # as ddp.setup
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg["seed"])
    K, B = cfg["self_sample_steps"], cfg["batch_size"]
    name = "SD1.5-shaped UNet (random weights)" if args.sd15 else f"tiny world UNet {cfg['unet_channels']}"
    print(f"bench: {name} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads; batch {B}, resolution {cfg['resolution']}, K = {K} sampler steps, "
          f"guidance {cfg['self_sample_guidance']}, ref {cfg['ref_dtype']}, grad_checkpointing {cfg['grad_checkpointing']}, "
          f"{'latents from a latent cache' if args.latents else 'images VAE-encoded each step' if args.sd15 else 'pixel space'}, "
          f"bf16 autocast {config.bf16_autocast(cfg, device)}; medians of {args.iters} after {args.warmup} warmup")
    with tempfile.TemporaryDirectory() as tmp:
        P = build(cfg, args.sd15, device, tmp, args.latents)
        print(f"UNet {sum(p.numel() for p in P['unet'].parameters()) / 1e6:.1f}M params, latents {tuple(P['shape'])}, "
              f"attention: {', '.join(sorted({type(p).__name__ for p in P['unet'].attn_processors.values()}))}")
        peak = matmul_peak(device, args.warmup, args.iters)
        peak_name = "bf16" if device.type == "cuda" else "fp32"
        flops = {meth: count_flops(meth, P, cfg) for meth in methods}
        rows = [] if args.no_variants else variants(P, cfg, args)
        if args.profile:
            print_profiles(P, cfg, args)
        if args.compile:
            more, t_compile, check = bench_compile(P, cfg, args)
            rows += more
            print(f"torch.compile ({args.compile}): {t_compile:.1f} s to compile the guided forward and the policy "
                  f"fwd+bwd (once per run and input shape)")
            c, f = check.values()
            print(f"short run of 5 AdamW updates from the same weights, distance between the ends relative to the "
                  f"distance trained: compiled vs eager {c:.4f}; eager fp32 vs eager bf16 autocast {f:.4f} -> compile "
                  f"{'is' if c <= f else 'is NOT'} within bf16's tolerance")
        guided = time_it(guided_forward(P, cfg), device, args.warmup, args.iters)
        swap_load = time_it(lambda: P["pool"].load_into(1, P["ref_unet"]), device, args.warmup, args.iters)
        pushes = itertools.count(2)  # each push adds a snapshot to the pool (SD1.5: 1.7 GB on disk), so only 3
        swap_push = time_it(lambda: P["pool"].push(P["unet"].state_dict(), next(pushes)), device, 0, 3)
        res, mem = {}, {}
        for meth in methods:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            res[meth] = time_step(meth, P, cfg, args.warmup, args.iters)
            if device.type == "cuda":
                mem[meth] = torch.cuda.max_memory_allocated(device)
            res[meth]["opt"] /= cfg["grad_accum"]  # one update per grad_accum micro-batches
            stretch = cfg["ckpt_every"] * cfg["grad_accum"]  # micro-batches between pushes
            redraw = stretch if cfg["ref_redraw"] == "stretch" else cfg["grad_accum"]
            res[meth]["swap"] = (swap_push / stretch + swap_load / redraw) if meth == "sspo" else 0.0
            res[meth]["step"] = sum(res[meth].values())

    phases = ("data", "encode", "sample", "policy", "ref", "opt", "swap")
    print(f"\nper micro-batch of {B} (ms; opt amortized over grad_accum {cfg['grad_accum']}, swap over a stretch)")
    print(f"{'method':8}{'step':>10}{'samples/s':>11}" + "".join(f"{p:>9}" for p in phases) + f"{'TFLOP':>9}{'util':>8}")
    util = {}
    for meth, r in res.items():
        util[meth] = sum(flops[meth].values()) / r["step"] / peak
        print(f"{meth:8}{r['step'] * 1e3:10.1f}{B / r['step']:11.1f}" + "".join(f"{r.get(p, 0) * 1e3:9.1f}" for p in phases)
              + f"{sum(flops[meth].values()) / 1e12:9.3f}{util[meth]:8.1%}")
    print("\nfast path (before -> after, ms)")
    for what, before, after, note in rows:
        ms = lambda v: f"{v * 1e3:9.2f}" if math.isfinite(v) else f"{'OOM':>9}"
        ratio = f"x{before / after:.2f}" if after > 0 and math.isfinite(before / after) else "  -  "
        print(f"  {what:62} {ms(before)} -> {ms(after)}  {ratio}  {note}")
    for meth in ("sft", "dpo", "sspo"):  # with the prompt cache warm, "encode" is the VAE alone
        if meth in res and P["m"]["vae"] is not None and not args.latents:
            print(f"  {meth}: VAE encoding is {res[meth]['encode'] / res[meth]['step']:.1%} of the step "
                  f"({res[meth]['encode'] * 1e3:.2f} ms), which latent_cache replaces by the row above")

    print(f"\nmeasured {peak_name} matmul peak {peak / 1e12:.2f} TFLOP/s; guided reference forward "
          f"({'B = ' + str(B) if cfg['self_sample_guidance'] == 1.0 else '2B = ' + str(2 * B)}) "
          f"{guided * 1e3:.2f} ms; snapshot push {swap_push * 1e3:.1f} ms, load {swap_load * 1e3:.1f} ms")
    ratios = dict(check) if args.compile else {}
    if "sspo" in res:
        ratios["self-sampling util"] = flops["sspo"]["sample"] / res["sspo"]["sample"] / peak
        ratios["sample / (K x guided forward)"] = res["sspo"]["sample"] / (K * guided)
        ratios["snapshot swap / sspo step"] = (swap_push + swap_load) / res["sspo"]["step"]  # one push + load
        ratios["snapshot swap amortized / sspo step"] = res["sspo"]["swap"] / res["sspo"]["step"]  # over a stretch
    if "sspo" in res and "dpo" in res:
        floor = res["dpo"]["step"] + K * guided
        ratios["sspo step / floor"] = res["sspo"]["step"] / floor
        print(f"sspo floor = dpo step {res['dpo']['step'] * 1e3:.1f} ms + {K} x {guided * 1e3:.2f} ms = {floor * 1e3:.1f} ms")
    if mem:
        print(f"peak memory of a step at batch {B}: " + ", ".join(f"{k} {v / 2 ** 30:.2f} GiB" for k, v in mem.items())
              + " (the fp32 gradients held throughout, "
              "as DDP's buckets or grad_accum > 1 hold them)")
    cpu_targets = device.type == "cpu" and not args.sd15  # each target is for its setting only
    print("ratios" + (" (targets are for CPU + the tiny world)" if cpu_targets else ""))
    for k, v in ratios.items():
        goal = TARGETS_CPU.get(k) if cpu_targets else None
        print(f"  {k}: {v:.3f}" + (f"  (target <= {goal}: {'met' if v <= goal else 'MISSED'})" if goal else ""))
    if device.type == "cuda":
        print("utilization of the measured bf16 matmul peak (model FLOPs / time)")
        for meth, v in [*util.items(), ("self-sampling", ratios.get("self-sampling util"))]:
            if v is not None:
                goal = TARGETS_GPU.get(meth) if args.sd15 else None  # the targets are the SD1.5 UNet's
                print(f"  {meth}: {v:.3f}" + (f"  (target >= {goal}: {'met' if v >= goal else 'MISSED'})" if goal else ""))
    return ratios


if __name__ == "__main__":
    main(sys.argv[1:])
