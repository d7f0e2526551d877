"""
The process helpers every script shares: one script runs with or without torchrun (setup / teardown), rank 0
prints and logs (print0, log_json into the run directory's log.txt and log.jsonl), numbers are averaged over
ranks before they are printed (all_mean), and a file written by rank 0 is followed by a collective before anyone
reads it (together). Under parallel='fsdp', shard() spreads a model over the ranks (FSDP2).
"""
import datetime
import json
import os
import resource
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

_log_file = None  # rank 0's out_dir/log.txt, once open_log has opened it


def setup(cfg):
    """-> (rank, world, device). DDP (or FSDP) when torchrun set the environment, else one process; under
    parallel='fsdp' one process is a process group of one, so that its model is sharded (into one shard) and its
    checkpoints are the sharded ones all the same."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    want_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("config error: device='cuda' but no CUDA device is visible")
    if ddp or cfg.get("parallel") == "fsdp":  # evaluate.py passes device and ddp_timeout alone
        alone = {} if ddp else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(seconds=cfg["ddp_timeout"]),
                                **alone)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local = 0, 1, 0
    if want_cuda:
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, torch.device(f"cuda:{local}" if want_cuda else "cpu")


def teardown():
    if dist.is_initialized():
        dist.barrier()  # the rank hosting the store (rank 0 when torchrun does not share its own) leaves last
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_mean(values, device):
    """Average a dict of floats over ranks, so the printed numbers are the global batch's."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def accumulate(sums, values, n):
    """sums[k] += values[k] / n, as float64 tensors read only at log time: a .item() here would wait for the GPU every
    micro-step (the same numbers as Python floats, bit for bit)."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().double() / n


# the repeated blocks of each denoiser: a UNet's down and up blocks (and its mid block), SD3's and FLUX.1's transformer
# blocks (FLUX.1's single-stream ones too), Wan2.1's blocks. FSDP gathers one of these at a time.
BLOCKS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks")


def shard(module, bf16):
    """FSDP2, in place: each block of the module (BLOCKS, and a UNet's mid block) is one unit of sharding, the rest
    the root's. Every rank keeps 1/world of each parameter, the optimizer makes its state for that shard alone, and a
    unit's full weights exist only while it runs (gathered before, freed after). bf16: the weights are gathered and
    computed in bf16, the fp32 shards stay the master weights and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    units = [b for name in BLOCKS for b in getattr(module, name, None) or ()]
    for unit in units + ([module.mid_block] if getattr(module, "mid_block", None) is not None else []):
        fully_shard(unit, mp_policy=mp)
    fully_shard(module, mp_policy=mp, reshard_after_forward=True)  # not FSDP's default for the root: a reference or
    return module  # an EMA has no backward that would reshard it, and the EMA's update and the pool read the shards


def grad_sync(module, on):
    """The context of a micro-step's forward and backward: gradients averaged over the ranks only when `on` (the last
    micro-step of an update), by DDP (no_sync otherwise) or FSDP (set_requires_gradient_sync)."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(on)
        return nullcontext()
    return module.no_sync() if hasattr(module, "no_sync") and not on else nullcontext()


def full(t):
    """A value computed from sharded tensors (a DTensor, like the gradient norm under FSDP) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_finite(loss, grad_norm, device):
    """Whether the loss and the gradient norm are finite on every rank: the one host-device sync of an update (every
    rank steps or none does: a NaN on one rank's batch must not split the replicas)."""
    finite = (torch.isfinite(torch.as_tensor(loss, device=device)) & torch.isfinite(grad_norm)).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def average_grads(module):
    """Average a module's gradients over ranks, as DDP does for the module it wraps (a trained text encoder)."""
    if dist.is_initialized():
        for p in module.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def together(run_here, fn, *args):
    """fn(*args) where run_here (rank 0's file writes), then one collective: an OSError on any rank (disk full, no
    permission: one line naming the file) stops every rank with that line, rather than leaving the others waiting
    for a rank that is gone. Also a barrier: nobody reads a file before it is complete. Returns fn's result."""
    err = out = None
    try:
        if run_here:
            out = fn(*args)
    except OSError as e:
        err = f"error: {e} (stopped; what was saved before is intact)"
    errs = [err]
    if dist.is_initialized():
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
    if any(errs):
        raise SystemExit(next(e for e in errs if e))
    return out


def open_log(out_dir):
    """Rank 0 appends what print0 prints to out_dir/log.txt from now on."""
    global _log_file
    _log_file = open(os.path.join(out_dir, "log.txt"), "a")


def close_log():
    global _log_file
    if _log_file is not None:
        _log_file.close()
        _log_file = None


def log_line(msg):
    """Append a line to log.txt alone (a one-line error is also the last line of the log, where a run is read)."""
    if _log_file is not None and not _log_file.closed:
        _log_file.write(msg + "\n")
        _log_file.flush()


def print0(*args):
    """Print on rank 0 only (above the progress bar) and append to out_dir/log.txt."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    msg = " ".join(str(a) for a in args)
    tqdm.write(msg)
    log_line(msg)


def log_json(record):
    """Rank 0 appends one JSON line to out_dir/log.jsonl: the numbers of log.txt, for plots and scripts."""
    if _log_file is not None:
        with open(os.path.join(os.path.dirname(_log_file.name), "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def log_update(step, stats_sum, lr, grad_norm, dt, world_size, ref_step, device, cfg):
    """One log line (and log.jsonl record) of the update just made: its stats averaged over ranks, its speed and
    the peak memory so far."""
    stats = all_mean({k: float(v) for k, v in stats_sum.items()}, device)
    if device.type == "cuda":
        mem_key, mem = "peak_gib", torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:  # this process's peak resident set; ru_maxrss is in KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mem_key, mem = "peak_rss_gib", rss * (1 if sys.platform == "darwin" else 1024) / 2 ** 30
    log_json({"kind": "train", "step": step, **stats, "lr": lr, "grad_norm": grad_norm, "s_per_step": dt,
                  mem_key: mem})
    rate = cfg["batch_size"] * cfg["grad_accum"] * world_size / dt
    print0(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()) +
           (f", ref = snapshot of step {ref_step}" if ref_step is not None else "") +
           f", lr {lr:.2e}, grad_norm {grad_norm:.3f}, {dt:.2f} s/step, " +
           (f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}") + " samples/s" +
           f", peak {'GPU memory' if device.type == 'cuda' else 'RSS'} so far {mem:.2f} GiB")
    return stats


def exit_if_collective_failed(e):
    """A collective failed (gloo saw a peer's socket close, or ddp_timeout passed): say so in one line, on stderr and in
    rank 0's log.txt, and leave at once. Not SystemExit: the interpreter's exit would destroy the broken process
    group, whose threads can then abort the process ("terminate called without an active exception", exit -6); every
    file is already closed. Any other RuntimeError is left to the caller."""
    if not (isinstance(e, dist.DistError) or "gloo" in str(e) or "NCCL" in str(e)):
        return
    msg = (f"error: rank {os.environ.get('RANK')}: a collective failed, another rank has died or hangs "
           f"(see its log): {str(e).strip().splitlines()[0]}")
    print(msg, file=sys.stderr, flush=True)
    sys.stdout.flush()
    log_line(msg)
    os._exit(1)
