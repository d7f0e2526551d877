"""
Random Checkpoint Replay (SSPO.md 4): a pool of historical snapshots of the policy, from which the reference of
the next stretch of training is drawn.

The pool starts with the base model theta_0 and gets the policy pushed every `ckpt_every` optimizer updates.
Draw policies: 'uniform' over every snapshot so far, the base included (the paper's RCR, Algorithm 1),
'first' (always theta_0: a fixed reference) and 'last' (the newest snapshot: SPIN-Diffusion's opponent). Under
'first' and 'last' the pool keeps only what can be drawn (theta_0; theta_0 and the newest).

The paper keeps every snapshot (about 7 in its runs). With `capacity` > 0 the pool is bounded, which the paper does
not do: theta_0 is always kept and the other slots hold a reservoir sample (Vitter's Algorithm R) of all later
snapshots. A uniform draw then takes theta_0 with probability 1/(n+1) after n pushes and otherwise a reservoir slot
uniformly, so every snapshot of the whole history is drawn with probability 1/(n+1), as with an unbounded pool.

Every random choice is a pure function of (seed, step) or (seed, push number): all DDP ranks draw the same snapshot
without talking to each other, and a resumed run draws what the uninterrupted run would have drawn.

Under FSDP (sharded=True) the policy is in pieces: each rank writes its shard of a snapshot into the snapshot's folder
(checkpoint.write_sharded) and reads its shard of the reference back from it, so no snapshot is ever gathered.
"""
import os
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import ddp
import model

DRAWS = ("uniform", "first", "last")


