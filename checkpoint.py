"""
Checkpoints: write them so that they survive a kill, a full disk and a missing permission; find the newest; read,
check and resume one; keep the newest few. And the hook that kills the process on purpose to prove it
(tests/test_faults.py, soak.py).

A checkpoint is one dict with everything needed to resume exactly: the UNet (and EMA, trained text encoder), the
optimizer, the step, the data position, the RNG state, the reference pool's state and the resolved config. Under
parallel='fsdp' the tensors are not in it: each rank writes its shard of them to ckpt_STEP.dcp/
(torch.distributed.checkpoint, which reads them back on any number of processes), and the dict names that folder. Every
file a run resumes from (ckpt_STEP.pt, ckpt.pt, unet/, text_encoder/, the disk pool's snapshots) is written
as NAME.tmp, flushed to the disk (fsync), renamed over NAME (os.replace: atomic on POSIX), and its folder flushed so
the rename survives a power cut too. A reader finds the old file or the new one, never part of one; a kill leaves
at most a NAME.tmp (for a folder also NAME.old), which `tidy` clears at the next start. A write that fails (disk
full, no permission) removes its NAME.tmp, leaves NAME as it was, and raises one OSError that names NAME.
"""
import os
import re
import shutil

import torch

import ddp
import model

_reached = {}  # fault point -> times reached in this process


def fault(point, kill=True):
    """SSPO_FAULT="point", "point@n" or "point@n%r" (several joined by commas): the n-th time (default the 1st)
    this process reaches `point`, on rank r only if given, it dies on the spot (os._exit: no cleanup, no flush, as
    under SIGKILL). With kill=False the call returns True there instead and the caller misbehaves (a NaN loss).
    Only a first attempt is hit: workers that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) run clean."""
    specs = os.environ.get("SSPO_FAULT", "")
    if not specs or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    for spec in specs.split(","):
        m = re.fullmatch(r"([\w:]+)(?:@(\d+))?(?:%(\d+))?", spec)
        if not m:
            raise ValueError(f"SSPO_FAULT={specs!r}: expected point, point@n or point@n%rank, joined by commas")
        if m[1] != point or (m[3] is not None and int(m[3]) != int(os.environ.get("RANK", "0"))):
            continue
        _reached[point] = _reached.get(point, 0) + 1
        if _reached[point] == int(m[2] or 1):
            if kill:
                os._exit(137)
            return True
    return False


def _failed(path, e):
    """One line naming the file: what went wrong and how much room is left on its disk."""
    cause = e  # torch.save reports a failed write as a RuntimeError whose context is the OSError
    while not isinstance(cause, OSError) and cause.__context__ is not None:
        cause = cause.__context__
    why = cause.strerror if isinstance(cause, OSError) and cause.strerror else f"{type(e).__name__}: {e}"
    parent = os.path.dirname(os.path.abspath(path))
    free = f"; {shutil.disk_usage(parent).free / 2**20:.0f} MB free there" if os.path.isdir(parent) else ""
    return OSError(f"cannot write {path}: {why}{free}")


def _sync(path):
    """fsync a file or a folder by name (a writer like safetensors may have replaced the file we opened)."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, write, point=None):
    """write(f) fills an open binary file; it appears at `path` whole, or not at all. Fault point `point`:written
    is the moment the temporary file is complete but not yet renamed."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        _sync(tmp)
        if point:
            fault(point + ":written")
        os.replace(tmp, path)
        _sync(os.path.dirname(path))
    except Exception as e:  # torch.save and safetensors report a full disk as RuntimeError & co, not OSError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise _failed(path, e) from e


def write_folder(path, save, point=None):
    """save(folder) fills a new folder (save_pretrained); it replaces `path` whole. Two renames, path -> path.old
    and path.tmp -> path: a kill between them (fault point `point`:swapping) leaves only path.old, which `tidy`
    puts back."""
    tmp, old = path + ".tmp", path + ".old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        for name in os.listdir(tmp):
            _sync(os.path.join(tmp, name))
        _sync(tmp)
        if point:
            fault(point + ":written")
        shutil.rmtree(old, ignore_errors=True)  # a leftover would make the rename below fail
        if os.path.isdir(path):
            os.replace(path, old)
        if point:
            fault(point + ":swapping")
        os.replace(tmp, path)
        _sync(os.path.dirname(path))
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.isdir(path):
            os.replace(old, path)
        raise _failed(path, e) from e
    shutil.rmtree(old, ignore_errors=True)


