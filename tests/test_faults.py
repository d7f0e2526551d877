"""Faults lose nothing: a kill at each critical point of a checkpoint and of the disk pool, a file that cannot be
written, a non-finite loss, unreadable data, a dead DDP rank and torchrun's restarts. Kills come from checkpoint.fault
(SSPO_FAULT names the point), so each lands exactly where it should; soak.py (not in CI) kills at random times.

Single-process runs are `python train_sspo.py` in a process forked for them (conftest.run_script): a real process that
dies where it is told.
DDP runs are real torchrun / two-process launches."""
import errno
import io
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import checkpoint
import data
import ddp
from conftest import FAST, ROOT, ddp_bound, run_script

# SSPO from scratch with a disk pool that is bounded (reservoir replacements) and gets a snapshot every update
SSPO = FAST + ["--method=sspo", "--pool_storage=disk", "--pool_capacity=3", "--ckpt_every=1", "--self_sample_steps=2",
               "--max_steps=6", "--save_every=2", "--keep_checkpoints=2", "--auto_resume=True"]


def fork_main(args, fault="", fsize=0):
    """`python train_sspo.py *args` in another process with SSPO_FAULT=fault (and a file size limit) -> (exit code,
    stdout and stderr). Exit code 137: killed at the fault point; 1: stopped with a one-line error; 2: a traceback."""
    p = run_script(args, env={"SSPO_FAULT": fault}, fsize=fsize)
    return (2 if "Traceback (most recent call last)" in p.stderr else p.returncode), p.stdout + p.stderr


def error_line(text):
    """The one-line error (it may follow a progress bar's last draw, which ends in no newline)."""
    return next(line[line.index("error: "):] for line in text.splitlines() if "error: " in line)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def leftovers(out):
    return [os.path.join(d, f) for d, dirs, files in os.walk(out) for f in dirs + files if f.endswith((".tmp", ".old"))]


# ---- crash safety -----------------------------------------------------------------------------------------------

