"""
The diffusion maths, model-agnostic (after DiT's diffusion/): the forward process, what the network learns to predict,
per-sample errors, timestep draws, the samplers (DDIM and its inversion; the flow-matching Euler sampler) and
`pair_errors`, the one call of the training step that returns what an objective reads (losses.OBJECTIVES).

A network here is a callable net(x_t, time, context) -> its raw prediction (eps, v or the flow velocity) in float32,
in x_t's shape; model.net makes one of a diffusers UNet (SD1.5, SDXL, AnimateDiff) or transformer (SD3, FLUX.1,
Wan2.1), LoRA or not. The schedule is a diffusers scheduler read for its config and, for DDPM models,
alphas_cumprod; only a multistep flow sampler (Wan2.1's UniPC: scheduler_sample) steps a copy of it. Nothing of the
project is imported.

Two parameterizations, told apart by the scheduler:
- DDPM (DDIMScheduler: SD1.5, SDXL, AnimateDiff): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the network
  predicts eps or v; time is the integer t.
- Flow matching (FlowMatchEulerDiscreteScheduler: SD3, FLUX.1, Wan2.1; or UniPC on flow sigmas, Wan2.1's; Esser et
  al. 2024): x_t = (1 - s) x0 + s eps, the network predicts the velocity u = eps - x0; time is s x 1000. The
  training timestep t in [0, T) indexes s_t = shift((t + 1) / T) (the shift of SD3's and Wan's schedulers; none for
  FLUX.1's, which shifts at sampling time): small t is
  little noise under both parameterizations, so t-based options (DPO-C&M's window, ssr_t_max) mean the same.
  The objectives read velocity errors mean_CHW (v - u)^2, as the public flow DPO trainers do (flow_grpo, Flow-Factory):
  since eps_hat - eps = (1 - s)(v_hat - u), an epsilon error would be the same error weighted by (1 - s)^2, which
  mutes the noisiest timesteps; we keep the velocity's uniform weight, the one the flow models were trained with.

Shapes: x0, eps (B, C, H, W), or (B, C, F, H, W) for clips; t (B,) integer timesteps; context (B, L, D).
"""
import copy
import math

import numpy as np
import torch


def _per_sample(a, x):
    """(B,) -> (B, 1, 1, ...) to broadcast over the rest of x's dimensions (C, H, W; C, F, H, W for clips)."""
    return a.view(-1, *[1] * (x.dim() - 1))


def is_flow(scheduler):
    """A flow-matching schedule: the flow Euler scheduler (SD3, FLUX.1, Wan) or a multistep one on flow sigmas
    (Wan2.1's published UniPC)."""
    euler = type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    return euler or scheduler.config.get("use_flow_sigmas", False)


def sample_timesteps(shape, num_timesteps, generator, density="uniform"):
    """Training timesteps of `shape` (an int: that many) in [0, num_timesteps) from `generator`: uniform (SSPO.md 1;
    FLUX.1's trainers), or 'logit_normal': t = floor(sigmoid(n) T), n ~ N(0, 1), SD3's training density (Esser et al.
    2024: the middle timesteps, where the velocity is hardest, drawn most)."""
    shape = (shape,) if isinstance(shape, int) else shape
    if density == "logit_normal":
        u = torch.sigmoid(torch.randn(shape, generator=generator))
        return (u * num_timesteps).long().clamp(max=num_timesteps - 1)
    return torch.randint(0, num_timesteps, shape, generator=generator)


def flow_sigmas(scheduler):
    """(T,) float32: the noise level s_t of each training timestep t of a flow-matching schedule, ascending: the
    scheduler's table (FlowMatchEulerDiscreteScheduler.__init__: (t + 1) / T, shifted s -> shift s / (1 + (shift - 1)
    s) unless the shift is applied at sampling time, use_dynamic_shifting), read in reverse."""
    c = scheduler.config
    shift = c.get("shift", c.get("flow_shift"))  # UniPC on flow sigmas names it flow_shift
    s = torch.arange(1, c.num_train_timesteps + 1, dtype=torch.float32) / c.num_train_timesteps
    return s if c.get("use_dynamic_shifting") else shift * s / (1 + (shift - 1) * s)


