"""
Files that survive a kill, a full disk and a missing permission, and the hook that kills the process on purpose
to prove it (tests/test_faults.py, soak.py).

Every file a run resumes from (ckpt_STEP.pt, ckpt.pt, unet/, text_encoder/, the disk pool's snapshots) is written
as NAME.tmp, flushed to the disk (fsync), renamed over NAME (os.replace: atomic on POSIX), and its folder flushed so
the rename survives a power cut too. A reader finds the old file or the new one, never part of one; a kill leaves
at most a NAME.tmp (for a folder also NAME.old), which `tidy` clears at the next start. A write that fails (disk
full, no permission) removes its NAME.tmp, leaves NAME as it was, and raises one OSError that names NAME.
"""
import os
import re
import shutil

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