def write_sharded(path, state, point=None):
    """Every rank writes its shard of `state` (DTensors of a sharded model, plain tensors alike) into the folder
    `path` (torch.distributed.checkpoint); it appears whole or not at all: written as path.tmp, which rank 0 renames
    once every rank is done (a folder of that name left from a killed attempt, which no checkpoint names, is replaced).
    Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    tmp, master = path + ".tmp", ddp.rank() == 0
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
    ddp.barrier()
    try:
        dcp.save(state, checkpoint_id=tmp)  # raises on every rank if any rank failed
    except Exception as e:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _failed(path, e) from e

    def rename():
        for name in os.listdir(tmp):
            _sync(os.path.join(tmp, name))
        _sync(tmp)
        if point:
            fault(point + ":written")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        _sync(os.path.dirname(path))
    ddp.together(master, rename)


def read_sharded(path, state):
    """Load the folder `path` (write_sharded) into the tensors of `state`, in place, resharded to this run's processes."""
    import torch.distributed.checkpoint as dcp
    dcp.load(state, checkpoint_id=path)


def link(src, dst):
    """Make `dst` name the complete file `src` (a hard link: no second copy on disk; a copy where the file system
    has no links), atomically like write_file."""
    def same(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 2**24)
    if os.path.exists(dst + ".tmp"):
        os.remove(dst + ".tmp")
    try:
        os.link(src, dst + ".tmp")
    except OSError:
        return write_file(dst, same)
    os.replace(dst + ".tmp", dst)
    _sync(os.path.dirname(dst))


def tidy(folder):
    """What a kill leaves in `folder`: remove NAME.tmp files and folders; a NAME.old folder goes back to NAME if
    NAME is missing (a kill mid-swap), else it is removed. Returns what was done, for the log."""
    done = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name.endswith(".old") and os.path.isdir(path) and not os.path.exists(path[:-4]):
            os.replace(path, path[:-4])
            done.append(f"restored {path[:-4]}")
        elif name.endswith((".tmp", ".old")):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            done.append(f"removed {path}")
    return done


# ---------------------------------------------------------------------------------------------------------------
# the checkpoints of a run

def checkpoints(out):
    """[(step, path)] of the step-named checkpoints in out_dir, oldest first. Each is complete: write_file only
    ever gives a file its final name whole."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted((int(m[1]), os.path.join(out, m[0])) for m in map(re.compile(r"ckpt_(\d+)\.pt").fullmatch, names) if m)


def latest_checkpoint(out):
    """The newest complete checkpoint: the highest ckpt_STEP.pt (after a kill ckpt.pt may still name the one before
    it), else ckpt.pt (a run saved before keep_checkpoints existed), else None."""
    found = checkpoints(out)
    legacy = os.path.join(out, "ckpt.pt")
    return found[-1][1] if found else legacy if os.path.isfile(legacy) else None


def read_checkpoint(path, mmap=False):
    """torch.load of a checkpoint; one that is damaged (write_file writes whole files, so something else changed or
    truncated it) is an error naming it and the older checkpoint to resume from instead."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:  # a truncated zip, a file that is not one
        named = [p for _, p in checkpoints(os.path.dirname(path))]
        older = named[:named.index(path)] if path in named else []
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:100]})" + (f"; the one before it is {older[-1]}: move "
                         f"{os.path.basename(path)} away to resume from that" if older else ""))


