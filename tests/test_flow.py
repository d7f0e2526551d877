"""Flow-matching models (Stable Diffusion 3, FLUX.1): tiny random ones saved in the pipelines' layouts and loaded
through the real from_pretrained. The context equals the pipeline's encode_prompt, our sampler its latents, every
method trains through the same update and the run loads in the pipeline, LoRA round-trips, resume is exact, 2
processes equal 1, and bad input is one line."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

import config
import diffusion
import model
import train_sspo
from conftest import FAST, resume_and_two_processes
from tiny import build

PIPES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
PROMPTS = ["a red circle on the left", "a blue square at the top"]
# a tiny world run on a flow model: pairs for the pair methods, 16 T5 tokens, float32, a snapshot every update
FLOW = FAST + ["--tiny_mode=pairs", "--max_steps=3", "--warmup_steps=1", "--t5_max_length=16", "--mixed_precision=no",
               "--self_sample_steps=2", "--ckpt_every=1", "--beta=500.0", "--lr=1e-4", "--guidance=3.5",
               "--self_sample_guidance=3.5"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {f: build.build_tiny_flow(str(root / f), f) for f in PIPES}


def pipeline(path, family):
    pipe = PIPES[family].from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pack(x):  # FluxPipeline's latents are packed: (B, C, h, w) -> (B, hw/4, 4C)
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)


@pytest.mark.parametrize("family", list(PIPES))
def test_context_is_the_pipelines(folders, family):
    """Our context (the prompt's states with the pooled vector as its last row) is encode_prompt's, the empty prompt's
    too (SD3's classifier-free guidance encodes "" through all three encoders)."""
    m, pipe = model.load_model(folders[family], t5_max_length=16), pipeline(folders[family], family)
    ctx, uncond = model.encode_prompts(m, PROMPTS), model.encode_prompts(m, [""])
    if family == "sd3":
        states, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=True,
                                                             max_sequence_length=16)
        assert torch.allclose(uncond[:, :-1], neg[:1], atol=1e-5)
        assert torch.allclose(uncond[:, -1, :neg_pooled.shape[-1]], neg_pooled[:1], atol=1e-5)
    else:
        states, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=16)
    assert ctx.shape == (2, states.shape[1] + 1, states.shape[2])
    assert torch.allclose(ctx[:, :-1], states, atol=1e-5) and torch.allclose(ctx[:, -1, :pooled.shape[-1]], pooled, atol=1e-5)
    assert (ctx[:, -1, pooled.shape[-1]:] == 0).all()


@pytest.mark.parametrize("family, guidance", [("sd3", 5.0), ("sd3", 1.0), ("flux", 3.5)])
def test_sampler_is_the_pipelines(folders, family, guidance):
    """From the same noise, diffusion.sample's latents are the pipeline's (SD3: classifier-free guidance; FLUX.1-dev:
    its guidance input, the latents packed), and so are the noise levels it visits."""
    m, pipe = model.load_model(folders[family], t5_max_length=16), pipeline(folders[family], family)
    kw = dict(height=16, width=16, num_inference_steps=3, guidance_scale=guidance, max_sequence_length=16)
    theirs = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    noise = torch.randn((2, *model.latent_shape(m, 16)), generator=torch.Generator().manual_seed(0))
    ours = diffusion.sample(model.net(m["unet"]), m["scheduler"], model.encode_prompts(m, PROMPTS),
                            model.encode_prompts(m, [""]), noise, 3, guidance)
    ours = pack(ours) if family == "flux" else ours
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert torch.allclose(diffusion.flow_sample_sigmas(m["scheduler"], 3, 16), pipe.scheduler.sigmas)
    # and the images: the VAE's shift and scale undone as the pipeline does
    images = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    assert torch.allclose(model.latents_to_images(m["vae"], diffusion.sample(
        model.net(m["unet"]), m["scheduler"], model.encode_prompts(m, PROMPTS), model.encode_prompts(m, [""]), noise, 3,
        guidance)) / 2 + 0.5, images, atol=1e-5)


def test_flow_errors_by_hand(folders):
    """x_t = (1 - s) x0 + s eps with s = shift((t + 1) / T) (SD3's shift 3; FLUX.1's none at training time): a network
    that predicts the true velocity eps - x0 has error 0, one that predicts 0 has |eps - x0|^2; the time it gets is
    s x 1000; small t is little noise."""
    sched = model.load_model(folders["sd3"])["scheduler"]
    s = diffusion.flow_sigmas(sched)
    assert s.shape == (1000,) and (s.diff() > 0).all() and s[-1] == 1.0
    assert torch.allclose(s[499], torch.tensor(3 * 0.5 / (1 + 2 * 0.5)))  # shift 3 at t + 1 = 500
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g), torch.tensor([0, 500, 999])
    seen = {}

    def oracle(x_t, time, ctx):
        seen["time"], seen["x_t"] = time, x_t
        return (eps - x0).float()
    assert diffusion.denoising_error(oracle, sched, x0, eps, t, None).abs().max() < 1e-12
    si = s[t].view(-1, 1, 1, 1)
    assert torch.allclose(seen["x_t"], (1 - si) * x0 + si * eps) and torch.allclose(seen["time"], s[t] * 1000)
    zero = diffusion.denoising_error(lambda x, time, ctx: torch.zeros_like(x), sched, x0, eps, t, None)
    assert torch.allclose(zero, (eps - x0).pow(2).mean((1, 2, 3)))
    flux = model.load_model(folders["flux"])["scheduler"]
    assert torch.allclose(diffusion.flow_sigmas(flux), torch.arange(1, 1001) / 1000)
    n = diffusion.sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), "logit_normal").float()
    assert 0 <= n.min() and n.max() <= 999 and abs(n.mean() - 499.5) < 10 and n.std() < 0.8 * 288.7  # the middle, more