def flow_sample_sigmas(scheduler, steps, image_tokens):
    """(steps + 1,) float32: the noise levels the flow Euler sampler visits, then 0, as the pipelines have the
    scheduler space them. SD3 (a fixed shift): `steps` points from the table's s_max to s_min, shifted (so the last
    is shifted twice, as StableDiffusion3Pipeline's are). FLUX.1 (use_dynamic_shifting): linspace(1, 1 / steps) as
    FluxPipeline passes them, shifted by mu, which grows linearly with the image's `image_tokens` between the
    scheduler's base and max sequence lengths: s -> e^mu / (e^mu + 1 / s - 1)."""
    c = scheduler.config
    if c.use_dynamic_shifting:
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        mu = image_tokens * slope + c.base_shift - slope * c.base_image_seq_len
        s = np.linspace(1.0, 1 / steps, steps).astype(np.float32)  # float32 from here, as the scheduler computes
        s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    else:
        table = flow_sigmas(scheduler)
        T = c.num_train_timesteps
        s = np.linspace(table[-1].item() * T, table[0].item() * T, steps) / T
        s = c.shift * s / (1 + (c.shift - 1) * s)
    return torch.cat([torch.from_numpy(s).float(), torch.zeros(1)])


def add_noise(alphas_cumprod, x0, eps, t):
    """DDPM forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a = _per_sample(alphas_cumprod.to(x0.device)[t], x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def prediction_target(scheduler, x0, eps, t):
    """What the network learns to predict at x_t: the noise eps (SD1.5, prediction_type 'epsilon'), or the velocity
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ('v_prediction': SD2-v, SDXL-v, zero-terminal-SNR models, where
    eps is not recoverable at abar = 0; Salimans & Ho 2022)."""
    if scheduler.config.prediction_type == "epsilon":
        return eps
    a = _per_sample(scheduler.alphas_cumprod.to(x0.device, torch.float32)[t], x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def eps_and_x0(scheduler, x, out, a):
    """The network's output `out` at x (noise level abar = a, a tensor that broadcasts) -> (eps, x0) it implies."""
    if scheduler.config.prediction_type == "epsilon":
        return out, (x - (1 - a).sqrt() * out) / a.sqrt()
    return a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out


def denoising_error(net, scheduler, x0, eps, t, context, return_pred=False):
    """Per-sample mean over all but the batch dimension of (target - net(x_t))^2 in float32: shape (B,). Mean, not
    sum (SSPO.md 1). The target is the model's own (prediction_target: eps or v; flow matching: the velocity
    eps - x0). return_pred: also (prediction, target), float32 of x0's shape (the Diffusion-SDPO safeguard needs
    them)."""
    if is_flow(scheduler):
        s = flow_sigmas(scheduler).to(x0.device)[t]
        x_t = (1 - _per_sample(s, x0)) * x0 + _per_sample(s, x0) * eps
        pred = net(x_t, s * scheduler.config.num_train_timesteps, context)
        target = eps.float() - x0.float()
    else:
        x_t = add_noise(scheduler.alphas_cumprod, x0, eps, t)
        pred = net(x_t, t, context)
        target = prediction_target(scheduler, x0.float(), eps.float(), t)
    err = (pred - target).pow(2).mean(dim=tuple(range(1, pred.dim())))
    return (err, pred, target) if return_pred else err


def sdpo_scale(pred_w, pred_l, target_w, target_l, mu):
    """Diffusion-SDPO's safeguard (Fu et al. 2025, arXiv 2511.03317): one scale lambda in [0, 1] per micro-batch for
    the loser branch's gradient. With g_w, g_l the output-space gradients of the winner's and loser's mean errors
    (w.r.t. the network's prediction), the update -g_w + lambda g_l keeps the winner's error from rising to first
    order, with margin mu, when lambda <= (1 - mu) |g_w|^2 / <g_l, g_w>; so lambda is that bound clipped to
    [0, 1] when <g_l, g_w> > 0, else 1. As in the authors' code the gradients are those of the plain errors, not
    weighted by the loss's per-sample sigmoid factors. Returns a detached scalar tensor."""
    pw, pl = pred_w.detach().float().requires_grad_(True), pred_l.detach().float().requires_grad_(True)
    with torch.enable_grad():
        g_w, = torch.autograd.grad((pw - target_w.float()).pow(2).mean(), pw)
        g_l, = torch.autograd.grad((pl - target_l.float()).pow(2).mean(), pl)
    inner = (g_w * g_l).sum()
    lam = ((1 - mu) * g_w.pow(2).sum() / inner).clamp(0, 1)
    return torch.where(inner > 0, lam, torch.ones_like(lam)).detach()  # no Python `if` on a GPU value: no sync