def save_checkpoint(cfg, unet, ema, text_encoder, opt, step, data_pos, pool, tallies, world):
    """unet/ (transformer/ for SD3, FLUX.1; text_encoder/): the weights for the pipeline (the EMA if there is one); then
    ckpt_STEP.pt: everything to resume exactly, also named ckpt.pt; then the checkpoints beyond keep_checkpoints go,
    with the pool snapshots only they named. Every file is written whole or not at all (write_file) and nothing is
    deleted before the new checkpoint is complete, so a kill at any moment leaves the newest complete checkpoint
    loadable. unet/ first: wherever a checkpoint exists, a unet/ to load it into exists too."""
    out = cfg["out_dir"]
    if cfg["parallel"] == "fsdp":
        ckpt = save_sharded(cfg, unet, ema, opt, step)
        if ckpt is None:  # ranks but 0: their shards are written
            return
    else:
        ckpt = save_whole(cfg, unet, ema, text_encoder, opt)
    ckpt.update({"step": step, "data_pos": data_pos, "tallies": tallies, "world": world, "rng": torch.get_rng_state(),
                 "config": cfg, "pool": pool.state_dict() if pool else None})
    path = os.path.join(out, f"ckpt_{step:08d}.pt")
    write_file(path, lambda f: torch.save(ckpt, f), point="ckpt")
    fault("ckpt:renamed")
    link(path, os.path.join(out, "ckpt.pt"))
    fault("ckpt:linked")
    drop_old_checkpoints(cfg, pool)


def save_whole(cfg, unet, ema, text_encoder, opt):
    """The pipeline's folders of the trained weights, and the checkpoint's tensors (one process holds them all)."""
    out = cfg["out_dir"]
    trained = {model.denoiser_dir(unet): ema or unet, **({"text_encoder": text_encoder} if cfg["train_text_encoder"]
                                                          else {})}
    if model.has_adapters(unet):  # unet/ is the frozen base, written at the start: only the adapter changes
        trained = {}
        write_folder(os.path.join(out, model.LORA_DIR), lambda d: model.save_lora(unet, d), point="lora")
    for name, module in trained.items():
        write_folder(os.path.join(out, name), module.save_pretrained, point=name)
    if model.is_animatediff(unet) and not model.has_adapters(unet):  # the temporal layers alone, as AnimateDiff ships them
        write_folder(os.path.join(out, "motion_adapter"), (ema or unet).save_motion_modules, point="motion_adapter")
    return {"unet": model.trained_state(unet, cfg), "ema": ema.state_dict() if ema else None,
            "text_encoder": text_encoder.state_dict() if cfg["train_text_encoder"] else None,
            "optimizer": opt.state_dict()}


def sharded_state(unet, ema, opt):
    """{name: state dict} of a sharded run's tensors, as torch.distributed.checkpoint saves and loads them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    weights, moments = get_state_dict(unet, opt)  # the optimizer's state named by parameter, not by number
    return {"unet": weights, "optimizer": moments, **({"ema": ema.state_dict()} if ema is not None else {})}


def save_sharded(cfg, unet, ema, opt, step):
    """FSDP, on every rank: the full weights gathered on rank 0's CPU (the pipeline's unet/ or transformer/ folder),
    then each rank's shard of the weights, the EMA and the optimizer state to ckpt_STEP.dcp/ -> on rank 0 the
    checkpoint's entries naming that folder, else None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(ema or unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    name = f"ckpt_{step:08d}.dcp"
    write_sharded(os.path.join(cfg["out_dir"], name), sharded_state(unet, ema, opt), point="ckpt_dcp")
    if ddp.rank() > 0:
        return None
    write_folder(os.path.join(cfg["out_dir"], model.denoiser_dir(unet)),
                 lambda d: model.save_weights(ema or unet, weights, d), point=model.denoiser_dir(unet))
    return {"sharded": name, "unet": None, "ema": None, "text_encoder": None, "optimizer": None}


def drop_old_checkpoints(cfg, pool):
    """Keep the newest keep_checkpoints checkpoints, and the sharded states and disk pool's snapshot files that they
    name."""
    out = cfg["out_dir"]
    kept = checkpoints(out)
    for _, old in kept[:-cfg["keep_checkpoints"]]:
        os.remove(old)
    named = {f"ckpt_{s:08d}.dcp" for s, _ in kept[-cfg["keep_checkpoints"]:]}
    for f in os.listdir(out):  # also one whose checkpoint a kill never let be written
        if f.endswith(".dcp") and f not in named:
            shutil.rmtree(os.path.join(out, f))
    if pool is not None and pool.storage == "disk":  # the pool holds the newest's; the others' are read, mmapped
        older = [read_checkpoint(p, mmap=True)["pool"]
                 for _, p in kept[-cfg["keep_checkpoints"]:-1]]
        pool.prune(also={e["path"] for d in older if d for e in d["entries"]})


