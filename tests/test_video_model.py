"""Text-to-video: an AnimateDiff model (SD1.5's parts + a MotionAdapter, loaded as diffusers' UNetMotionModel) in
the same loop: the sampler is AnimateDiffPipeline's, every method trains on clips (the motion modules only, or the
whole UNet), a run resumes exactly, and the run folder loads in AnimateDiffPipeline, its motion_adapter/ too."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter
from safetensors.torch import load_file

import diffusion
import model
from tiny import build
from tiny import video
from conftest import FAST
from test_faults import load

R, F = 16, 4  # 16 px (8x8 latents with the tiny VAE), 4 frames
CLIPS = FAST + ["--dataset=tiny_video", "--tiny_flaws=('static', 'direction', 'jitter', 'colour')", f"--resolution={R}", f"--frames={F}", "--self_sample_steps=2"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """An SD-layout folder (with a VAE) and, apart, a MotionAdapter folder, as the hub ships AnimateDiff's."""
    root = tmp_path_factory.mktemp("animatediff")
    sd = build.build_tiny_model(str(root / "sd"), video.WORDS, resolution=R, with_vae=True)
    torch.manual_seed(1)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=8,
                            motion_num_attention_heads=4, motion_max_seq_length=32)
    for p in adapter.parameters():  # diffusers zero-initialises the temporal layers' output: make them matter
        torch.nn.init.normal_(p, std=0.05)
    adapter.save_pretrained(str(root / "adapter"))
    return sd, str(root / "adapter")


