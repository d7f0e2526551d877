"""bench.py: one real run on the tiny world prints finite ratios; the SD1.5 code path runs (at a reduced width);
the opt-in fast path of train_sspo.py trains."""
import math
import os
import re

import pytest
import torch

import config
import diffusion
import model
from dev import bench
from conftest import FAST, ROOT, run_script


def ratios_of(text):
    return {k: float(v) for k, v in re.findall(r"^  ([A-Za-z /()-]+): ([-+]?[\d.]+|nan|inf)\b", text, re.M)}


def test_bench_tiny_prints_finite_ratios():
    # medians of 3 after a warmup (about 12 s alone on 2 cores): a single timing of each phase once gave a floor
    # ratio of 0.41 when the machine stalled during one of them (0.90-1.05 otherwise)
    r = run_script(["--iters=3", "--warmup=1", "--batch_size=4"], script="dev/bench.py", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = re.findall(r"^(sft|dpo|sspo) +([\d.]+) +([\d.]+)", r.stdout, re.M)
    assert [m for m, *_ in rows] == ["sft", "dpo", "sspo"], r.stdout
    assert all(float(ms) > 0 and float(sps) > 0 for _, ms, sps in rows)
    ratios = ratios_of(r.stdout)
    for key in ("sspo step / floor", "snapshot swap / sspo step", "self-sampling util", "sample / (K x guided forward)"):
        assert key in ratios and math.isfinite(ratios[key]) and ratios[key] > 0, (key, r.stdout)
    # the floor is DPO's step plus K sampler forwards: SSPO's step cannot be far below it
    assert ratios["sspo step / floor"] > 0.5
    assert "target <= 1.15" in r.stdout and "cond+uncond in one of 2B" in r.stdout
    # configs/tiny.py trains in float32; bf16 autocast on CPU is measured as a variant
    assert "guided forward: fp32 -> bf16 autocast (CPU)" in r.stdout and "bf16 autocast False" in r.stdout
    width = config.get_config([os.path.join(ROOT, "configs/tiny_base.py")])["unet_channels"]  # what the fine-tunes train
    assert f"tiny world UNet {width}" in r.stdout and width != config.defaults()["unet_channels"]


def test_bench_sd15_on_cpu_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^bench error: --sd15 needs a GPU[^\n]*$"):
        bench.main(["--sd15"])


def narrow(monkeypatch):
    monkeypatch.setitem(bench.SD15_UNET, "block_out_channels", (32, 32, 64, 64))
    monkeypatch.setitem(bench.SD15_UNET, "attention_head_dim", 4)
    monkeypatch.setitem(bench.SD15_VAE, "block_out_channels", (32, 32, 32, 32))
    monkeypatch.setitem(bench.SD15_TEXT, "num_hidden_layers", 1)


def test_write_sd15_folder_trains_with_the_sd15_config(monkeypatch, tmp_path, run):
    """--write_sd15's folder (here at a reduced width) loads through from_pretrained and configs/sd15.py trains on
    it: Pick-a-Pic shard, VAE, disk snapshot pool, bf16 reference, gradient checkpointing."""
    narrow(monkeypatch)
    sd = str(tmp_path / "sd")
    bench.write_sd15(sd, n_rows=4)
    r = run(["configs/sd15.py", f"--init_from={sd}", f"--data_path={sd}/train", f"--out_dir={tmp_path}/run",
             "--resolution=64", "--batch_size=2", "--grad_accum=1", "--max_steps=2", "--self_sample_steps=2",
             "--ckpt_every=1", "--eval_every=2", "--save_every=2", "--n_eval_images=2", "--sample_steps=2",
             "--num_workers=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2: loss" in r.stdout and "ref = snapshot of step" in r.stdout
    snapshots = [f for f in os.listdir(f"{tmp_path}/run/pool") if f.endswith(".safetensors")]
    assert len(snapshots) >= 2 and os.path.isdir(f"{tmp_path}/run/unet"), os.listdir(f"{tmp_path}/run/pool")


def test_bench_sd15_code_path_runs_at_reduced_width(monkeypatch, capsys, tmp_path):
    # SD1.5's block types and configs/sd15.py, but narrow levels, one text layer, 8x8 latents, 2 sampler steps
    cfg = tmp_path / "sd15_short.py"
    cfg.write_text(open(f"{ROOT}/configs/sd15.py").read() + "\nself_sample_steps = 2\nbatch_size = 1\n")
    narrow(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ratios = bench.main(["--sd15", f"--config={cfg}", "--resolution=64", "--iters=1", "--warmup=0", "--methods=dpo,sspo"])
    out = capsys.readouterr().out
    assert "SD1.5-shaped UNet" in out and "sspo floor" in out and "images -> latent cache (latents.py)" in out
    assert all(math.isfinite(v) for v in ratios.values()) and "sspo step / floor" in ratios


def test_opt_in_channels_last_trains(run, tmp_path):
    # compile_unet is not run here: inductor's first compile takes minutes on CPU
    r = run(FAST + ["--method=sspo", "--tiny_mode=pairs", "--self_sample_steps=2", "--channels_last=True",
                    f"--out_dir={tmp_path}/cl"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 4: loss" in r.stdout


def test_bench_latents_mode_skips_the_vae_and_keeps_the_step(monkeypatch, tmp_path):
    """--latents: the step draws its latents from the VAE's stored moments (as a latent_cache run does), so the
    VAE encoder's FLOPs leave the encode phase and the UNet's FLOPs stay the same."""
    narrow(monkeypatch)
    cfg = config.get_config(["configs/sd15.py", "--data_path=.", "--resolution=64", "--batch_size=2",
                                 "--self_sample_steps=2"])
    cpu = torch.device("cpu")
    counts = {}
    for from_cache in (False, True):
        P = bench.build(cfg, True, cpu, str(tmp_path / str(from_cache)), from_cache)
        batch = next(P["batches"])[0]
        assert ("latent_w" in batch) == from_cache and ("image_w" in batch) != from_cache
        counts[from_cache] = {m: bench.count_flops(m, P, cfg) for m in ("sft", "dpo")}
    # the encode phase also holds the text encoder's first look at each prompt: the same in both
    vae = {m: counts[False][m]["encode"] - counts[True][m]["encode"] for m in ("sft", "dpo")}
    assert vae["sft"] > 0 and vae["dpo"] == 2 * vae["sft"], counts  # DPO encodes its losers too
    for m in ("sft", "dpo"):
        assert counts[False][m]["policy"] == counts[True][m]["policy"] > 0


def test_bench_latents_needs_a_vae():
    with pytest.raises(SystemExit, match=r"^bench error: --latents needs --sd15"):
        bench.main(["--latents"])


def test_gpu_only_rows_run(monkeypatch, tmp_path):
    # the rows bench prints only on a GPU, run here on CPU so that a GPU session does not find their bugs
    narrow(monkeypatch)
    cfg = config.get_config(["configs/sd15.py", "--data_path=.", "--resolution=64", "--batch_size=1"])
    P = bench.build(cfg, True, torch.device("cpu"), str(tmp_path))
    rows = bench.gpu_variants(P, cfg, 0, 1)
    assert [r[0].split(":")[0] for r in rows] == ["guided forward"] * 2 + ["policy fwd+bwd"] * 2 + \
        ["guided forward, bf16 reference"]
    for what, before, after, _ in rows:
        assert before > 0 and (after == 0 if "kernels" in what else after > 0), (what, before, after)  # no GPU
    assert torch.backends.cudnn.benchmark is False  # put back


@pytest.mark.parametrize("argv, match", [
    (["--set", "ema_decay=0.999"], r"ema_decay=0.999 \(from the config or --set\) is not applied here: the EMA"),
    (["--set", "compile_unet=regional"], r"compile_unet=.regional. .* pass --compile instead"),
    (["--config=configs/tiny_inversion_dpo.py"], r"noising='ddim_inversion' .* only the forward process"),
    (["--set", "tiny_size=4", "--batch_size=8"], r"the dataset has 4 examples, fewer than one micro-batch of 8$"),
])
def test_bench_refuses_what_it_would_not_time(argv, match):
    with pytest.raises(SystemExit, match=r"^bench error: " + match):
        bench.main(["--no_variants", "--iters=1", "--warmup=0", "--methods=sft", *argv])


def test_attention_backward_counts_model_flops():
    """Attention's backward is twice its forward in model FLOPs; torch's counter adds the kernels' recompute of
    q @ k^T (2.5x), which would overstate utilization."""
    q, k, v = (torch.randn(2, 3, 64, 8, requires_grad=True) for _ in range(3))
    with torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping=bench.SDPA_FLOPS) as fc:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        fwd = fc.get_total_flops()
        out.sum().backward()
    assert fwd == 2 * (2 * 2 * 3 * 64 * 64 * 8) and fc.get_total_flops() - fwd == 2 * fwd


def test_guided_forward_at_guidance_one_is_one_batch_as_the_sampler_runs_it(tmp_path):
    cfg = config.get_config(["configs/tiny.py", "--tiny_mode=pairs", "--batch_size=2"])
    P = bench.build(cfg, False, torch.device("cpu"), str(tmp_path))
    flops = {}
    for g in (3.0, 1.0):
        c = {**cfg, "self_sample_guidance": g}
        with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
            bench.guided_forward(P, c)()
        with torch.utils.flop_counter.FlopCounterMode(display=False) as fs:
            diffusion.ddim_sample(model.net(P["ref_unet"]), P["m"]["scheduler"], torch.zeros(2, 77, P["uncond"].shape[-1]),
                              P["uncond"], torch.randn(2, *P["shape"]), 1, g)
        flops[g] = fc.get_total_flops()
        assert flops[g] == fs.get_total_flops()  # one sampler step's UNet work, whatever the guidance
    assert flops[3.0] == 2 * flops[1.0]


def test_profile_and_regional_compile_rows(monkeypatch, capsys, tmp_path):
    # --profile and --compile regional on CPU at reduced width; dynamo's eager backend stands in for inductor
    # (whose first compile takes minutes here), so the compiled short run must match the eager one
    cfg = tmp_path / "sd15_short.py"
    cfg.write_text(open(f"{ROOT}/configs/sd15.py").read() + "\nself_sample_steps = 2\nbatch_size = 1\n")
    narrow(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    compiled = []
    compile = torch.nn.Module.compile
    def eager_compile(self, **kw):
        compiled.append(type(self).__name__)
        compile(self, backend="eager", **kw)
    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    argv = ["--sd15", f"--config={cfg}", "--resolution=64", "--iters=1", "--warmup=0", "--methods=sft", "--no_variants",
            "--profile", "--compile", "regional"]
    same = bench.main(argv)["short run: compiled vs eager"]
    out = capsys.readouterr().out
    assert set(compiled) == {"ResnetBlock2D", "Transformer2DModel"}, set(compiled)
    assert "guided forward, batch 1: wall" in out and "policy fwd+bwd, batch 1: wall" in out and "aten::" in out
    assert "policy fwd+bwd: eager -> torch.compile (regional)" in out and "within bf16's tolerance" in out
    # on CPU both short runs are fp32: they differ only by the kernels' run-to-run rounding, which Adam's
    # normalisation turns into steps of up to lr on near-zero gradients (measured 0.3-1.2% of the distance trained)
    # a "compiled" model that computes something else fails the check
    def wrong_compile(self, **kw):
        self.register_forward_hook(lambda mod, args, out: out * 1.01 if torch.is_tensor(out) else out)  # the ResNets
    monkeypatch.setattr(torch.nn.Module, "compile", wrong_compile)
    wrong = bench.main([a for a in argv if a != "--profile"])["short run: compiled vs eager"]
    assert "compile is NOT within bf16's tolerance" in capsys.readouterr().out
    assert wrong > 10 * same, (wrong, same)