def pair_errors(policy, reference, scheduler, x0_w, x0_l, eps, t, context, uncond=None, inversion=None,
                sdpo_mu=None, extra_draws=None):
    """The per-sample errors (B,) an objective reads (losses.OBJECTIVES), as a dict: the policy's on the winners "w"
    and on the losers or self-samples "l" (x0_l None: the winners alone, SFT), the reference's "ref_w", "ref_l"
    without gradients (reference None: none, MaPO and SFT), the timesteps "t" and the schedule's length "T".
    Winner and loser share the noise, the timestep and the (caption-dropped) context: one batched forward, winners
    first (SSPO.md 2).
    inversion=(net, steps, guidance): x_t is the deterministic DDIM inversion of each image by net (Inversion-DPO:
    the reference; the policy for reference-free MaPO) instead of forward noising; uncond is its guidance's empty
    prompt.
    sdpo_mu: Diffusion-SDPO's safeguard, the loser's gradient x lambda with its value unchanged.
    extra_draws=(eps (K, B, ...), t (K, B)): also the winners' errors of policy and reference averaged over K draws
    of their own, without gradients ("crit_w", "crit_ref_w": what SSR's criterion may read instead, ssr_draws).
    "logged": what the options measured, for the log (the safeguard's lambda)."""
    e = {"t": t, "T": scheduler.config.num_train_timesteps, "logged": {}}
    if x0_l is None:
        e["w"] = denoising_error(policy, scheduler, x0_w, eps, t, context)
        if reference is not None:  # SFT's log_theta0: measurement only
            with torch.no_grad():
                e["ref_w"] = denoising_error(reference, scheduler, x0_w, eps, t, context)
        return e
    x0, eps2, t2, c2 = torch.cat([x0_w, x0_l]), torch.cat([eps, eps]), torch.cat([t, t]), torch.cat([context, context])
    if inversion is not None:  # Inversion-DPO: x_t (and the eps it implies) from the deterministic inversion
        inverter, steps, guidance = inversion
        _, eps2 = ddim_invert(inverter, scheduler, x0, t2, c2, uncond, steps, guidance)
    err, pred, target = denoising_error(policy, scheduler, x0, eps2, t2, c2, return_pred=True)
    e["w"], e["l"] = err.chunk(2)
    if sdpo_mu is not None:  # err_l depends on the weights only through the loser's prediction, so this equals
        # scaling the gradient reaching that prediction by lambda
        lam = e["logged"]["sdpo_lambda"] = sdpo_scale(*pred.chunk(2), *target.chunk(2), sdpo_mu)
        e["l"] = e["l"].detach() + lam * (e["l"] - e["l"].detach())
    if reference is not None:
        with torch.no_grad():
            e["ref_w"], e["ref_l"] = denoising_error(reference, scheduler, x0, eps2, t2, c2).chunk(2)
    if extra_draws is not None:
        K, B = extra_draws[1].shape
        with torch.no_grad():
            x0k, ck = x0_w.repeat(K, *[1] * (x0_w.dim() - 1)), context.repeat(K, *[1] * (context.dim() - 1))
            ek, tk = extra_draws[0].flatten(0, 1), extra_draws[1].flatten()
            e["crit_w"] = denoising_error(policy, scheduler, x0k, ek, tk, ck).view(K, B).mean(0)
            e["crit_ref_w"] = denoising_error(reference, scheduler, x0k, ek, tk, ck).view(K, B).mean(0)
    return e