def test_killed_at_every_critical_point_resumes_to_the_same_weights(tmp_path):
    """One run killed at each critical point in turn, each time resumed (auto_resume) from what the kill left,
    ends with the uninterrupted run's weights, optimizer, pool and disk layout, bit for bit."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    code, text = fork_main(SSPO + [f"--out_dir={ref}"])
    assert code == 0, text[-3000:]
    # (fault point, the step the next start resumes from, what the kill leaves)
    chain = [("pool:written@3", 2, "a snapshot's .tmp, written whole, not yet renamed"),
             ("unet:written", 2, "unet.tmp/ written whole, unet/ still the step-2 export"),
             ("unet:swapping", 2, "unet.old/ and no unet/: between the two renames of the export"),
             ("ckpt:written", 2, "ckpt_00000004.pt.tmp, which we cut in half: a partial write"),
             ("ckpt:renamed", 4, "ckpt_00000004.pt complete, ckpt.pt still the step-2 one"),
             ("ckpt:linked", 6, "ckpt_2, 4 and 6 all there, old ones and snapshots not yet deleted")]
    resumed_from = None
    for point, resume_step, _ in chain:
        code, text = fork_main(SSPO + [f"--out_dir={out}"], fault=point)
        assert code == 137, (point, text[-3000:])
        if resumed_from is not None:
            assert f"ckpt_{resumed_from:08d}.pt at step {resumed_from}" in text, point
        if point == "ckpt:written":
            tmp = os.path.join(out, "ckpt_00000004.pt.tmp")
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
        if point == "unet:written":
            assert os.path.isdir(os.path.join(out, "unet.tmp")) and os.path.isdir(os.path.join(out, "unet"))
        if point == "unet:swapping":
            assert not os.path.exists(os.path.join(out, "unet")) and os.path.isdir(os.path.join(out, "unet.old"))
        for step, path in checkpoint.checkpoints(out):  # whatever carries a checkpoint's name is complete
            assert load(path)["step"] == step
        assert checkpoint.latest_checkpoint(out).endswith(f"ckpt_{resume_step:08d}.pt"), point
        resumed_from = resume_step
    code, text = fork_main(SSPO + [f"--out_dir={out}"])
    assert code == 0, text[-3000:]
    assert "resuming" in text and "at step 6" in text
    a, b = load(os.path.join(ref, "ckpt.pt")), load(os.path.join(out, "ckpt.pt"))
    assert b["step"] == 6 and all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert a["pool"]["entries"] == b["pool"]["entries"]
    for d in (ref, out):  # bounded disk: keep_checkpoints=2, and only the snapshots those two name
        assert [s for s, _ in checkpoint.checkpoints(d)] == [4, 6]
        named = {e["path"] for s, p in checkpoint.checkpoints(d) for e in load(p)["pool"]["entries"]}
        assert set(os.listdir(os.path.join(d, "pool"))) == named
        assert os.path.samefile(os.path.join(d, "ckpt.pt"), os.path.join(d, "ckpt_00000006.pt"))
    assert leftovers(out) == []


def test_first_save_killed_then_auto_resume_starts_over(tmp_path):
    """Killed inside the very first checkpoint: there is nothing to resume, so the next start begins again."""
    out = str(tmp_path / "run")
    code, _ = fork_main(FAST + [f"--out_dir={out}", "--max_steps=2", "--auto_resume=True"], fault="ckpt:written")
    assert code == 137 and checkpoint.latest_checkpoint(out) is None
    code, text = fork_main(FAST + [f"--out_dir={out}", "--max_steps=2", "--auto_resume=True"])
    assert code == 0 and "resuming" not in text and load(os.path.join(out, "ckpt.pt"))["step"] == 2
    assert leftovers(out) == []


# ---- disk -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit_mb, names", [(2, "unet"), (8, "ckpt_00000004.pt")])
def test_a_file_that_cannot_be_written_stops_the_run_and_loses_nothing(tmp_path, limit_mb, names):
    """A real write error from the OS (a file size limit: EFBIG; a full disk fails the same writes with ENOSPC):
    one line naming the file, the step-2 checkpoint and the unet/ export untouched, no temporary files."""
    out = str(tmp_path / "run")
    assert fork_main(FAST + [f"--out_dir={out}", "--max_steps=2"])[0] == 0
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("ckpt.pt", "unet/diffusion_pytorch_model.safetensors")}
    code, text = fork_main(FAST + [f"--out_dir={out}", "--max_steps=4", "--init_from=resume"], fsize=limit_mb << 20)
    assert code == 1, text[-3000:]
    line = error_line(text)
    assert line.startswith(f"error: cannot write {os.path.join(out, names)}: ") and "File too large" in line
    assert "MB free there" in line and len(line) < 300
    if names == "unet":  # the export failed first: it is as it was
        assert open(os.path.join(out, "unet/diffusion_pytorch_model.safetensors"), "rb").read() == \
            before["unet/diffusion_pytorch_model.safetensors"]
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before["ckpt.pt"]
    assert [s for s, _ in checkpoint.checkpoints(out)] == [2] and leftovers(out) == []


def test_theta_0_of_a_disk_pool_that_cannot_be_written_stops_the_run_in_one_line(tmp_path):
    """The first file of an SSPO run from a model: theta_0's snapshot in the disk pool (3.9 MB here, over the limit)."""
    base, out = str(tmp_path / "base"), str(tmp_path / "run")
    assert fork_main(FAST + [f"--out_dir={base}", "--max_steps=2"])[0] == 0
    code, text = fork_main(FAST + [f"--out_dir={out}", f"--init_from={base}", "--method=sspo", "--pool_storage=disk",
                                   "--self_sample_steps=2"], fsize=2 << 20)
    assert code == 1, text[-3000:]
    line = error_line(text)
    assert line.startswith(f"error: cannot write {os.path.join(out, 'pool')}") and "File too large" in line
    assert "Traceback" not in text and leftovers(out) == []


