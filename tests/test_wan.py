"""Wan2.1 text-to-video (a flow-matching transformer on clips): a tiny random model saved in WanPipeline's layout and
loaded through the real from_pretrained. The context equals WanPipeline's encode_prompt, our sampler its latents
(the published UniPC multistep scheduler and the flow Euler one), every method trains on the tiny video world's
clips through the same update and the run loads in WanPipeline, LoRA round-trips, resume is exact, 2 processes equal
1, and bad input is one line."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

import config
import diffusion
import model
import train_sspo
from conftest import FAST, resume_and_two_processes
from tiny import build

PROMPTS = ["a red circle moving left", "a blue  square growing &amp; big"]  # WanPipeline cleans spaces and HTML
# the tiny video world on a Wan model: clips of 5 frames (3 latent frames), 16 T5 tokens, float32
WAN = FAST + ["--dataset=tiny_video", "--frames=5", "--tiny_flaws=('static','direction','jitter','colour')",
              "--tiny_mode=pairs", "--max_steps=3", "--warmup_steps=1", "--t5_max_length=16", "--mixed_precision=no",
              "--self_sample_steps=2", "--ckpt_every=1", "--beta=50.0", "--lr=1e-4", "--guidance=3.0",
              "--self_sample_guidance=3.0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {s: build.build_tiny_wan(str(root / s), scheduler=s) for s in ("unipc", "euler")}


def pipeline(path):
    pipe = WanPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_context_is_the_pipelines(folders):
    """Our context is encode_prompt's: the cleaned prompt's UMT5 states, zero past its tokens; the empty prompt's too
    (classifier-free guidance encodes "")."""
    m, pipe = model.load_model(folders["unipc"], t5_max_length=16), pipeline(folders["unipc"])
    states, neg = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, max_sequence_length=16)
    ctx, uncond = model.encode_prompts(m, PROMPTS), model.encode_prompts(m, [""])
    assert ctx.shape == states.shape == (2, 16, 32) and torch.allclose(ctx, states, atol=1e-5)
    assert torch.allclose(uncond, neg[:1], atol=1e-5) and (uncond[0, 1:] == 0).all()


@pytest.mark.parametrize("sched, guidance", [("unipc", 5.0), ("unipc", 1.0), ("euler", 5.0)])
def test_sampler_is_the_pipelines(folders, sched, guidance):
    """From the same noise, diffusion.sample's latents are WanPipeline's (its UniPC multistep sampler; the flow Euler
    one), and so is the decoded clip."""
    m, pipe = model.load_model(folders[sched], t5_max_length=16), pipeline(folders[sched])
    shape = (2, *model.latent_shape(m, 16, 5))
    assert shape == (2, 16, 3, 8, 8)  # the tiny VAE halves time and side: 5 frames -> 3
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kw = dict(height=16, width=16, num_frames=5, num_inference_steps=4, guidance_scale=guidance,
              max_sequence_length=16)
    theirs = pipe(PROMPTS, latents=noise.clone(), output_type="latent", **kw).frames
    ours = diffusion.sample(model.net(m["unet"]), m["scheduler"], model.encode_prompts(m, PROMPTS),
                            model.encode_prompts(m, [""]), noise, 4, guidance)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    video = pipe(PROMPTS, latents=noise.clone(), output_type="pt", **kw).frames  # (B, F, 3, H, W) in [0, 1]
    clips = model.latents_to_images(m["vae"], ours)  # (B, 3, F, H, W) in [-1, 1]
    assert torch.allclose(clips.transpose(1, 2) / 2 + 0.5, video, atol=1e-5)


def test_clip_latents_are_the_vaes(folders):
    """A clip's latent is the Wan VAE's encoding of the whole clip, normalized per channel by latents_mean and
    latents_std (what WanPipeline's decode undoes)."""
    m = model.load_model(folders["unipc"])
    clip = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = model.images_to_latents(m["vae"], clip, noise=torch.zeros(2, 16, 3, 8, 8))
    mean = m["vae"].encode(clip).latent_dist.mean
    c = m["vae"].config
    want = (mean - torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(z, want, atol=1e-5)


@pytest.mark.parametrize("method", ["sft", "dpo", "sspo"])
def test_each_method_trains_a_wan_model(tmp_path, run, folders, method):
    """3 updates on the tiny video world's clips through the same update; the SSPO run folder loads in WanPipeline
    and draws a clip."""
    out = str(tmp_path / "run")
    p = run(WAN + [f"--init_from={folders['unipc']}", f"--method={method}", f"--out_dir={out}"])
    assert p.returncode == 0, p.stderr[-3000:]
    train = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if r["kind"] == "train"]
    assert len(train) == 3 and all(np.isfinite(r["loss"]) for r in train)
    assert os.path.isdir(os.path.join(out, "transformer")) and not os.path.exists(os.path.join(out, "motion_adapter"))
    if method == "sspo":
        assert "flip_rate" in train[-1] and "judge_s" in train[-1]
        clip = pipeline(out)(PROMPTS[0], height=16, width=16, num_frames=5, num_inference_steps=2,
                             max_sequence_length=16, output_type="np").frames
        assert clip.shape == (1, 5, 16, 16, 3) and np.isfinite(clip).all()


def test_wan_lora_round_trip(tmp_path, run, folders):
    """A LoRA SSPO run: its lora/ loads with WanPipeline.load_lora_weights and samples what our loader's fused model
    samples; the adapter has an effect."""
    out = str(tmp_path / "lora")
    p = run(WAN + [f"--init_from={folders['unipc']}", "--method=sspo", f"--out_dir={out}", "--lora_rank=4",
                   "--lora_alpha=8.0", "--lr=1e-3"])
    assert p.returncode == 0, p.stderr[-3000:]
    pipe = pipeline(out)
    kw = dict(height=16, width=16, num_frames=5, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=16,
              output_type="latent")
    noise = torch.randn((1, 16, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    base = pipe(PROMPTS[0], latents=noise.clone(), **kw).frames
    pipe.load_lora_weights(os.path.join(out, model.LORA_DIR))
    adapted = pipe(PROMPTS[0], latents=noise.clone(), **kw).frames
    m = model.load_model(out, t5_max_length=16)  # the base in transformer/ with lora/ fused
    ours = diffusion.sample(model.net(m["unet"]), m["scheduler"], model.encode_prompts(m, PROMPTS[:1]),
                            model.encode_prompts(m, [""]), noise, 2, 3.0)
    assert (adapted - base).abs().max() > 1e-3 and torch.allclose(ours, adapted, atol=1e-5)


def test_wan_resume_is_exact_and_two_processes_equal_one(tmp_path, run, folders):
    """SSPO on Wan stopped after 2 updates and resumed: the uninterrupted run's weights, bit for bit. 2 processes x
    batch 4 against 1 x batch 8: within the float bound, and a run drawing another reference beyond it."""
    args = WAN + [f"--init_from={folders['unipc']}", "--method=sspo", "--max_steps=4", "--save_every=2",
                  "--ref_redraw=step"]
    resume_and_two_processes(run, args, tmp_path)


def test_wan_bad_input_is_one_line(tmp_path, folders):
    """Clips whose frame count the VAE cannot encode whole, channels_last for Conv3d, images for a video model, a
    UniPC scheduler not on flow sigmas: each one line before any training."""
    def fails(path, *extra, match):
        with pytest.raises(SystemExit, match=match):
            train_sspo.main(config.get_config(WAN + [f"--init_from={path}", f"--out_dir={tmp_path}/r{len(extra)}",
                                                     "--method=dpo", *extra]))
    fails(folders["unipc"], "--frames=7", match=r"frames=7: a Wan clip has 1 \+ 4 k frames")  # the tiny VAE halves time
    fails(folders["unipc"], "--channels_last=True", "--seed=1", match=r"channels_last=True with a WanPipeline model: "
                                                                      r"Conv3d has no channels_last format")
    fails(folders["unipc"], "--dataset=tiny", "--tiny_flaws=('colour',)", match=r"dataset='tiny' has images, but "
                                                                                  r"WanPipeline is a video model")
    plain = str(tmp_path / "plain")
    build.build_tiny_wan(plain)
    sched = os.path.join(plain, "scheduler", "scheduler_config.json")
    json.dump({**json.load(open(sched)), "use_flow_sigmas": False}, open(sched, "w"))
    fails(plain, match=r"a UniPC scheduler without use_flow_sigmas")
