"""SDXL: a tiny random model in SDXL's layout (two text encoders, a UNet with addition_embed_type='text_time', a VAE)
saved with save_pretrained and loaded through from_pretrained. Its context is what StableDiffusionXLPipeline
computes, the sampler is the pipeline's, every method trains on it with the same loop, and the run folder loads in
StableDiffusionXLPipeline (its LoRA adapter through load_lora_weights)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

import diffusion
import model
from tiny import build
from tiny import world
from conftest import FAST

R = 16  # image side; the tiny VAE halves it: 8x8 latents


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return build.build_tiny_model(str(tmp_path_factory.mktemp("xl") / "xl"), world.WORDS, resolution=R,
                                  with_vae=True, sdxl=True)


@pytest.fixture(scope="module")
def pipe(xl_dir):
    return StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)


PROMPTS = ["a red circle on the left", "a blue square at the top", ""]


def test_context_is_the_pipelines(xl_dir, pipe):
    """Hidden states, pooled embedding and time ids as StableDiffusionXLPipeline computes them for these prompts."""
    m = model.load_model(xl_dir)
    assert m["text_encoder_2"] is not None and not any(p.requires_grad for p in m["text_encoder_2"].parameters())
    ctx = model.encode_prompts(m, PROMPTS, R)
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    P = pooled.shape[-1]
    time_ids = pipe._get_add_time_ids((R, R), (0, 0), (R, R), torch.float32, text_encoder_projection_dim=P)
    assert ctx.shape == (3, 78, hidden.shape[-1])
    assert torch.allclose(ctx[:, :77], hidden, atol=1e-6) and torch.allclose(ctx[:, 77, :P], pooled, atol=1e-6)
    assert torch.equal(ctx[:, 77, P:P + 6], time_ids.expand(3, -1)) and not ctx[:, 77, P + 6:].any()
    assert not torch.allclose(ctx[0], ctx[1])
    # the cache gives the same rows
    assert torch.allclose(model.PromptCache(m, 8, R)(PROMPTS), ctx, atol=1e-6)  # a whole chunk at once: rounds apart


def test_sampler_is_the_pipelines(xl_dir, pipe):
    """ddim_sample with guidance on an SDXL context = StableDiffusionXLPipeline with a DDIMScheduler, the same noise
    and the empty negative prompt (the pipeline's default, force_zeros_for_empty_prompt, would zero the embeddings
    instead; training's caption dropout encodes "", so guidance here does too)."""
    m = model.load_model(xl_dir)
    noise = torch.randn(2, 4, R // 2, R // 2, generator=torch.Generator().manual_seed(0))
    ours = diffusion.ddim_sample(model.net(m["unet"]), m["scheduler"], model.encode_prompts(m, PROMPTS[:2], R),
                             model.encode_prompts(m, [""], R), noise, steps=4, guidance=3.0)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(PROMPTS[:2], negative_prompt=["", ""], height=R, width=R, num_inference_steps=4, guidance_scale=3.0,
                  latents=noise.clone(), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_unet_output_reads_the_added_conditions(xl_dir):
    """The pooled row reaches the UNet: another pooled embedding or other time ids change its output."""
    m = model.load_model(xl_dir)
    ctx = model.encode_prompts(m, PROMPTS[:1], R)
    x, t = torch.randn(1, 4, R // 2, R // 2), torch.tensor([500])
    out = model.unet_output(m["unet"], x, t, ctx)
    other_size = model.encode_prompts(m, PROMPTS[:1], 2 * R)
    other_pooled = ctx.clone()
    other_pooled[:, 77, :4] += 1
    assert not torch.allclose(out, model.unet_output(m["unet"], x, t, other_size))
    assert not torch.allclose(out, model.unet_output(m["unet"], x, t, other_pooled))


@pytest.mark.parametrize("method", ["sft", "dpo", "sspo", "kto", "mapo", "dpo --noising=ddim_inversion --inversion_steps=2"])
def test_methods_train_and_the_pipeline_loads_the_run(tmp_path, run, xl_dir, method):
    """A few updates of each method (SFT, Diffusion-DPO, SSPO, and of the other objectives an unpaired one, a
    reference-free one and Inversion-DPO's sampler-based noising) from the SDXL folder; the run folder is an SDXL one
    that the pipeline loads and samples from."""
    out = str(tmp_path / "run")
    method, *extra = method.split()
    p = run(FAST + extra + [f"--out_dir={out}", f"--init_from={xl_dir}", f"--method={method}", "--tiny_mode=pairs",
                            f"--resolution={R}", "--self_sample_steps=2", "--ckpt_every=2", "--max_steps=3"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "judge on seen / held-out prompts" in p.stdout
    trained = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    base = model.load_model(xl_dir)["unet"]
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.parameters(), base.parameters()))
    image = trained(PROMPTS[0], height=R, width=R, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (R, R, 3) and np.isfinite(image).all()
    if method == "sft":  # evaluate.py samples an SDXL run at its resolution, the base on the same noise
        p = run([out, "--base", xl_dir, "--protocol=paper", "--images_per_prompt=1", "--steps=2"], script="evaluate.py")
        assert p.returncode == 0, p.stderr[-3000:]
        scores = json.load(open(os.path.join(out, "eval", "scores.json")))
        assert scores["protocol"]["resolution"] == R and "win_rate_vs_base" in scores


def test_lora_adapter_loads_in_the_pipeline(tmp_path, run, xl_dir):
    """A LoRA run's lora/ is what StableDiffusionXLPipeline.load_lora_weights reads: the pipeline with it samples what
    our sampler does from the run folder (load_model fuses the adapter)."""
    out = str(tmp_path / "lora")
    p = run(FAST + [f"--out_dir={out}", f"--init_from={xl_dir}", "--method=sspo", "--tiny_mode=pairs",
                    f"--resolution={R}", "--self_sample_steps=2", "--lora_rank=4", "--max_steps=3"])
    assert p.returncode == 0, p.stderr[-3000:]
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    x = torch.randn(1, 4, R // 2, R // 2, generator=torch.Generator().manual_seed(0))
    kw = dict(negative_prompt="", height=R, width=R, num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    before = pipe(PROMPTS[0], latents=x.clone(), **kw).images
    pipe.load_lora_weights(os.path.join(out, model.LORA_DIR), weight_name=model.LORA_FILE)
    after = pipe(PROMPTS[0], latents=x.clone(), **kw).images
    m = model.load_model(out)
    ours = diffusion.ddim_sample(model.net(m["unet"]), m["scheduler"], model.encode_prompts(m, PROMPTS[:1], R),
                             model.encode_prompts(m, [""], R), x, steps=2, guidance=3.0)
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(ours, after, atol=1e-4), (ours - after).abs().max()


def test_missing_second_encoder_is_one_line(tmp_path, run, xl_dir):
    broken = str(tmp_path / "broken")
    shutil.copytree(xl_dir, broken)
    shutil.rmtree(os.path.join(broken, "text_encoder_2"))
    p = run(FAST + [f"--out_dir={tmp_path / 'run'}", f"--init_from={broken}", f"--resolution={R}"])
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and last.startswith("error: ") and "lacks text_encoder_2/" in last, p.stderr[-2000:]
    with pytest.raises(FileNotFoundError, match="SDXL one"):
        model.load_model(broken)


def test_vae_key_and_upcast(tmp_path, run, xl_dir):
    """--vae puts another VAE in the run (the run folder saves it); a missing one is a one-line error. In fp16 a VAE
    whose config says force_upcast (SDXL's) stays fp32, as the pipelines keep it; the text encoders go fp16."""
    other = build.build_tiny_model(str(tmp_path / "other"), world.WORDS, resolution=R, with_vae=True, seed=1)
    out = str(tmp_path / "run")
    p = run(FAST + [f"--out_dir={out}", f"--init_from={xl_dir}", f"--resolution={R}", "--max_steps=1",
                    f"--vae={other}/vae"])
    assert p.returncode == 0, p.stderr[-3000:]
    saved, theirs = (model.load_model(d)["vae"].state_dict() for d in (out, other))
    assert all(torch.equal(saved[k], theirs[k]) for k in theirs)
    p = run(FAST + [f"--out_dir={tmp_path / 'run2'}", f"--init_from={xl_dir}", f"--resolution={R}",
                    f"--vae={tmp_path}/nothing"])
    assert p.returncode == 1 and "vae folder" in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    m = model.load_model(xl_dir, frozen_dtype=torch.float16)
    assert m["vae"].config.force_upcast and m["vae"].dtype == torch.float32
    assert m["text_encoder"].dtype == m["text_encoder_2"].dtype == torch.float16
