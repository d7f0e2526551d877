"""evaluate.py on a real (tiny, short) run: the protocol, the files, the win rate, and its errors."""
import json
import os
import re
import shutil
import subprocess
import sys

from PIL import Image

from tiny import world
from conftest import FAST, ROOT, run_script


def evaluate(*args):
    return run_script(list(args), script="evaluate.py")


def test_evaluate_a_run_against_a_base(tmp_path, run, base):
    a, b = base, str(tmp_path / "b")  # the shared 2-step base run (read only: its evaluation goes to --out)
    assert run(FAST + [f"--out_dir={b}", "--max_steps=2", "--seed=1"]).returncode == 0
    p = evaluate(b, "--base", a, "--images_per_prompt=1", "--steps=2")  # the command line once, then in-process
    assert p.returncode == 0, p.stderr[-3000:]
    assert "protocol: {'sampler': 'DDIM, eta 0', 'steps': 2" in p.stdout and "| base |" in p.stdout
    s = json.load(open(os.path.join(b, "eval", "scores.json")))
    assert len(s["per_image"]) == 48 and s["protocol"]["guidance"] == 3.0 and s["step"] == 2
    assert 0 <= s["judge_seen_run"] <= 1 and 0 <= s["win_rate_vs_base"] <= 1
    assert os.path.isfile(os.path.join(b, "eval", "grid.png")) and os.path.isfile(os.path.join(b, "eval", "side_by_side.png"))
    # the breakdown: the run, the base and the training data's images, each kind's share adding up to one
    for k in ("run", "base", "data"):
        br = s["breakdown"][k]
        assert set(br) >= {"judge", "colour", "position", "shape", "clean", "at_left", "at_bottom"}
        assert sum(br[kind] for kind in world.KINDS) == pytest.approx(1)
    assert s["breakdown"]["run"]["judge"] == pytest.approx((40 * s["judge_seen_run"] + 8 * s["judge_heldout_run"]) / 48)
    assert s["breakdown"]["data"]["judge"] > 0.7 and s["breakdown"]["data"]["correct"] > 0.25  # the base distribution
    assert "| data | 0.8" in p.stdout and "| model | left | right | top | bottom |" in p.stdout
    # side_by_side.png: 48 rows (the prompts) in 3 blocks of 16, each row a base and a run tile with their scores
    assert Image.open(os.path.join(b, "eval", "side_by_side.png")).size == (3 * (170 + 2 * 68), 14 + 16 * 78)
    # against itself, with the same noise, every image ties: exactly one half
    ev.main([a, "--base", a, "--images_per_prompt=1", "--steps=2", f"--out={tmp_path}/self"])
    assert json.load(open(tmp_path / "self" / "scores.json"))["win_rate_vs_base"] == 0.5
    # a second evaluation of b without a base replaces scores.json and leaves no comparison it does not describe
    ev.main([b, "--images_per_prompt=1", "--steps=2"])
    assert not os.path.exists(os.path.join(b, "eval", "side_by_side.png"))
    assert "win_rate_vs_base" not in json.load(open(os.path.join(b, "eval", "scores.json")))


def test_evaluate_errors(tmp_path, base, capsys):
    def fails(*args):  # in this process: each error is one SystemExit line, before any sampling
        with pytest.raises(SystemExit) as e:
            ev.main(list(args))
        return str(e.value.code)
    assert fails(str(tmp_path / "nothing")).endswith("ckpt.pt not found: not a run directory of train_sspo.py")
    # SD1.5's schedule takes at most 999 DDIM steps (steps_offset 1); 2000 would silently sample at t = 1 only
    for args, message in ((["--steps=1000"], "error: --steps=1000 does not fit the scheduler's 1000 timesteps"),
                          (["--steps=2000"], "error: --steps=2000 does not fit"),
                          (["--steps=0"], "error: --steps must be >= 1, got 0"),
                          (["--guidance=-7.5"], "error: --guidance must be >= 0 (1.0: no guidance), got -7.5"),
                          (["--images_per_prompt=0"], "error: --images_per_prompt must be >= 1, got 0")):
        assert message in fails(base, *args, f"--out={tmp_path}/eval")
    # a base model whose schedule cannot take the run's steps (steps_offset 2: 499 x 2 + 2 = 1000) stops before sampling
    other = tmp_path / "offset2"
    shutil.copytree(base, other, ignore=shutil.ignore_patterns("ckpt*", "pool", "samples", "eval"))
    config = json.load(open(other / "scheduler" / "scheduler_config.json"))
    json.dump({**config, "steps_offset": 2}, open(other / "scheduler" / "scheduler_config.json", "w"))
    capsys.readouterr()
    message = fails(base, "--base", str(other), "--steps=500", "--images_per_prompt=1", f"--out={tmp_path}/eval")
    assert message.startswith(f"error: {other}: --steps=500 does not fit"), message
    out = capsys.readouterr()
    assert "sampling" not in out.out + out.err
    assert not os.path.exists(tmp_path / "eval")


