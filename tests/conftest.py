import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a few seconds a run: tiny batches, few steps, eval only at step 0 and the last step, 2 sampler steps
FAST = ["--batch_size=8", "--tiny_size=512", "--max_steps=4", "--warmup_steps=2", "--eval_every=1000",
        "--save_every=1000", "--log_every=1", "--sample_steps=2"]


def run_script(args, torchrun=None, timeout=300):
    """Run train_sspo.py (or `torchrun --nproc_per_node=N train_sspo.py`) in a subprocess from the repo root."""
    env = dict(os.environ, OMP_NUM_THREADS="1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                              if torchrun else []) + ["train_sspo.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run():
    return run_script


@pytest.fixture(autouse=True)
def close_run_log():
    """A train_sspo.main called in this process (a test expecting its SystemExit) leaves its log.txt
    open as train_sspo._log_file: closed after each test, so no later print0 writes into another test's run."""
    yield
    train_sspo = sys.modules.get("train_sspo")
    if train_sspo is not None and train_sspo._log_file is not None:
        train_sspo._log_file.close()
        train_sspo._log_file = None


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """One 2-step tiny base run shared by the test modules that train from a model; they only read it."""
    out = str(tmp_path_factory.mktemp("base") / "base")
    p = run_script(FAST + [f"--out_dir={out}", "--max_steps=2"])
    assert p.returncode == 0, p.stderr[-3000:]
    return out