METHODS = [("sd3", m, []) for m in ("sft", "dpo", "sspo", "dmpo", "kto", "mapo", "see_dpo", "dpo_cm")] + [
    ("sd3", "dpo", ["--sdpo_safeguard=True"]), ("sd3", "sspo", ["--ref_policy=last", "--ssr=off"]),
    ("sd3", "sspo", ["--timestep_density=logit_normal", "--ssr_draws=2", "--ssr_t_max=300"]),
    ("flux", "sft", []), ("flux", "dpo", []), ("flux", "sspo", [])]


@pytest.mark.parametrize("family, method, extra", METHODS)
def test_each_method_trains_a_flow_model(tmp_path, run, folders, family, method, extra):
    """3 updates of every objective through the same update, from the tiny world's pairs; the run folder loads in
    the family's pipeline and generates (checked for one method each: loading costs seconds)."""
    out = str(tmp_path / "run")
    p = run(FLOW + [f"--init_from={folders[family]}", f"--method={method}", f"--out_dir={out}", *extra])
    assert p.returncode == 0, p.stderr[-3000:]
    logged = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    train = [r for r in logged if r["kind"] == "train"]
    assert len(train) == 3 and all(np.isfinite(r["loss"]) for r in train)
    assert os.path.isdir(os.path.join(out, "transformer")) and not os.path.exists(os.path.join(out, "unet"))
    if method == "sspo" and not extra:
        assert "flip_rate" in train[-1] and "judge_s" in train[-1]
        image = pipeline(out, family)(PROMPTS[0], height=16, width=16, num_inference_steps=2, max_sequence_length=16,
                                      output_type="np").images
        assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("family", list(PIPES))
def test_flow_lora_round_trip(tmp_path, run, folders, family):
    """A LoRA SSPO run on the transformer's attention projections: its lora/ loads with the pipeline's
    load_lora_weights (rank and alpha from the file's metadata) and samples what our loader's fused model samples; the
    adapter has an effect."""
    out = str(tmp_path / "lora")
    p = run(FLOW + [f"--init_from={folders[family]}", "--method=sspo", f"--out_dir={out}", "--lora_rank=4",
                    "--lora_alpha=8.0", "--lr=1e-3"])
    assert p.returncode == 0, p.stderr[-3000:]
    pipe = pipeline(out, family)
    kw = dict(height=16, width=16, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16,
              output_type="latent")
    base = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(os.path.join(out, model.LORA_DIR))
    adapted = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    m = model.load_model(out, t5_max_length=16)  # the base in transformer/ with lora/ fused
    noise = torch.randn((1, *model.latent_shape(m, 16)), generator=torch.Generator().manual_seed(0))
    ours = diffusion.sample(model.net(m["unet"]), m["scheduler"], model.encode_prompts(m, PROMPTS[:1]),
                            model.encode_prompts(m, [""]), noise, 2, 3.5)
    ours = pack(ours) if family == "flux" else ours
    assert (adapted - base).abs().max() > 1e-3 and torch.allclose(ours, adapted, atol=1e-5)


def test_flow_resume_is_exact_and_two_processes_equal_one(tmp_path, run, folders):
    """SSPO on SD3 with a disk pool, stopped after 2 updates and resumed: the uninterrupted run's weights, bit for
    bit. The same on 2 processes x batch 4 against 1 x batch 8: within the float bound (conftest.ddp_bound), and a
    run drawing another reference lies beyond it."""
    args = FLOW + [f"--init_from={folders['sd3']}", "--method=sspo", "--pool_storage=disk", "--max_steps=4",
                   "--save_every=2", "--ref_redraw=step"]
    resume_and_two_processes(run, args, tmp_path)


def test_flow_bad_input_is_one_line(tmp_path, folders):
    """A folder whose model_index.json names a pipeline not trained here, one without a part its pipeline needs, a
    FLUX.1-schnell scheduler, Inversion-DPO on a flow model: each one line before any training."""
    def fails(path, *extra, match):
        with pytest.raises(SystemExit, match=match):
            train_sspo.main(config.get_config(FLOW + [f"--init_from={path}", f"--out_dir={tmp_path}/r{len(extra)}",
                                                      "--method=dpo", *extra]))
    other = str(tmp_path / "other")
    shutil.copytree(folders["sd3"], other)
    index = json.load(open(os.path.join(other, "model_index.json")))
    json.dump({**index, "_class_name": "HunyuanVideoPipeline"}, open(os.path.join(other, "model_index.json"), "w"))
    fails(other, match=r"its model_index.json names HunyuanVideoPipeline, not a family trained here \(SD1.5, SDXL")
    json.dump(index, open(os.path.join(other, "model_index.json"), "w"))
    shutil.rmtree(os.path.join(other, "text_encoder_3"))
    fails(other, "--seed=1", match=r"lacks text_encoder_3/ \(StableDiffusion3Pipeline layout: transformer/ vae/")
    schnell = str(tmp_path / "schnell")
    shutil.copytree(folders["flux"], schnell)
    sched = os.path.join(schnell, "scheduler", "scheduler_config.json")
    json.dump({**json.load(open(sched)), "use_dynamic_shifting": False, "shift": 1.0}, open(sched, "w"))
    fails(schnell, "--seed=2", match=r"without use_dynamic_shifting \(FLUX.1-schnell's\): its sampler is not implemented")
    fails(folders["sd3"], "--noising=ddim_inversion", match=r"noising='ddim_inversion' with a StableDiffusion3Pipeline "
                                                              r"model: DDIM inversion is for DDPM models")