# what a checkpoint's state depends on (the pool's entries: its draw policy, which decides what it keeps, and its size)
RESUME_FIXED = ("parallel", "method", "dataset", "pool_storage", "ref_policy", "pool_capacity", "train_text_encoder",
                "lora_rank", "lora_alpha", "lora_targets", "log_theta0")


def check_resumable(cfg, ckpt, world, path):
    """SystemExit unless the run can go on from this checkpoint exactly: the same kind of run, and the same global
    micro-batch (processes x batch_size), which the data position and the per-step noise are counted in."""
    for k in RESUME_FIXED:
        if ckpt["config"].get(k, cfg[k]) != cfg[k]:
            raise SystemExit(f"error: {path} is a run with {k}={ckpt['config'][k]!r}; it cannot resume as "
                             f"{k}={cfg[k]!r} (start a new run with init_from set to that run's folder)")
    if "world" not in ckpt:  # written before the process count was saved: the global micro-batch is not known
        return
    was = ckpt["world"] * ckpt["config"]["batch_size"]
    if was != world * cfg["batch_size"]:
        b = f"batch_size={was // world}" if was % world == 0 else f"a process count that divides {was}"
        raise SystemExit(f"error: {path} was written with a global micro-batch of {was} (processes x batch_size); this "
                         f"run has {world} x {cfg['batch_size']} = {world * cfg['batch_size']}. Resume with {b} (the "
                         "data position and the noise are counted in global micro-batches)")


def resume_point(cfg, master):
    """-> (resume, the newest complete checkpoint or None, what a kill left and was tidied). A run resumes when asked
    (init_from='resume'), or with auto_resume, or when torchrun --max-restarts relaunched it; a run directory that
    already holds a run is never started over."""
    out = cfg["out_dir"]
    tidied = tidy(out) + tidy(os.path.join(out, "pool")) if master else []
    ddp.barrier()
    latest = latest_checkpoint(out)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = cfg["init_from"] == "resume" or (latest is not None and (cfg["auto_resume"] or restarted))
    if resume and latest is None:
        raise SystemExit(f"error: init_from='resume' but {os.path.join(out, 'ckpt.pt')} does not exist")
    if not resume and latest is not None:
        raise SystemExit(f"error: {out} already holds a run ({latest}); resume it with --init_from=resume or choose "
                         "another out_dir (nothing is overwritten)")
    return resume, latest, tidied


def load_state(path, cfg, world, unet, text_encoder, ema, opt, tallies, tidied, master):
    """Restore the run of checkpoint `path` into the modules and the optimizer, in place, and the global RNG ->
    (ckpt, step, data position, tallies)."""
    ckpt = read_checkpoint(path)
    check_resumable(cfg, ckpt, world, path)
    if ckpt.get("sharded"):  # FSDP: each rank reads its shard, on however many processes
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = sharded_state(unet, ema, opt)
        read_sharded(os.path.join(os.path.dirname(path), ckpt["sharded"]), state)
        set_state_dict(unet, opt, model_state_dict=state["unet"], optim_state_dict=state["optimizer"])
    else:
        model.load_trained_state(unet, ckpt["unet"], cfg)
        if cfg["train_text_encoder"]:
            text_encoder.load_state_dict(ckpt["text_encoder"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"] if ckpt.get("ema") else ckpt["unet"])
        opt.load_state_dict(ckpt["optimizer"])
    step, data_pos = ckpt["step"], tuple(ckpt["data_pos"])
    tallies = ckpt.get("tallies") or tallies
    if step > cfg["max_steps"]:
        raise SystemExit(f"error: {path} is at step {step}, past max_steps={cfg['max_steps']}")
    torch.set_rng_state(ckpt["rng"])
    changed = {k: (ckpt["config"].get(k), v) for k, v in cfg.items() if ckpt["config"].get(k) != v and k != "init_from"}
    ddp.print0(f"resuming {path} at step {step}" + (f"; config changed since: {changed}" if changed else "")
               + (f"; after a kill: {', '.join(tidied)}" if tidied else ""))
    named = os.path.join(cfg["out_dir"], "ckpt.pt")
    if master and not (os.path.isfile(named) and os.path.samefile(path, named)):
        link(path, named)  # a kill fell between the new checkpoint and its link
    return ckpt, step, data_pos, tallies