class ReferencePool:
    def __init__(self, base_state, draw="uniform", capacity=0, storage="memory", folder=None, seed=0,
                 dtype=torch.float32, writer=True, sharded=False):
        """base_state: theta_0's state dict, or None when load_state_dict follows (resume). writer: whether this
        process writes a disk pool's files (rank 0); the others only name them. sharded: FSDP's disk pool, every
        rank writes its shard (a collective)."""
        if draw not in DRAWS:
            raise ValueError(f"reference draw must be one of {DRAWS}, got {draw!r}")
        if storage not in ("memory", "disk") or (storage == "disk" and not folder):
            raise ValueError(f"storage must be 'memory' or 'disk' (with a folder), got {storage!r}")
        if capacity == 1 or capacity < 0:
            raise ValueError(f"capacity must be 0 (unbounded) or >= 2 (theta_0 + a reservoir), got {capacity}")
        self.draw_policy, self.capacity, self.storage, self.folder = draw, capacity, storage, folder
        self.seed, self.dtype, self.writer, self.sharded = seed, dtype, writer, sharded
        self.entries = []  # [{"step": int, "state": dict or None, "path": str or None}], theta_0 first
        self.pushes = 0  # snapshots pushed after theta_0, kept or not: n in the docstring
        if base_state is not None:
            self._put(0, base_state)

    def _put(self, step, state, slot=None):
        entry = {"step": step, "state": None, "path": None}  # path: a file name inside `folder`
        if self.storage == "memory":
            entry["state"] = {k: v.detach().to("cpu", self.dtype, copy=True) for k, v in state.items()}
        elif self.sharded:
            entry["path"] = f"snapshot_{step:08d}.dcp"
            os.makedirs(self.folder, exist_ok=True)
            checkpoint.write_sharded(os.path.join(self.folder, entry["path"]),
                                     {k: v.detach().to(self.dtype) for k, v in state.items()}, point="pool")
        else:  # written whole or not at all (checkpoint.write_file): a kill never leaves a partial snapshot in use
            entry["path"] = f"snapshot_{step:08d}.safetensors"  # relative: the run directory may move
            if self.writer:
                os.makedirs(self.folder, exist_ok=True)
                tensors = {k: v.detach().to("cpu", self.dtype).contiguous() for k, v in state.items()}
                # save_file writes the open temporary file by its name: no second copy of SD1.5's UNet in memory
                checkpoint.write_file(os.path.join(self.folder, entry["path"]), lambda f: save_file(tensors, f.name),
                                   point="pool")
        if slot is None:
            self.entries.append(entry)
        else:  # the replaced file stays on disk until prune(): the last checkpoint may still name it
            self.entries[slot] = entry

    def push(self, state, step):
        """Add the policy's weights after `step` updates (reservoir sampling when the pool is full)."""
        self.pushes += 1
        if self.draw_policy == "first":  # only theta_0 is ever drawn: nothing else to keep
            return
        if self.draw_policy == "last":  # only the newest is ever drawn: it replaces the previous one
            self._put(step, state, slot=1 if len(self.entries) > 1 else None)
            return
        if not self.capacity or len(self.entries) < self.capacity:
            self._put(step, state)
            return
        j = np.random.default_rng([self.seed, 1, self.pushes]).integers(self.pushes)  # Algorithm R
        if j < self.capacity - 1:
            self._put(step, state, slot=1 + j)

    def draw(self, step):
        """Index into `entries` of the reference for the stretch starting at `step`."""
        if self.draw_policy == "first":
            return 0
        if self.draw_policy == "last":
            return len(self.entries) - 1
        rng = np.random.default_rng([self.seed, 2, step])
        if len(self.entries) == self.pushes + 1:  # nothing was ever dropped: uniform over the pool
            return int(rng.integers(len(self.entries)))
        if rng.random() < 1 / (self.pushes + 1):  # theta_0 with its share of the whole history
            return 0
        return 1 + int(rng.integers(len(self.entries) - 1))

    def load_into(self, i, module):
        """Copy snapshot i into `module` in place: no new allocation, no config re-read (SSPO swaps often)."""
        e = self.entries[i]
        if self.sharded:  # each rank its shard, into the sharded reference's own tensors
            checkpoint.read_sharded(os.path.join(self.folder, e["path"]), module.state_dict())
            return e["step"]
        state = e["state"] if e["state"] is not None else load_file(os.path.join(self.folder, e["path"]))
        if isinstance(module, model.LoraReference):  # a LoRA run's snapshots are adapters (theta_0: adapters off)
            module.load(state, e["step"])
            return e["step"]
        with torch.no_grad():
            target = module.state_dict()
            for name, t in state.items():  # the whole UNet, or its trained part (an AnimateDiff run's motion modules)
                target[name].copy_(t)
        return e["step"]

    def prune(self, also=()):
        """Delete snapshot files the pool no longer holds and `also` (the files older kept checkpoints name) does
        not list. Call after a checkpoint of this state is safely saved."""
        if self.storage == "disk" and self.writer and os.path.isdir(self.folder):
            keep = {e["path"] for e in self.entries} | set(also)
            for f in os.listdir(self.folder):
                if f.endswith((".safetensors", ".dcp")) and f not in keep:
                    path = os.path.join(self.folder, f)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def state_dict(self):
        """For the training checkpoint. A memory pool carries its tensors; a disk pool only its file names."""
        return {"entries": self.entries, "pushes": self.pushes}

    def load_state_dict(self, d):
        for e in d["entries"]:
            if e["path"] is not None and not os.path.exists(os.path.join(self.folder, e["path"])):
                raise FileNotFoundError(f"reference snapshot {os.path.join(self.folder, e['path'])} (named in the "
                                        "checkpoint) is missing")
        self.entries, self.pushes = d["entries"], d["pushes"]


def make_pool(cfg, unet, out, master, ckpt=None, path=None):
    """-> the reference pool of a run, whose snapshots are copied in place into its one resident reference UNet
    (model.reference). The pool starts with theta_0, the policy as it is now (or comes from checkpoint `ckpt` at
    `path` on resume); a method other than SSPO only ever draws theta_0 (Diffusion-DPO's frozen base).
    With LoRA there is no second UNet: the reference is the policy's UNet with its adapters off (theta_0) or with
    a snapshot in its 'ref' adapter (model.LoraReference), and the pool holds adapters only (ref_dtype: their
    storage; the reference computes with the policy's weights)."""
    ref_dtype = torch.bfloat16 if cfg["ref_dtype"] == "bfloat16" else torch.float32
    pool = ddp.together(True, ReferencePool, None if ckpt else model.trained_state(unet, cfg),  # a disk pool writes theta_0
                        cfg["ref_policy"] if cfg["method"] == "sspo" else "first", cfg["pool_capacity"],
                        cfg["pool_storage"], os.path.join(out, "pool"), cfg["seed"], ref_dtype, master,
                        cfg["parallel"] == "fsdp")
    if ckpt:
        try:
            pool.load_state_dict(ckpt["pool"])
        except FileNotFoundError as e:
            raise SystemExit(f"error: {path}: {e}")
    return pool
