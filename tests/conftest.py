import multiprocessing
import os
import resource
import runpy
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402 (the repository root is on the path from here on)
import ddp  # noqa: E402

# a few seconds a run: tiny batches, few steps, eval only at step 0 and the last step, 2 sampler steps
FAST = ["--batch_size=8", "--tiny_size=512", "--max_steps=4", "--warmup_steps=2", "--eval_every=1000",
        "--save_every=1000", "--log_every=1", "--sample_steps=2"]


def ddp_bound(args):
    """The most a run on 2 processes may end from the same run on 1 (max |w1 - w2|), for the run's own args: a
    twentieth of the most Adam can move a weight, the sum of lr_t over its updates (a step is lr_t m/sqrt(v), and
    |m/sqrt(v)| <~ 1 in the first updates). Gradients summed in another order differ in their last bits, which moves
    Adam's step only where a gradient is near zero (|g| ~ Adam's eps), by up to a whole lr_t there: 0.2-1.7% of the
    sum over two x86 CPUs and thread counts. Real differences: ~200% (other examples' draws, the control of
    test_ddp_two_processes_equal_one), 130% (SSPO with another reference), 12% (SSPO's sampler without its noise)."""
    import train_sspo
    cfg = config.get_config(list(args))
    return 0.05 * sum(train_sspo.lr_at(s, cfg) for s in range(cfg["max_steps"]))


# `python train_sspo.py ...` without paying for its imports each time (5 s of a 7 s run): a fork server imports
# the project once, before any tensor work has started a thread pool (its one other thread is numpy's OpenBLAS pool,
# which re-initializes after a fork), and forks a fresh process for each run
_forks = multiprocessing.get_context("forkserver")
_forks.set_forkserver_preload(["train_sspo", "evaluate", "dev.bench", "conftest"])


def _script_main(script, args, env, stdout, stderr, fsize):
    """In the forked process: what `python script *args` does, with the environment env, output to the two files,
    and writes limited to fsize bytes if given. Its exit code is the interpreter's (a SystemExit's text goes to
    stderr and exits 1, as does a traceback)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    if "OMP_NUM_THREADS" in env:  # read by OpenMP when torch was imported, in the fork server
        __import__("torch").set_num_threads(int(env["OMP_NUM_THREADS"]))
    if fsize:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    sys.argv = [script, *args]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


def run_script(args, torchrun=None, timeout=300, env=None, fsize=0, script="train_sspo.py"):
    """Run `python script *args` (or `torchrun --nproc_per_node=N script *args`) in another process from the repo
    root, with os.environ updated by env -> subprocess.CompletedProcess. fsize: a limit on the size of any file it
    writes. The environment must not change what an import reads (HF_HUB_OFFLINE): the imports are done before."""
    env = dict(os.environ, OMP_NUM_THREADS="1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"), **(env or {}))
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               script, *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        p = _forks.Process(target=_script_main, args=(script, args, env, out, err, fsize))
        p.start()
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        return subprocess.CompletedProcess([script, *args], p.exitcode, open(out, encoding="utf-8").read(),
                                           open(err, encoding="utf-8").read())


@pytest.fixture
def run():
    return run_script


@pytest.fixture(autouse=True)
def close_run_log():
    """A train_sspo.main called in this process (a test expecting its SystemExit) leaves its log.txt open (ddp.py):
    closed after each test, so no later print0 writes into another test's run."""
    yield
    ddp.close_log()


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """One 2-step tiny base run shared by the test modules that train from a model; they only read it."""
    out = str(tmp_path_factory.mktemp("base") / "base")
    p = run_script(FAST + [f"--out_dir={out}", "--max_steps=2"])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def resume_and_two_processes(run, args, tmp_path):
    """An SSPO run's checks shared by the model families' tests: stopped after 2 of its 4 updates and resumed, it ends
    on the uninterrupted run's weights bit for bit; on 2 processes x half the batch it ends within the float bound
    (ddp_bound) of 1 process, and a run drawing another reference (ref_policy='first') lies beyond it."""
    import torch
    a, b, two, other = (str(tmp_path / n) for n in ("a", "b", "two", "other"))
    assert run(args + [f"--out_dir={a}"]).returncode == 0
    assert run(args + [f"--out_dir={b}", "--max_steps=2"]).returncode == 0
    p = run(args + [f"--out_dir={b}", "--init_from=resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    wa, wb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False)["unet"] for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    p = run(args + [f"--out_dir={two}", "--batch_size=4"], torchrun=2)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    assert run(args + [f"--out_dir={other}", "--ref_policy=first"]).returncode == 0
    w2, w3 = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False)["unet"] for d in (two, other))
    d2, d3 = (max((wa[k] - w[k]).abs().max().item() for k in wa) for w in (w2, w3))
    assert d2 < ddp_bound(args) < d3, (d2, ddp_bound(args), d3)
