"""
Soak test (not in CI): the tiny SSPO run, with a disk pool and a checkpoint every 2 updates, killed with SIGKILL at
random moments (at most --kills a round, so a round ends even on a loaded machine) and resumed (auto_resume)
until it finishes; then its final weights, optimizer state and pool are
compared, bit for bit, with one uninterrupted run of the same config. Rounds repeat until the time budget is spent.

    OMP_NUM_THREADS=1 python -m dev.soak --minutes=12              # prints kills, resumes, and whether weights are equal
"""
import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import torch

import checkpoint


ARGS = ["--method=sspo", "--tiny_size=512", "--batch_size=8", "--warmup_steps=2", "--max_steps=12", "--save_every=2",
        "--eval_every=1000", "--log_every=1", "--sample_steps=2", "--self_sample_steps=2", "--ckpt_every=1",
        "--pool_storage=disk", "--pool_capacity=3", "--keep_checkpoints=2", "--auto_resume=True"]


def launch(out):
    return subprocess.Popen([sys.executable, "train_sspo.py", *ARGS, f"--out_dir={out}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def final(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)


def same(a, b):
    return (all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"]) and a["step"] == b["step"]
            and all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
                    for i in a["optimizer"]["state"]) and a["pool"]["entries"] == b["pool"]["entries"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=12)
    p.add_argument("--dir", default="out/soak")
    p.add_argument("--kills", type=int, default=6, help="most kills in a round; then the run may finish")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng, t_end = random.Random(a.seed), time.time() + 60 * a.minutes
    shutil.rmtree(a.dir, ignore_errors=True)
    ref = os.path.join(a.dir, "ref")
    t0 = time.time()
    proc = launch(ref)
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: {proc.stderr.read()[-2000:]}")
    duration = time.time() - t0
    reference = final(ref)
    print(f"uninterrupted run: {duration:.0f} s; killing at uniform times in (0, {1.2 * duration:.0f}) s", flush=True)
    rounds = kills = resumes = equal = 0
    while time.time() < t_end:
        out = os.path.join(a.dir, f"round{rounds}")
        starts = 0
        while True:
            proc = launch(out)
            starts += 1
            try:
                code = proc.wait(timeout=rng.uniform(0, 1.2 * duration) if starts <= a.kills else None)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                resumes += checkpoint.latest_checkpoint(out) is not None  # else the next start begins again
                for step, path in checkpoint.checkpoints(out):  # whatever a kill left is complete and loadable
                    assert torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"] == step
                continue
            if code != 0:
                raise SystemExit(f"round {rounds}: a start failed (exit {code}): {proc.stderr.read()[-2000:]}")
            break
        ok = same(reference, final(out))
        equal += ok
        rounds += 1
        print(f"round {rounds}: {starts - 1} kills, final weights equal: {ok}", flush=True)
        shutil.rmtree(out)
    print(f"soak: {rounds} rounds, {kills} kills injected, {resumes} resumes from a checkpoint (the other starts began "
          f"again: killed before the first save), final weights equal in {equal} of "
          f"{rounds} rounds" + ("" if equal == rounds else "  <-- MISMATCH"))
    sys.exit(0 if rounds and equal == rounds else 1)


if __name__ == "__main__":
    main()