@pytest.mark.parametrize("err", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                 PermissionError(errno.EACCES, os.strerror(errno.EACCES))])
def test_disk_full_and_permission_errors_name_the_file(tmp_path, err):
    """(We run as root, where chmod cannot refuse a write, and a full disk cannot be made without mounting one:
    the two errors are raised from inside the write instead.)"""
    path = str(tmp_path / "ckpt_00000004.pt")
    open(path, "wb").write(b"the previous, complete file")

    def write(f):
        f.write(b"half of it")
        raise err
    with pytest.raises(OSError, match=rf"cannot write {path}: {err.strerror}; \d+ MB free there"):
        checkpoint.write_file(path, write)
    assert open(path, "rb").read() == b"the previous, complete file" and os.listdir(tmp_path) == ["ckpt_00000004.pt"]
    folder = str(tmp_path / "unet")
    os.makedirs(folder)
    with pytest.raises(OSError, match=rf"cannot write {folder}: {err.strerror}"):
        checkpoint.write_folder(folder, lambda tmp: (os.makedirs(tmp), write(open(os.path.join(tmp, "w"), "wb"))))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000004.pt", "unet"]
    with pytest.raises(SystemExit, match=rf"^error: cannot write {path}: {err.strerror}.*\(stopped; what was saved"):
        ddp.together(True, checkpoint.write_file, path, write)


# ---- numerics ---------------------------------------------------------------------------------------------------

def test_nonfinite_loss_skips_the_update_or_stops(tmp_path):
    args = FAST + ["--max_steps=3", "--caption_dropout=0.0"]
    code, text = fork_main(args + [f"--out_dir={tmp_path}/skip"], fault="nan_loss@2")
    assert code == 0, text[-3000:]
    assert "step 2: non-finite loss (nan) or gradient norm (nan) on some rank: update skipped (1 so far)" in text
    assert "updates skipped for a non-finite loss or gradient: 1 of 3" in text
    ckpt = load(os.path.join(tmp_path, "skip", "ckpt.pt"))
    assert ckpt["tallies"]["skipped_updates"] == 1
    assert all(s["step"] == 2 for s in ckpt["optimizer"]["state"].values())  # Adam stepped twice in 3 updates
    assert all(torch.isfinite(v).all() for v in ckpt["unet"].values())
    code, text = fork_main(args + [f"--out_dir={tmp_path}/stop", "--nonfinite=stop"], fault="nan_loss@2")
    assert code == 1
    line = error_line(text)
    assert line.startswith("error: non-finite loss (nan) or gradient norm (nan) in step 2 on rank 0; its prompts: ['a ")


# ---- data -------------------------------------------------------------------------------------------------------

def png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_every_image_mode_becomes_rgb():
    x = data.load_image(png(Image.new("RGBA", (20, 20), (255, 0, 0, 0))), 8)  # fully transparent: white
    assert torch.allclose(x, torch.ones_like(x))
    x = data.load_image(png(Image.new("RGBA", (20, 20), (255, 0, 0, 255))), 8)  # opaque red stays red
    assert torch.allclose(x[:, 4, 4], torch.tensor([1.0, -1, -1]))
    x = data.load_image(png(Image.new("LA", (20, 20), (0, 128))), 8)  # half-transparent black on white: grey
    assert abs(x.mean().item()) < 0.02
    x = data.load_image(png(Image.new("L", (20, 20), 255)), 8)
    assert torch.allclose(x, torch.ones_like(x))
    x = data.load_image(jpeg(Image.new("CMYK", (20, 20), (0, 255, 255, 0))), 8)  # CMYK JPEG: red
    assert (x[:, 4, 4] - torch.tensor([1.0, -1, -1])).abs().max() < 0.1
    ramp = (np.arange(20)[None, :].repeat(20, 0) * 3000).astype(np.uint16)  # 16-bit, up to 57000 of 65535
    x = data.load_image(png(Image.fromarray(ramp)), 20)
    assert Image.open(io.BytesIO(png(Image.fromarray(ramp)))).mode == "I;16"
    want = torch.from_numpy(np.round(ramp / 257)).float() / 127.5 - 1  # PIL's own convert would clip it to white
    assert torch.allclose(x[0], want, atol=0.01) and torch.equal(x[0], x[2])
    p = Image.new("P", (20, 20), 0)
    p.putpalette([0, 0, 255] * 256)
    p.info["transparency"] = 0
    assert torch.allclose(data.load_image(png(p), 8), torch.ones(3, 8, 8))  # transparent palette colour: white
    small = data.load_image(png(Image.new("RGB", (4, 6), (0, 0, 255))), 16)  # smaller than R: upscaled
    assert small.shape == (3, 16, 16) and torch.allclose(small[:, 8, 8], torch.tensor([-1.0, -1, 1]))
    with pytest.raises(ValueError, match="row 3 jpg_0: no image \\(missing bytes\\)"):
        data.load_image(None, 8, name="shard row 3 jpg_0")


