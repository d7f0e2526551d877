"""The wiring of the update, checked from outside the loss functions: each test here fails on a named mistake in
train_sspo.py's update or in losses.OBJECTIVES (swap a winner for its loser, let the policy draw the self-sample,
snapshot the wrong weights) that the loss tests, which call the loss functions directly, cannot see."""
import json
import os

import pytest
import torch

import config
import data
import diffusion
import model
import train_sspo
from conftest import FAST

# float32 throughout: the margins below are read from a few updates
WIRED = FAST + ["--tiny_mode=pairs", "--mixed_precision=no", "--caption_dropout=0.0", "--self_sample_steps=2",
                "--ref_policy=first", "--beta=100.0"]


def gains(run_dir, base_dir, args, steps):
    """Replays the run's first `steps` updates' examples at their own noise and timesteps and returns the mean of
    err_run - err_base on the winners and on the losers -- for SSPO the self-samples, redrawn here by theta_0 (its
    reference: ref_policy='first') from the run's own x_T: (D_w, D_l). Computed here, not read from the run's log,
    so it does not depend on which errors the objective was handed."""
    cfg = config.get_config(list(args))
    run, base = model.load_model(run_dir), model.load_model(base_dir)
    sched, T = base["scheduler"], base["scheduler"].config.num_train_timesteps
    batches = data.micro_batches(data.make_dataset(cfg, 1), cfg, 0, 1, 0, 0, 1)
    uncond = model.encode_prompts(base, [""])
    d_w, d_l = [], []
    with torch.no_grad():
        for step in range(steps):
            batch, _ = next(batches)
            B = len(batch["prompt"])
            eps, t, _, x_T, *_ = data.step_randomness(cfg, step, 0, 0, 1, (B, *batch["image_w"].shape[1:]), T, 1)
            ctx = model.encode_prompts(base, batch["prompt"])  # the text encoder is frozen: the run's is the base's
            x0_l = batch["image_l"] if cfg["method"] == "dpo" else diffusion.ddim_sample(
                model.net(base["unet"]), sched, ctx, uncond, x_T, cfg["self_sample_steps"], cfg["self_sample_guidance"])
            for x0, out in ((batch["image_w"], d_w), (x0_l, d_l)):
                out.append(diffusion.denoising_error(model.net(run["unet"]), sched, x0, eps, t, ctx)
                           - diffusion.denoising_error(model.net(base["unet"]), sched, x0, eps, t, ctx))
    return torch.cat(d_w).mean().item(), torch.cat(d_l).mean().item()


@pytest.mark.parametrize("method", ["dpo", "sspo"])
def test_a_few_updates_prefer_the_winners(tmp_path, run, base, method):
    """Diffusion-DPO and SSPO, a few updates at a small beta from theta_0 as the reference: on the examples they
    trained on, the policy's error falls below the reference's on the winners (D_w < 0), and further than on the
    losers or self-samples (D_w < D_l). SSPO's self-sample decision (SSR) reaches both branches: some samples are
    flipped and some are not. Fails when OBJECTIVES hands the objective the loser (or self-sample) as the winner."""
    out = str(tmp_path / method)
    # SSPO: updates large enough that on some winners the policy overshoots and falls behind theta_0 (SSR flips)
    args = WIRED + [f"--method={method}", f"--init_from={base}"] + (["--lr=1e-3", "--max_steps=6"] if method == "sspo"
                                                                     else ["--lr=1e-4"])
    p = run(args + [f"--out_dir={out}"])
    assert p.returncode == 0, p.stderr[-3000:]
    d_w, d_l = gains(out, base, args + [f"--out_dir={out}"], 6 if method == "sspo" else 4)
    assert d_w < 0 and d_w < d_l, (d_w, d_l)
    if method == "sspo":
        logged = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        flips = [r["flip_rate"] for r in logged if r["kind"] == "train" and r["step"] > 1]
        assert 0 < sum(flips) / len(flips) < 1, flips  # step 1 is all ties: the policy is theta_0 there


def test_the_reference_draws_the_self_sample(tmp_path, base, monkeypatch):
    """3 SSPO updates with theta_0 as the reference: every self-sample is drawn by a network that predicts what
    theta_0 predicts, though the policy has left theta_0 after the first update. Fails when the policy draws it."""
    theta_0, seen = model.net(model.load_model(base)["unet"]), []
    sample = diffusion.ddim_sample

    def spy(net, scheduler, cond, uncond, noise, steps=20, *a, **k):
        if steps == 3:  # the self-sampler's (the eval grid samples with sample_steps=2)
            t = torch.full((len(noise),), 500)
            with torch.no_grad():
                seen.append((net(noise, t, cond) - theta_0(noise, t, cond)).abs().max().item())
        return sample(net, scheduler, cond, uncond, noise, steps, *a, **k)

    monkeypatch.setattr(diffusion, "ddim_sample", spy)
    out = str(tmp_path / "run")
    train_sspo.main(config.get_config(WIRED + ["--method=sspo", "--self_sample_steps=3", "--max_steps=3", "--lr=1e-3",
                                               f"--init_from={base}", f"--out_dir={out}"]))
    assert len(seen) == 3 and max(seen) < 1e-6, seen
    policy = model.net(model.load_model(out)["unet"])  # the policy moved: it predicts otherwise
    x, ctx = torch.randn(2, 3, 16, 16), model.encode_prompts(model.load_model(base), ["a red circle on the left"] * 2)
    with torch.no_grad():
        assert (policy(x, torch.full((2,), 500), ctx) - theta_0(x, torch.full((2,), 500), ctx)).abs().max() > 1e-4