def test_sampler_is_animatediff_pipelines(parts):
    """ddim_sample of a clip with guidance = AnimateDiffPipeline with a DDIMScheduler, the same noise, the empty
    negative prompt; the temporal layers are in it (another adapter changes the clip)."""
    sd, adapter = parts
    m = model.load_model(sd, motion_adapter=adapter)
    assert model.is_video(m["unet"]) and model.latent_shape(m, R, F) == (4, F, R // 2, R // 2)
    prompts = ["a red circle moving left", "a blue square growing"]
    noise = torch.randn(2, 4, F, R // 2, R // 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = model.encode_prompts(m, prompts), model.encode_prompts(m, [""])
    ours = diffusion.ddim_sample(model.net(m["unet"]), m["scheduler"], cond, uncond, noise, steps=3, guidance=3.0)
    pipe = AnimateDiffPipeline.from_pretrained(sd, motion_adapter=MotionAdapter.from_pretrained(adapter),
                                               local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(prompts, negative_prompt=["", ""], num_frames=F, height=R, width=R, num_inference_steps=3,
                  guidance_scale=3.0, latents=noise.clone(), output_type="latent").frames
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    plain = model.load_model(sd, motion_adapter=adapter)
    with torch.no_grad():
        for n, p in plain["unet"].named_parameters():
            if ".motion_modules." in n:
                p.zero_()
    other = diffusion.ddim_sample(model.net(plain["unet"]), m["scheduler"], cond, uncond, noise, steps=3, guidance=3.0)
    assert not torch.allclose(ours, other, atol=1e-3)
    clips = model.latents_to_images(m["vae"], ours)
    assert clips.shape == (2, 3, F, R, R)


@pytest.mark.parametrize("method", ["sft", "dpo", "spin", "sspo"])
def test_methods_train_the_motion_modules_on_clips(tmp_path, run, parts, method):
    """A few updates of each method on clips of the tiny video world, the motion modules only: the spatial weights
    end as they began, the motion modules do not; the run folder loads in AnimateDiffPipeline, and its
    motion_adapter/ on the SD base gives the same clip."""
    sd, adapter = parts
    out = str(tmp_path / method)
    extra = ["--method=sspo", "--ref_policy=last", "--ssr=off"] if method == "spin" else [f"--method={method}"]
    p = run(CLIPS + extra + [f"--out_dir={out}", f"--init_from={sd}", f"--motion_adapter={adapter}",
                             "--trained_modules=motion", "--tiny_mode=pairs", "--ckpt_every=2"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "judge on seen / held-out prompts" in p.stdout and os.path.isfile(os.path.join(out, "samples", "step000004.gif"))
    ckpt = load(os.path.join(out, "ckpt.pt"))
    assert ckpt["unet"] and all(".motion_modules." in k for k in ckpt["unet"])
    start = model.load_model(sd, motion_adapter=adapter)["unet"].state_dict()
    end = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert moved and all(".motion_modules." in k for k in moved)
    pipe = AnimateDiffPipeline.from_pretrained(out, local_files_only=True)
    kw = dict(num_frames=F, height=R, width=R, num_inference_steps=2, output_type="latent",
              latents=torch.randn(1, 4, F, R // 2, R // 2, generator=torch.Generator().manual_seed(0)))
    frames = pipe("a red circle moving left", **kw).frames
    again = AnimateDiffPipeline.from_pretrained(
        sd, motion_adapter=MotionAdapter.from_pretrained(os.path.join(out, "motion_adapter")), local_files_only=True)
    assert torch.allclose(frames, again("a red circle moving left", **kw).frames, atol=1e-5)
    pil = pipe("a red circle moving left", num_frames=F, height=R, width=R, num_inference_steps=2).frames[0]
    assert len(pil) == F and np.asarray(pil[0]).shape == (R, R, 3)


def test_tiny_video_model_trains_whole_resumes_exactly_and_evaluates(tmp_path, run):
    """The tiny video world's own model (pixel space, from scratch, the whole UNet trained): 4 updates in one go
    equal 2, then a resume for 2 more, bit for bit; evaluate.py judges it."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p = run(CLIPS + [f"--out_dir={one}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "AnimateDiffPipeline" in open(os.path.join(one, "model_index.json")).read()
    p = run(CLIPS + [f"--out_dir={two}", "--save_every=2"])
    assert p.returncode == 0, p.stderr[-3000:]
    os.remove(os.path.join(two, "ckpt.pt"))
    os.remove(os.path.join(two, "ckpt_00000004.pt"))
    os.link(os.path.join(two, "ckpt_00000002.pt"), os.path.join(two, "ckpt.pt"))
    p = run(CLIPS + [f"--out_dir={two}", "--save_every=2", "--init_from=resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load(os.path.join(one, "ckpt.pt"))["unet"], load(os.path.join(two, "ckpt.pt"))["unet"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # evaluate.py on a video run: the video judge on seen and held-out prompts, its parts and kinds, the win rate
    # against another run on the same noise, a strip and GIFs of both
    p = run([one, "--base", two, "--images_per_prompt=1", "--steps=2"], script="evaluate.py")
    assert p.returncode == 0, p.stderr[-3000:]
    scores = json.load(open(os.path.join(one, "eval", "scores.json")))
    assert len(scores["per_image"]) == len(video.ALL_COMBOS) and "win_rate_vs_base" in scores
    assert set(video.PARTS) | set(video.KINDS) <= set(scores["breakdown"]["run"]) and "data" in scores["breakdown"]
    assert scores["breakdown"]["data"]["judge"] > 0.5  # the base distribution's clips: 40% correct, the rest flawed
    assert scores["breakdown"]["data"]["moves_left"][0] < -0.2 < 0.2 < scores["breakdown"]["data"]["moves_right"][0]
    for f in ("grid.png", "grid.gif", "side_by_side.png", "side_by_side.gif"):
        assert os.path.isfile(os.path.join(one, "eval", f)), f


def test_video_bad_input_is_one_line(tmp_path, run, parts):
    sd, adapter = parts
    cases = [([f"--init_from={sd}", f"--motion_adapter={tmp_path}/nothing"], "motion adapter folder"),
             ([f"--init_from={sd}"], "an image model (motion_adapter="),
             ([f"--init_from={sd}", "--dataset=tiny", "--tiny_flaws=('colour',)", "--trained_modules=motion"], "has none")]
    for args, want in cases:
        p = run(CLIPS + [f"--out_dir={tmp_path / 'run'}", *args])
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 1 and last.startswith("error: ") and want in last, (args, p.stderr[-2000:])


def test_evaluate_against_reference_clips(tmp_path, run, capsys):
    """evaluate.py --references: one clip per reference prompt, PSNR and SSIM per clip against its reference, FID and
    FVD of each model's set against the references' through TorchScript detectors (stand-ins here), a detector not
    found reported as skipped with the path looked for; the references' frames come at the run's size and count."""
    import evaluate
    from test_scorers import fake_detectors
    one = str(tmp_path / "one")
    p = run(CLIPS + [f"--out_dir={one}", "--max_steps=2"])
    assert p.returncode == 0, p.stderr[-3000:]
    refs = tmp_path / "refs"
    lines = []
    for i, combo in enumerate(video.ALL_COMBOS[:5]):  # frame folders of 6 frames at 24 px: cut to 4, resized to 16
        os.makedirs(refs / f"c{i}")
        for k, frame in enumerate(video.render_clip(combo, 6, 24, np.random.default_rng(i))):
            Image.fromarray(frame).save(refs / f"c{i}" / f"{k:02d}.png")
        lines.append(json.dumps({"file_name": f"c{i}", "text": video.prompt_of(combo)}) + "\n")
    (refs / "metadata.jsonl").write_text("".join(lines))
    det = fake_detectors(str(tmp_path))
    evaluate.main([one, "--base", one, "--references", str(refs), "--steps=2", "--images_per_prompt=1",
                   "--batch_size=2", "--weights", f"fid={det['fid']}", f"fvd={tmp_path / 'no_i3d.pt'}"])
    assert f"skipped fvd: no such file (looked for {tmp_path / 'no_i3d.pt'})" in capsys.readouterr().out
    s = json.load(open(os.path.join(one, "eval", "scores.json")))
    assert [r["prompt"] for r in s["per_image"]] == [video.prompt_of(c) for c in video.ALL_COMBOS[:5]]
    assert 0 < s["psnr_all_run"] < 60 and -1 < s["ssim_all_run"] < 1 and s["fid_run"] > 0 and "fvd_run" not in s
    assert s["psnr_all_run"] == s["psnr_all_base"] and s["fid_run"] == s["fid_base"]  # the same model, the same noise
    assert s["win_rates"]["psnr"] == 0.5  # every clip ties with itself
    evaluate.main([one, "--references", str(refs), "--steps=2", "--images_per_prompt=1", "--weights", f"fvd={det['fvd']}",
                   "--metrics=psnr,fvd"])
    again = json.load(open(os.path.join(one, "eval", "scores.json")))  # one batch of 5 this time, not 2 + 2 + 1
    assert again["fvd_run"] > 0 and abs(again["psnr_all_run"] - s["psnr_all_run"]) < 1e-4
    os.remove(refs / "c3" / "05.png"), os.remove(refs / "c3" / "04.png"), os.remove(refs / "c3" / "03.png")
    for args, want in [(["--metrics=fid"], "error: --metrics: FID and FVD score a set; add psnr or ssim"),
                       (["--prompts", "x.txt"], "error: --references brings its own prompts: drop --prompts"),
                       ([], f"error: --references: {refs / 'c3'}")]:
        with pytest.raises(SystemExit, match="^" + re.escape(want)):
            evaluate.main([one, "--references", str(refs), "--steps=2", *args])