# -----------------------------------------------------------------------------------------------------------------
# the paper's path: a latent (VAE) run, a prompt file, the five scorers on tiny random weights, torchrun

import pytest
import torch

import config
import evaluate as ev
from test_scorers import save_tiny_scorers
from tiny import build


def fake_run(path, dataset="imagefolder", seed=0, step=7):
    """A tiny SD-layout model (with a VAE) plus the ckpt.pt fields evaluate.py reads: a run directory, no training."""
    build.build_tiny_model(path, world.WORDS, with_vae=True, seed=seed)
    cfg = dict(config.defaults(), dataset=dataset, data_path="unused", method="sspo")
    torch.save({"config": cfg, "step": step}, os.path.join(path, "ckpt.pt"))
    return path


@pytest.fixture(scope="module")
def paper_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("paper")
    weights = save_tiny_scorers(str(d / "scorers"))
    weights["aesthetic"] = str(d / "scorers" / "missing_head.pth")  # not there: skipped, never a crash
    with open(d / "prompts.txt", "w") as f:
        f.write("a red circle on the left\n\na blue square at the top\na photo of a cat\nsunset\na green thing\n")
    run, base = fake_run(str(d / "run")), build.build_tiny_model(str(d / "base"), world.WORDS, with_vae=True, seed=1)
    args = [run, "--base", base, "--prompts", str(d / "prompts.txt"), "--steps=2", "--batch_size=2",
            "--weights", *[f"{k}={v}" for k, v in weights.items()]]
    return d, args, weights


def test_evaluate_paper_metrics_on_a_latent_run(paper_setup):
    d, args, weights = paper_setup
    # one thread, as each torchrun rank below: with two, a batch of one image rounds otherwise (4e-4 in pickscore)
    p = subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "'guidance': 7.5, 'seed': 0" in p.stdout and "'images_per_prompt': 1, 'name': 'paper'" in p.stdout
    assert f"skipped aesthetic: no such file (looked for {weights['aesthetic']})" in p.stdout
    assert "| model | run dir | pickscore | hpsv2 | clip | imagereward |" in p.stdout
    s = json.load(open(d / "run" / "eval" / "scores.json"))
    assert s["step"] == 7 and s["method"] == "sspo" and len(s["unet_sha256"]) == 16 and s["base_unet_sha256"]
    assert s["protocol"]["steps"] == 2 and s["protocol"]["n_prompts"] == 5
    assert s["protocol"]["resolution"] == 16 and s["protocol"]["tf32"] is False  # the UNet's 8 latents x 2; CPU
    assert s["skipped"] == {"aesthetic": {"reason": "no such file", "path": weights["aesthetic"]}}
    assert s["scorers"]["hpsv2"] == {"hpsv2": weights["hpsv2"], "hpsv2_clip": weights["hpsv2_clip"]}
    assert [r["prompt"] for r in s["per_image"]][:2] == ["a red circle on the left", "a blue square at the top"]
    for m in ("pickscore", "hpsv2", "clip", "imagereward"):
        per = [r[m] for r in s["per_image"]]
        assert s[f"{m}_all_run"] == pytest.approx(sum(per) / 5) and len(set(per)) == 5  # 5 different images
        assert s[f"{m}_all_base"] == pytest.approx(sum(r["base"][m] for r in s["per_image"]) / 5)
        assert 0 <= s["win_rates"][m] <= 1 and "aesthetic" not in s["win_rates"]
    assert s["win_rate_vs_base"] == s["win_rates"]["pickscore"]
    assert s["per_image"][0]["pickscore"] != s["per_image"][0]["base"]["pickscore"]  # two models, same noise
    for f in ("grid.png", "side_by_side.png"):
        assert os.path.isfile(d / "run" / "eval" / f)
    # torchrun: the prompts are sharded over 2 ranks (2 + 3 images) and the gathered scores are the same
    os.rename(d / "run" / "eval" / "scores.json", d / "one_process.json")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "evaluate.py", *args, "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("| run |") == 1  # rank 0 alone prints and writes
    s2 = json.load(open(d / "run" / "eval" / "scores.json"))
    for a, b in zip(s["per_image"], s2["per_image"]):
        assert a["prompt"] == b["prompt"]
        for m in ("pickscore", "hpsv2", "clip", "imagereward"):
            assert b[m] == pytest.approx(a[m], abs=1e-4) and b["base"][m] == pytest.approx(a["base"][m], abs=1e-4)


def test_evaluate_a_prompt_file_in_the_wrong_format(paper_setup, tmp_path):
    d, args, _ = paper_setup
    (tmp_path / "bad.tsv").write_text("id\ttext\n1\ta cat\n")
    run = evaluate(args[0], "--prompts", str(tmp_path / "bad.tsv"))
    assert run.returncode != 0 and run.stderr.strip() == (f"error: {tmp_path / 'bad.tsv'}: no column 'Prompt' "
                                                          "(PartiPrompts tsv); has: ['id', 'text']")