def bad_shard(path):
    """12 rows, 5 of them unreadable: corrupt bytes, a truncated JPEG, missing bytes (null), an empty file."""
    rng = np.random.default_rng(0)
    good = [jpeg(Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8))) for _ in range(7)]
    rows = [("a red circle on the left", good[0], good[1], 1.0),
            ("", good[1], good[2], 0.0),  # empty caption: the unconditional prompt
            ("a " + "very " * 100 + "long caption", good[2], good[3], 1.0),  # truncated to 77 tokens
            ("corrupt", b"\xff\xd8 not a jpeg", good[0], 1.0),
            ("rgba", png(Image.new("RGBA", (24, 24), (0, 255, 0, 128))), good[4], 1.0),
            ("truncated", good[5][: len(good[5]) // 2], good[0], 0.0),
            ("sixteen bit", png(Image.fromarray(np.full((30, 30), 40000, np.uint16))), good[6], 1.0),
            ("missing", None, good[1], 1.0),
            ("small", png(Image.new("L", (5, 5), 200)), good[2], 0.0),
            ("missing loser", good[3], None, 1.0),
            ("empty bytes", b"", good[4], 1.0),
            ("cmyk", jpeg(Image.new("CMYK", (24, 24), (0, 0, 255, 0))), good[5], 1.0)]
    pq.write_table(pa.table({"caption": [r[0] for r in rows], "jpg_0": pa.array([r[1] for r in rows], pa.binary()),
                             "jpg_1": pa.array([r[2] for r in rows], pa.binary()),
                             "label_0": [r[3] for r in rows]}), path, row_group_size=5)
    return str(path)


def test_unreadable_rows_are_replaced_by_the_next_readable_one(tmp_path):
    ds = data.SkipBad(data.PickAPic(bad_shard(tmp_path / "s.parquet"), 16, random_flip=False))
    items = [ds[i] for i in range(len(ds))]
    assert [it["prompt"] for it in items][3:6] == ["rgba", "rgba", "sixteen bit"]  # row 3 -> 4, 5 -> 6
    assert [it["skipped"] for it in items] == [0, 0, 0, 1, 0, 1, 0, 1, 0, 2, 1, 0]
    assert "s.parquet row 3 jpg_0: cannot decode image" in items[3]["error"]
    assert "row 7 jpg_0: no image (missing bytes)" in items[7]["error"]
    assert "row 9 jpg_1: no image (missing bytes)" in items[9]["error"]  # the loser: the pair goes as one
    assert sum(it["converted"] for it in items) == 9 and sum(it["upscaled"] for it in items) == 2  # 3 cmyk, 2 each else
    again = data.SkipBad(data.PickAPic(str(tmp_path / "s.parquet"), 16, random_flip=False))
    assert all(torch.equal(again[i]["image_w"], items[i]["image_w"]) for i in (3, 7, 9))  # deterministic


def test_winners_only_never_read_the_loser(tmp_path):
    """SFT and SSPO train on the winners (losers=False): a broken loser costs nothing, a broken winner still skips."""
    ds = data.SkipBad(data.PickAPic(bad_shard(tmp_path / "s.parquet"), 16, random_flip=False, losers=False))
    items = [ds[i] for i in range(len(ds))]
    assert all("image_l" not in it for it in items)
    # rows 5 (label 0: its truncated jpg_0 is the loser) and 9 (missing loser) are now read as they are
    assert [it["skipped"] for it in items] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0]
    assert [items[i]["prompt"] for i in (5, 9)] == ["truncated", "missing loser"]


def test_bad_data_in_a_run_is_counted_or_stops(tmp_path):
    shard = bad_shard(tmp_path / "s.parquet")
    args = FAST + ["--dataset=pickapic", f"--data_path={shard}", "--batch_size=4", "--max_steps=4", "--n_eval_images=2",
                   "--method=dpo", "--random_flip=False"]
    code, text = fork_main(args + [f"--out_dir={tmp_path}/skip"])
    assert code == 0, text[-3000:]
    # 12 rows, 3 batches of 4 an epoch: epoch 0 is all of them (as counted above), epoch 1 so far its first batch
    assert "data of epoch 0: skipped 6, converted 9, upscaled 2, empty_caption 1, long_caption 1" in text
    assert "data of epoch 1 so far: skipped 0, converted 3, upscaled 1, empty_caption 1, long_caption 0" in text
    assert "skipped unreadable data:" in text and "row 3 jpg_0: cannot decode image" in text
    p = run_script(args + [f"--out_dir={tmp_path}/stop", "--bad_data=stop", "--random_crop=False"])  # the entry script
    line = error_line(p.stderr)
    assert p.returncode == 1 and "s.parquet row 5 jpg_0: cannot decode image" in line and "bad_data='stop'" in line
    assert open(tmp_path / "stop" / "log.txt").read().splitlines()[-1] == line  # the run's log says why it stopped


# ---- DDP --------------------------------------------------------------------------------------------------------

def test_torchrun_restarts_resume_and_ranks_agree_on_skipping(tmp_path):
    """2 ranks. Rank 1 alone gets a NaN loss in update 1: both skip it. Rank 1 dies after update 3: torchrun stops
    rank 0 promptly and restarts both (--max-restarts=1), which resume from the step-2 checkpoint without being told
    to. The end: the weights of one process running the same updates (float tolerance, as in test_train.py)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = FAST + ["--max_steps=4", "--save_every=2", "--caption_dropout=0.0"]
    code, text = fork_main(args + [f"--out_dir={one}", "--batch_size=8"], fault="nan_loss@2")
    assert code == 0, text[-3000:]
    # torchrun shares its rendezvous store with the workers by default, and a restart can then read the dead
    # attempt's addresses (pytorch/pytorch#135712): the variable turns the sharing off
    env = dict(os.environ, OMP_NUM_THREADS="1", SSPO_FAULT="nan_loss@2%1,step@3%1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--max-restarts=1", "--monitor-interval=0.2", "train_sspo.py", *args, f"--out_dir={two}",
                        "--batch_size=4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    assert "resuming" in p.stdout and "ckpt_00000002.pt at step 2" in p.stdout
    assert time.time() - t0 < 180
    w1, w2 = load(os.path.join(one, "ckpt.pt")), load(os.path.join(two, "ckpt.pt"))
    assert w1["tallies"]["skipped_updates"] == w2["tallies"]["skipped_updates"] == 1
    # the control, a real difference: the same updates with the NaN one not skipped (as a rank that stepped alone would)
    three = str(tmp_path / "three")
    code, text = fork_main(args + [f"--out_dir={three}", "--batch_size=8"])
    assert code == 0, text[-3000:]
    w3 = load(os.path.join(three, "ckpt.pt"))
    # float tolerance from the lr of its updates (conftest.ddp_bound; the skipped one's counted too: still a bound)
    d = max((w1["unet"][k] - w2["unet"][k]).abs().max().item() for k in w1["unet"])
    d13 = max((w1["unet"][k] - w3["unet"][k]).abs().max().item() for k in w1["unet"])
    assert d < ddp_bound(args) < d13, (d, ddp_bound(args), d13)


def test_a_dead_rank_stops_the_other_promptly_without_torchrun(tmp_path):
    """Two processes launched by hand (no torchrun to clean up): rank 1 dies after update 1; rank 0 stops at its
    next collective with one line, long before ddp_timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", SSPO_FAULT="step@1%1",
               MASTER_PORT=str(29500 + os.getpid() % 1000))
    args = [sys.executable, "train_sspo.py", *FAST, f"--out_dir={tmp_path}/run", "--batch_size=4", "--ddp_timeout=120"]
    t0 = time.time()
    procs = [subprocess.Popen(args, cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    (out0, err0), (_, err1) = [p.communicate(timeout=100) for p in procs]
    assert procs[1].returncode == 137 and procs[0].returncode == 1, err0[-3000:]
    assert time.time() - t0 < 60  # far below the 120 s timeout: gloo sees the peer's socket close
    line = error_line(err0)
    assert line.startswith("error: rank 0: a collective failed, another rank has died or hangs"), err0[-3000:]
