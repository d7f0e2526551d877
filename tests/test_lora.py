"""LoRA (lora_rank > 0): peft adapters on the UNet, trained by SFT, Diffusion-DPO and SSPO; the reference is the same
UNet with its adapters off or swapped; the pool and the checkpoint hold adapters only; a kill and resume loses
nothing; the saved adapter is what diffusers' StableDiffusionPipeline.load_lora_weights reads."""
import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import config
import model
from tiny import build
from tiny import world
from conftest import FAST, ddp_bound, run_script
from test_faults import fork_main, load

LORA = FAST + ["--lora_rank=4", "--self_sample_steps=2"]


def lora_params(ckpt):
    return sum(t.numel() for t in ckpt["unet"].values())


@pytest.mark.parametrize("method", ["sft", "dpo", "sspo"])
def test_lora_trains_the_adapter_only(tmp_path, run, base, method):
    """Each method trains the adapter and nothing else: the base in unet/ is the one it started from, the checkpoint
    holds the adapter's tensors only, and the adapter moved off its start (B = 0)."""
    out = str(tmp_path / method)
    p = run(LORA + [f"--out_dir={out}", f"--init_from={base}", f"--method={method}", "--tiny_mode=pairs",
                    "--ckpt_every=2", "--ref_policy=last"])
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = load(os.path.join(out, "ckpt.pt"))
    assert ckpt["unet"] and all(".lora_A." in k or ".lora_B." in k for k in ckpt["unet"])
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in ckpt["unet"].items())
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["unet"])  # AdamW got the adapter's parameters only
    same = load_file(os.path.join(base, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(same[k], v) for k, v in load_file(os.path.join(out, "unet",
                                                                          "diffusion_pytorch_model.safetensors")).items())
    assert os.path.isfile(os.path.join(out, model.LORA_DIR, model.LORA_FILE))
    if method == "sspo":
        assert "ref = snapshot of step 2" in p.stdout  # the pushed adapter is the reference


def test_pool_snapshots_are_adapters(tmp_path, run, base):
    """A disk pool's snapshot is the adapter as it was when pushed: theta_0's is the adapter at its start (B = 0, the
    adapters off), the push at step 2 holds the values of the step-2 checkpoint's adapter, tensor for tensor. Its bytes
    are the adapter's parameter count x 4 (fp32) plus a small header, a few percent of the tiny UNet's (SD1.5 at rank
    8: 3.2M of 859.5M parameters)."""
    out = str(tmp_path / "run")
    p = run(LORA + [f"--out_dir={out}", f"--init_from={base}", "--method=sspo", "--pool_storage=disk",
                    "--ckpt_every=2", "--save_every=2", "--keep_checkpoints=3"])
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = load(os.path.join(out, "ckpt.pt"))
    n, full = lora_params(ckpt), sum(t.numel() for t in load_file(os.path.join(base, "unet",
                                                                               "diffusion_pytorch_model.safetensors")).values())
    files = sorted(os.listdir(os.path.join(out, "pool")))
    assert files == ["snapshot_00000000.safetensors", "snapshot_00000002.safetensors"]  # no push at the end
    for f in files:
        size = os.path.getsize(os.path.join(out, "pool", f))
        assert 4 * n <= size < 4 * n + 32 * 1024, (f, size, n)
    assert n < full / 20
    theta_0, pushed = (load_file(os.path.join(out, "pool", f)) for f in files)
    at_2 = load(os.path.join(out, "ckpt_00000002.pt"))["unet"]
    assert pushed.keys() == at_2.keys() == ckpt["unet"].keys()
    assert all(torch.equal(pushed[k], at_2[k]) for k in at_2)
    assert not all(torch.equal(pushed[k], ckpt["unet"][k]) for k in at_2)  # the adapter moved on after the push
    assert all(v.abs().max() == 0 for k, v in theta_0.items() if ".lora_B." in k)


def test_killed_lora_sspo_resumes_to_the_same_adapter(tmp_path):
    """A LoRA SSPO run killed mid-way (after an update, past its step-2 checkpoint) and resumed ends with the
    uninterrupted run's adapter, optimizer state and pool, bit for bit."""
    args = LORA + ["--method=sspo", "--max_steps=6", "--save_every=2", "--ckpt_every=1", "--pool_capacity=3",
                   "--auto_resume=True"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    code, text = fork_main(args + [f"--out_dir={ref}"])
    assert code == 0, text[-3000:]
    code, text = fork_main(args + [f"--out_dir={out}"], fault="step@3")
    assert code == 137, text[-3000:]
    code, text = fork_main(args + [f"--out_dir={out}"])
    assert code == 0 and "at step 2" in text, text[-3000:]
    a, b = load(os.path.join(ref, "ckpt.pt")), load(os.path.join(out, "ckpt.pt"))
    assert b["step"] == 6 and a["unet"].keys() == b["unet"].keys()
    assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert [e["step"] for e in a["pool"]["entries"]] == [e["step"] for e in b["pool"]["entries"]]
    assert all(torch.equal(ea["state"][k], eb["state"][k]) for ea, eb in zip(a["pool"]["entries"], b["pool"]["entries"])
               for k in ea["state"])


def test_saved_adapter_loads_in_stable_diffusion_pipeline(tmp_path, run):
    """A latent SD-layout model (with a VAE) fine-tuned with LoRA: diffusers' pipeline loads the run folder's base,
    then load_lora_weights(run/lora) changes its images; model.load_model (evaluate.py's path) fuses the same
    adapter, so its UNet gives the pipeline's output with the adapter."""
    sd = build.build_tiny_model(str(tmp_path / "sd"), world.WORDS, resolution=16, with_vae=True)
    out = str(tmp_path / "run")
    p = run(LORA + [f"--out_dir={out}", f"--init_from={sd}", "--max_steps=2", "--lr=1e-2", "--lora_alpha=8.0"])
    assert p.returncode == 0, p.stderr[-3000:]
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, local_files_only=True)
    gen = lambda: pipe("a red circle on the left", num_inference_steps=2, height=16, width=16, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images
    before = gen()
    pipe.load_lora_weights(os.path.join(out, model.LORA_DIR))
    after = gen()
    assert abs(after - before).max() > 1e-3  # the adapter changes the images
    fused = model.load_model(out)["unet"]
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(fused(x, t, encoder_hidden_states=ctx).sample,
                              pipe.unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-5)


def test_lora_reference_switches_back_to_the_trained_adapter(tmp_path):
    """The reference (adapters off, or the 'ref' adapter) leaves the trained adapter active and alone trainable;
    with adapters off it is the base exactly, and a snapshot of the policy in 'ref' gives the policy's output."""
    m = model.load_model(build.build_tiny_model(str(tmp_path), world.WORDS))
    unet, cfg = m["unet"], dict(config.defaults(), lora_rank=4)
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=ctx).sample
    trained = model.add_lora(unet, cfg, ("default", "ref"))
    with torch.no_grad():
        for p in trained:
            p.add_(0.1 * torch.randn_like(p))
    ref = model.LoraReference(unet)
    ref.load(None, 0)  # theta_0
    assert torch.equal(ref(x, t, encoder_hidden_states=ctx).sample, base)
    assert model.check_trained_adapter(unet) == trained
    policy = unet(x, t, encoder_hidden_states=ctx).sample
    assert policy.requires_grad and (policy - base).abs().max() > 1e-3
    ref.load(model.lora_state(unet), 5)
    assert torch.equal(ref(x, t, encoder_hidden_states=ctx).sample, policy.detach())
    assert [p for p in unet.parameters() if p.requires_grad] == trained


@pytest.mark.parametrize("args, message", [
    (["--lora_rank=-1"], "lora_rank and lora_alpha must be >= 0"),
    (["--lora_rank=4", "--ema_decay=0.9"], "with ema_decay=0.9"),
    (["--lora_rank=4", "--train_text_encoder=True"], "with train_text_encoder=True"),
    (["--lora_rank=4", "--lora_targets=()"], "lora_targets must be module names")])
def test_lora_config_errors(args, message):
    with pytest.raises(SystemExit, match=message):
        model.check_config(config.get_config(args))


def test_evaluate_scores_a_lora_run_like_a_full_one(tmp_path, run, base):
    """evaluate.py takes a LoRA run folder as it takes any run: the adapter fused into the base it names, and the
    adapter's bytes in the hash of what was scored."""
    out = str(tmp_path / "run")
    assert run(LORA + [f"--out_dir={out}", f"--init_from={base}", "--max_steps=2"]).returncode == 0
    p = run_script([out, "--base", base, "--images_per_prompt=1", "--steps=2"], script="evaluate.py")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.load(open(os.path.join(out, "eval", "scores.json")))
    assert len(s["per_image"]) == 48 and s["unet_sha256"] != s["base_unet_sha256"]


def test_lora_sspo_under_ddp_equals_one_process(tmp_path, run, base):
    """2 processes x batch 4 == 1 process x batch 8 for LoRA SSPO: DDP reduces the adapter's gradients only, and every
    rank switches its reference adapter as the others do."""
    args = LORA + ["--method=sspo", f"--init_from={base}", "--ckpt_every=1", "--ref_redraw=step"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert run(args + [f"--out_dir={one}", "--batch_size=8"]).returncode == 0
    p = run(args + [f"--out_dir={two}", "--batch_size=4"], torchrun=2)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    # the control, a real difference: one process whose reference is redrawn every other update instead (a rank that
    # kept another snapshot would differ so)
    three = str(tmp_path / "three")
    assert run(args + [f"--out_dir={three}", "--batch_size=8", "--ckpt_every=2"]).returncode == 0
    w1, w2, w3 = (load(os.path.join(d, "ckpt.pt"))["unet"] for d in (one, two, three))
    d12 = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    d13 = max((w1[k] - w3[k]).abs().max().item() for k in w1)
    assert d12 < ddp_bound(args) < d13, (d12, ddp_bound(args), d13)  # float tolerance from the lr (conftest.ddp_bound)


def test_lora_with_gradient_checkpointing_trains_the_same_adapter(tmp_path, run, base):
    """The frozen base's blocks, recomputed in the backward, still pass the gradient to the adapters inside them (a
    reentrant checkpoint of a block whose inputs need no gradient would give them none)."""
    outs = [str(tmp_path / f"gc{on}") for on in (0, 1)]
    for out, on in zip(outs, (False, True)):
        p = run(LORA + [f"--out_dir={out}", f"--init_from={base}", "--max_steps=2", f"--grad_checkpointing={on}"])
        assert p.returncode == 0, p.stderr[-3000:]
    w0, w1 = (load(os.path.join(d, "ckpt.pt"))["unet"] for d in outs)
    assert any(w0[k].abs().max() > 0 for k in w0 if "lora_B" in k)
    assert all(torch.allclose(w0[k], w1[k], atol=1e-6) for k in w0)