def timesteps(scheduler, steps):
    """The `steps` timesteps a sampler visits, highest first, by the scheduler's timestep_spacing as diffusers'
    DDIMScheduler.set_timesteps spaces them: 'leading' + steps_offset (SD1.5), 'trailing' (starts at T - 1: what a
    zero-terminal-SNR model needs, Lin et al. 2023) or 'linspace'."""
    cfg, T = scheduler.config, scheduler.config.num_train_timesteps
    if cfg.timestep_spacing == "trailing":
        ts = torch.arange(T, 0, -T / steps).round().long() - 1
    elif cfg.timestep_spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0)
    else:
        ts = (torch.arange(steps) * (T // steps)).flip(0) + cfg.steps_offset
    return ts


def check_sampler_steps(scheduler, steps, name="steps"):
    """ValueError unless the sampler can take `steps` steps on this schedule (DDIM on SD1.5's: 1 to 999, not 1000)."""
    T = scheduler.config.num_train_timesteps
    if is_flow(scheduler) and steps >= 1:  # the flow sampler takes any number of steps
        return
    if not 1 <= steps <= T or int(timesteps(scheduler, steps)[0]) >= T:
        raise ValueError(f"{name}={steps} does not fit the scheduler's {T} timesteps: DDIM's first timestep, "
                         f"(steps - 1) x ({T} // steps) + steps_offset {scheduler.config.steps_offset}, must be below {T}")


def sample(net, scheduler, cond, uncond, noise, steps=20, guidance=7.5, eta=0.0, step_noise=None):
    """The sampler of the model's parameterization: DDIM (ddim_sample) or the flow Euler sampler (flow_sample,
    deterministic: eta must be 0)."""
    if is_flow(scheduler):
        if eta > 0:
            raise ValueError("the flow-matching Euler sampler is deterministic: eta must be 0")
        if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            return scheduler_sample(net, scheduler, cond, uncond, noise, steps, guidance)
        return flow_sample(net, scheduler, cond, uncond, noise, steps, guidance)
    return ddim_sample(net, scheduler, cond, uncond, noise, steps, guidance, eta, step_noise)


@torch.no_grad()
def scheduler_sample(net, scheduler, cond, uncond, noise, steps, guidance):
    """The pipelines' own loop for a multistep flow scheduler (Wan2.1's UniPC, tested against WanPipeline): a fresh
    copy of `scheduler` spaces `steps` timesteps; at each the network's velocity, under classifier-free guidance
    with cond and uncond in one batched forward, goes to scheduler.step. noise = x_1; returns x_0, float32."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, device=noise.device)
    B = noise.shape[0]
    context = torch.cat([uncond.expand(B, -1, -1), cond]) if guidance != 1.0 else cond
    x = noise.float()
    for t in sched.timesteps:
        if guidance != 1.0:
            v_u, v_c = net(torch.cat([x, x]), t, context).chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = net(x, t, cond)
        with torch.autocast(x.device.type, enabled=False):  # the solver's arithmetic in float32, as the pipeline's
            x = sched.step(v, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def flow_sample(net, scheduler, cond, uncond, noise, steps=28, guidance=7.0):
    """The Euler sampler of StableDiffusion3Pipeline and FluxPipeline (tested against their latents): from x = noise
    at s = 1, x <- x + (s_next - s) v over flow_sample_sigmas, in float32. Guidance: classifier-free, cond and uncond
    in one batched forward (SD3); or, for a guidance-distilled network (FLUX.1-dev: net.guidance_embedded), the
    network's own guidance input, one forward, no uncond. noise (B, C, H, W) = x_1; returns x_0 (latents), float32."""
    T = scheduler.config.num_train_timesteps
    sigmas = flow_sample_sigmas(scheduler, steps, (noise.shape[-2] // 2) * (noise.shape[-1] // 2)).to(noise.device)
    embedded, B = getattr(net, "guidance_embedded", False), noise.shape[0]
    context = torch.cat([uncond.expand(B, -1, -1), cond]) if guidance != 1.0 and not embedded else cond
    x = noise.float()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        if embedded:
            v = net(x, s * T, cond, guidance=guidance)
        elif guidance != 1.0:
            v_u, v_c = net(torch.cat([x, x]), s * T, context).chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = net(x, s * T, cond)
        x = x + (s_next - s) * v
    return x


@torch.no_grad()
def ddim_sample(net, scheduler, cond, uncond, noise, steps=20, guidance=7.5, eta=0.0, step_noise=None):
    """DDIM (Song et al. 2021, eq. 12), the same update as diffusers' DDIMScheduler.step (tested against it),
    with classifier-free guidance: cond and uncond in one batched forward. cond (B, L, D), uncond (1 or B, L, D),
    noise (B, C, H, W) = x_T; step_noise (steps, B, C, H, W), the noise each step adds when eta > 0, drawn by the
    caller (so that it can deal it over processes). Returns x_0 in the model's space (latents, or pixels), float32."""
    if eta > 0 and (step_noise is None or step_noise.shape != (steps, *noise.shape)):
        raise ValueError(f"eta > 0 needs step_noise of shape {(steps, *noise.shape)}, got "
                         f"{None if step_noise is None else tuple(step_noise.shape)}")
    cfg = scheduler.config
    abar = scheduler.alphas_cumprod.to(noise.device, torch.float32)
    ratio = cfg.num_train_timesteps // steps  # diffusers' DDIM steps back by T // steps whatever the spacing
    ts = timesteps(scheduler, steps).to(noise.device)
    final_abar = torch.tensor(1.0, device=noise.device) if cfg.set_alpha_to_one else abar[0]
    B = noise.shape[0]
    context = torch.cat([uncond.expand(B, -1, -1), cond]) if guidance != 1.0 else cond
    # abar of each step and of the one after it, looked up before the loop: a Python `if` on a GPU tensor inside it
    # would wait for the GPU at every step (a host-device sync); these are the same values, bit for bit
    prev = ts - ratio
    a_ts, a_prevs = abar[ts], torch.where(prev >= 0, abar[prev.clamp(min=0)], final_abar)
    x = noise.float()
    for i, (t, a_t, a_prev) in enumerate(zip(ts, a_ts, a_prevs)):
        if guidance != 1.0:
            e_u, e_c = net(torch.cat([x, x]), t, context).chunk(2)
            out = e_u + guidance * (e_c - e_u)  # guidance on the raw output, eps or v, as diffusers' pipelines
        else:
            out = net(x, t, context)
        eps, x0 = eps_and_x0(scheduler, x, out, a_t)
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * var.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).sqrt() * eps
        if eta > 0:
            x = x + std * step_noise[i].to(x.device)
    return x


@torch.no_grad()
def ddim_invert(net, scheduler, x0, t, context, uncond=None, steps=20, guidance=1.0):
    """Deterministic DDIM inversion (Inversion-DPO): the update of `ddim_sample` at eta = 0 run backwards, from the
    clean x0 (abar = 1) up to each sample's own timestep t (B,), in `steps` steps on the grid round(k t / steps),
    k = 1..steps. As usual for inversion, eps is evaluated at the step's target timestep on the current x (exact
    in the limit of small steps); a v-prediction is turned into eps at the current x's level, as diffusers'
    DDIMInverseScheduler does. No x0 clipping: clipping is not invertible. Returns (x_t, eps_t): x_t float32
    (B, C, H, W) and the noise it implies, eps_t = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), so that
    add_noise(x0, eps_t, t) == x_t and denoising_error can train on it unchanged.
    Cost: steps forwards per image (2x with guidance != 1), no gradients."""
    abar = scheduler.alphas_cumprod.to(x0.device, torch.float32)
    B = x0.shape[0]
    if guidance != 1.0:
        context = torch.cat([uncond.expand(B, -1, -1), context])
    x = x0.float()
    a_cur = torch.ones(B, device=x0.device)  # the clean image: abar = 1
    for k in range(1, steps + 1):
        s = torch.round(t.float() * k / steps).long()  # (B,) each sample's next grid point
        if guidance != 1.0:
            e_u, e_c = net(torch.cat([x, x]), torch.cat([s, s]), context).chunk(2)
            out = e_u + guidance * (e_c - e_u)
        else:
            out = net(x, s, context)
        a_next = abar[s]
        ac, an = _per_sample(a_cur, x), _per_sample(a_next, x)
        eps, x0_hat = eps_and_x0(scheduler, x, out, ac)
        x = an.sqrt() * x0_hat + (1 - an).sqrt() * eps
        a_cur = a_next
    a_t = _per_sample(abar[t], x)
    return x, (x - a_t.sqrt() * x0.float()) / (1 - a_t).sqrt()
