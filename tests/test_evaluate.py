"""evaluate.py on a real (tiny, short) run: the protocol, the files, the win rate, and its errors."""
import json
import os
import subprocess
import sys

from conftest import FAST, ROOT


def evaluate(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_evaluate_a_run_against_a_base(tmp_path, run):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(FAST + [f"--out_dir={a}", "--max_steps=2"]).returncode == 0
    assert run(FAST + [f"--out_dir={b}", "--max_steps=2", "--seed=1"]).returncode == 0
    p = evaluate(b, "--base", a, "--images_per_prompt=1", "--steps=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "protocol: {'sampler': 'DDIM, eta 0', 'steps': 2" in p.stdout and "| base |" in p.stdout
    s = json.load(open(os.path.join(b, "eval", "scores.json")))
    assert len(s["per_image"]) == 48 and s["protocol"]["guidance"] == 3.0 and s["step"] == 2
    assert 0 <= s["judge_seen_run"] <= 1 and 0 <= s["win_rate_vs_base"] <= 1
    assert os.path.isfile(os.path.join(b, "eval", "grid.png")) and os.path.isfile(os.path.join(b, "eval", "side_by_side.png"))
    # against itself, with the same noise, every image ties: exactly one half
    p = evaluate(a, "--base", a, "--images_per_prompt=1", "--steps=2")
    assert p.returncode == 0 and json.load(open(os.path.join(a, "eval", "scores.json")))["win_rate_vs_base"] == 0.5


def test_evaluate_errors(tmp_path):
    p = evaluate(str(tmp_path / "nothing"))
    assert p.returncode != 0 and p.stderr.strip().endswith("ckpt.pt not found: not a run directory of train_sspo.py")