# -----------------------------------------------------------------------------------------------------------------
# prompt sets

def test_prompt_files_of_each_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a cat", "a fish"]}), tmp_path / "v.parquet")
    assert ev.read_prompt_file(str(tmp_path / "v.parquet")) == ["a cat", "a dog", "a fish"]  # validation_unique
    # PartiPrompts.tsv is plain tab-separated text: one of its prompts starts with a quote, which csv would eat
    (tmp_path / "p.tsv").write_text('Prompt\tCategory\tChallenge\na cat\tAnimals\tBasic\n"G I G G L E" painted on a '
                                    'wall\tIllustrations\tComplex\nA sign that says "Hi"\tArtifacts\tBasic\n')
    assert ev.read_prompt_file(str(tmp_path / "p.tsv")) == ["a cat", '"G I G G L E" painted on a wall',
                                                             'A sign that says "Hi"']
    (tmp_path / "anime.json").write_text(json.dumps(["a cat", "a dog"]))
    assert ev.read_prompt_file(str(tmp_path / "anime.json")) == ["a cat", "a dog"]
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert ev.read_prompt_file(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    for name, text in (("bom.txt", "a cat\na dog\n"), ("bom.json", '["a cat", "a dog"]'),
                       ("bom.tsv", "Prompt\na cat\na dog\n")):  # saved by an editor that writes a byte-order mark
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert ev.read_prompt_file(str(tmp_path / name)) == ["a cat", "a dog"], name
    (tmp_path / "photo.json").write_text(json.dumps(["a fish"]))
    cfg = {"dataset": "pickapic"}
    assert ev.prompt_groups([str(tmp_path / "anime.json"), str(tmp_path / "photo.json")], cfg) == \
        {"anime": ["a cat", "a dog"], "photo": ["a fish"]}
    assert ev.prompt_groups([str(tmp_path / "p.txt")], cfg) == {"all": ["a cat", "a dog"]}
    assert list(ev.prompt_groups([], {"dataset": "tiny"})) == ["seen", "heldout"]
    with pytest.raises(SystemExit, match="^error: --prompts is required for a run not on the tiny world"):
        ev.prompt_groups([], cfg)


@pytest.mark.parametrize("name, content, message", [
    ("p.csv", "Prompt\na cat\n", "unknown prompt file type '.csv' (.parquet, .tsv, .json or .txt)"),
    ("p.tsv", "prompt\ta\n", "no column 'Prompt' (PartiPrompts tsv); has: ['prompt', 'a']"),
    ("p.json", '{"anime": ["a cat"]}', "expected a JSON list of prompt strings (HPSv2 benchmark), got dict"),
    ("p.json", '["a cat", 3]', "expected a JSON list of prompt strings (HPSv2 benchmark), got list with other items"),
    ("p.json", '["a cat",', "not valid JSON"),
    ("p.txt", "\n\n", "no prompts"),
    ("p.txt", b"\xff\xfe\x00a", "not UTF-8 text"),
    ("p.parquet", "not parquet", "not a readable parquet file"),
])
def test_prompt_files_in_the_wrong_format(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit, match="^" + re.escape(f"error: {f}: {message}")):
        ev.read_prompt_file(str(f))


def test_each_prompt_file_has_its_own_noise():
    # the i-th image of a file gets its generator's i-th draw, wherever the file stands in --prompts
    together, alone = ev.draw_noise([2, 3], (4, 8, 8), 0), ev.draw_noise([3], (4, 8, 8), 0)
    assert together.shape == (5, 4, 8, 8) and torch.equal(together[2:], alone) and torch.equal(together[:2], alone[:2])
    assert not torch.equal(alone[0], alone[1])  # within a file the draws go on


def test_protocol_run_samples_at_the_runs_resolution(paper_setup, tmp_path, monkeypatch):
    # a run may train at another resolution than its init model's sample_size (SD1.5 at 256 px): under 'run' it is
    # sampled at its own, under 'paper' at the pipeline's default
    d, args, weights = paper_setup
    run = fake_run(str(tmp_path / "run"))  # sample_size 8 latents of a VAE that halves: 16 px
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=False)
    torch.save({**ckpt, "config": {**ckpt["config"], "resolution": 32}}, os.path.join(run, "ckpt.pt"))
    seen, generate = [], ev.generate
    monkeypatch.setattr(ev, "generate", lambda m, prompts, noise, *a: seen.append(noise.shape[1:]) or
                        generate(m, prompts, noise, *a))
    for protocol, latent in (("run", 16), ("paper", 8)):
        ev.main([run, "--prompts", str(d / "prompts.txt"), "--steps=1", f"--protocol={protocol}", "--metrics=clip",
                 "--weights", f"clip={weights['clip']}", f"--out={tmp_path}/{protocol}"])
        assert seen.pop() == (4, latent, latent)
        assert json.load(open(tmp_path / protocol / "scores.json"))["protocol"]["resolution"] == 2 * latent
