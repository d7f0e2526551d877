"""
Precomputed VAE latents for real data (pickapic, imagefolder): encode every image once, then train from the cache
in every run over the same data. On the H100, VAE encoding is a quarter of an SFT or Diffusion-DPO step at 512 px
(README, Performance). Build the cache with the training config, then train with the same `latent_cache`:

    python latents.py configs/sd15.py --latent_cache=/data/pap_latents          # or torchrun --nproc_per_node=8
    torchrun --nproc_per_node=8 train_sspo.py configs/sd15.py --latent_cache=/data/pap_latents

Stored per example, per image (winner; loser too when the config's method reads pairs: --method=dpo builds a cache
for every method, in which an example with an unreadable loser is replaced for every method) and per flip (none;
horizontal too when random_flip): the VAE encoder's output (mean and log-variance, (2C, R/8, R/8) in the VAE's
dtype), not a sample: every step still draws its own latent noise (model.sample_latents), so a run from the cache
is the run without it, up to how the VAE rounds in another batch. A center crop is a fixed window, so the flipped
crop is the crop's flip; random_crop cannot be precomputed and is refused. Unreadable examples are replaced as data.SkipBad replaces them.

Layout: DIR/meta.json (what it was built from: data files, resolution, flips, VAE weights' hash and dtype),
DIR/shard_NNNNNN.npy (SHARD examples: (n, images, flips, 2C, h, w); bfloat16 kept as int16 bits) and
DIR/shard_NNNNNN.json (their prompts, and what data.SkipBad reported), each written whole (durable.write_file). The .json is written last and marks
a shard done, so a build that was stopped goes on from where it was. Rank r of N builds shards r, r + N, ...
"""
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

import data
import durable
import model

SHARD = 256  # examples a shard: 64 MB at 512 px in bf16 with pairs and flips


def check_config(cfg):
    """Config errors that make a cache impossible, for latents.py and train_sspo.py alike."""
    if cfg["dataset"] == "tiny":
        raise SystemExit("config error: latent_cache is for real data (dataset='pickapic' or 'imagefolder'); the "
                         "tiny world draws its images")
    if cfg["random_crop"]:
        raise SystemExit("config error: latent_cache needs random_crop=False: a random crop cannot be precomputed")


def data_files(cfg):
    """{file: size in bytes} of what the dataset reads its index from, named relative to data_path (the data may
    move): a changed file is a different dataset. Training from the cache still reads these to check them."""
    path = cfg["data_path"]
    if cfg["dataset"] == "pickapic":
        files = data._parquet_files(path)
    else:
        files = [os.path.join(path, "metadata.jsonl")]
    base = path if os.path.isdir(path) else os.path.dirname(path)
    return {os.path.relpath(f, base): os.path.getsize(f) for f in files}


def vae_id(vae):
    """The VAE's weights as loaded (sha256 of every tensor's bytes) and dtype: latents from another VAE are wrong."""
    h = hashlib.sha256()
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"vae_sha256": h.hexdigest(), "vae_dtype": str(vae.dtype).removeprefix("torch.")}


def describe(cfg, n_examples, images):
    """Everything but the VAE that meta.json records."""
    return {"dataset": cfg["dataset"], "data_files": data_files(cfg), "examples": n_examples, "images": images,
            "resolution": cfg["resolution"], "flips": [False, True] if cfg["random_flip"] else [False], "shard": SHARD}


def shard_path(folder, s, ext):
    return os.path.join(folder, f"shard_{s:06d}.{ext}")


class CachedLatents(torch.utils.data.Dataset):
    """The dataset of a latent cache: items {prompt, latent_w (and latent_l for pairs)} of shape (2C, h, w), the
    flip drawn per (seed, epoch, index) exactly as the image datasets draw it. Checks at once that the cache is
    complete; check_config(cfg) that it was built for this config's data, resolution and flips; check_vae(vae)
    that it was built with this VAE."""

    def __init__(self, folder, seed=0, random_flip=False):
        self.folder, self.seed, self.random_flip, self.epoch = folder, seed, random_flip, 0
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path}: no such file; build the cache first: python latents.py CONFIG "
                                    f"--latent_cache={folder}")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            n = math.ceil(self.meta["examples"] / SHARD)
            self.meta["images"], self.meta["vae_dtype"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path}: not a latent cache's meta.json ({type(e).__name__}: {e})") from None
        missing = [s for s in range(n) if not os.path.isfile(shard_path(folder, s, "json"))]
        if missing:
            raise ValueError(f"{folder}: {len(missing)} of {n} shards are not built (first: "
                             f"{shard_path(folder, missing[0], 'npy')}); run python latents.py CONFIG again "
                             "to finish the cache")
        self._rows = (None, None)  # (shard, its rows): one JSON read per shard a worker visits in a row

    def check_config(self, cfg):
        """ValueError unless the cache was built for this config's data files, resolution and flips."""
        check_config(cfg)
        want = describe(cfg, self.meta["examples"], self.meta["images"])
        bad = [f"{k}: cache {self.meta.get(k)!r}, config {v!r}" for k, v in want.items() if self.meta.get(k) != v]
        if bad:
            raise ValueError(f"{self.folder} was built for other data or settings ({'; '.join(bad)}); build another "
                             "cache with python latents.py CONFIG, or point latent_cache at the matching one")

    def check_vae(self, vae):
        if vae is None:
            raise ValueError(f"latent_cache {self.folder}: the model has no VAE (a pixel-space model)")
        have = vae_id(vae)
        if {k: self.meta.get(k) for k in have} != have:
            raise ValueError(f"{self.folder} was built with another VAE (sha256 {self.meta.get('vae_sha256', '?')[:12]}"
                             f", {self.meta.get('vae_dtype')}); this run's is {have['vae_sha256'][:12]}, "
                             f"{have['vae_dtype']}: build a cache for it with python latents.py CONFIG")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.meta["examples"]

    def __getitem__(self, i):
        i = range(len(self))[i]
        s, r = divmod(i, SHARD)
        path = shard_path(self.folder, s, "json")
        try:
            if self._rows[0] != s:
                with open(path) as f:
                    self._rows = (s, json.load(f))
            row = {k: v[r] for k, v in self._rows[1].items()}  # prompt, and what data.SkipBad reported
            # data.SkipBad replaced an unreadable example i by the readable i + k: its flip is drawn for i + k
            aug_rng = np.random.default_rng([self.seed, self.epoch, row.pop("source", i)])
            flip = data.draw_aug(aug_rng, False, self.random_flip)[1]
            path = shard_path(self.folder, s, "npy")
            x = np.array(np.load(path, mmap_mode="r")[r, :, int(flip)])  # (images, 2C, h, w), read from disk
        except Exception as e:
            raise ValueError(f"{path}: unreadable latent cache shard ({type(e).__name__}: {e}); delete it and its "
                             ".json (or .npy) and run python latents.py CONFIG to rebuild it") from None
        x = torch.from_numpy(x)
        if self.meta["vae_dtype"] == "bfloat16":
            x = x.view(torch.bfloat16)
        return {**row, "latent_w": x[0], **({"latent_l": x[1]} if len(x) > 1 else {})}


def write_meta(folder, meta):
    os.makedirs(folder, exist_ok=True)
    durable.write_file(os.path.join(folder, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def write_shard(folder, s, x, rows):
    """Shard s: the moments (a tensor (n, images, flips, 2C, h, w)), then rows = {"prompt": [n prompts], and
    optionally per example "source" (the index whose images these are) and data.SkipBad's counts}, which mark it
    done."""
    x = x.view(torch.int16) if x.dtype == torch.bfloat16 else x  # numpy has no bfloat16: keep its bits
    durable.write_file(shard_path(folder, s, "npy"), lambda f: np.save(f, x.numpy()))
    durable.write_file(shard_path(folder, s, "json"), lambda f: f.write(json.dumps(rows).encode()))


@torch.no_grad()
def build_shard(ds, s, vae, cfg, device, bar):
    """Encode examples [s x SHARD, ...) of ds, a data.SkipBad image dataset (unflipped) -> (moments, rows)."""
    idx = range(s * SHARD, min(len(ds), (s + 1) * SHARD))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), cfg["batch_size"],
                                         num_workers=cfg["num_workers"])
    flips = [False, True] if cfg["random_flip"] else [False]
    out, rows = [], {k: [] for k in ("prompt", "source", "skipped", "error", "converted", "upscaled")}
    for batch in loader:
        for err in batch["error"]:
            if err and cfg["bad_data"] == "stop":
                raise SystemExit(f"error: {err} (bad_data='stop'; 'skip' replaces such examples)")
        first = idx[0] + len(rows["prompt"])
        rows["source"] += [(first + j + k) % len(ds) for j, k in enumerate(batch["skipped"].tolist())]
        for k in ("prompt", "error", "skipped", "converted", "upscaled"):
            rows[k] += batch[k] if k in ("prompt", "error") else batch[k].tolist()
        per_image = []
        for key in ("image_w", "image_l") if "image_l" in batch else ("image_w",):
            x = batch[key].to(device)
            per_image.append(torch.stack([model.encode_moments(vae, x.flip(-1) if f else x) for f in flips], 1))
        out.append(torch.stack(per_image, 1).cpu())  # (b, images, flips, 2C, h, w)
        bar.update(len(batch["prompt"]))
    return torch.cat(out), rows


def main(argv):
    import train_sspo  # here, not above: train_sspo.py imports this file
    cfg = train_sspo.get_config(argv)
    if not cfg["latent_cache"]:
        raise SystemExit("config error: latents.py writes the cache named by latent_cache; set --latent_cache=DIR")
    check_config(cfg)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
    src = cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"]
    folder, meta_path = cfg["latent_cache"], os.path.join(cfg["latent_cache"], "meta.json")
    try:  # bad input is a one-line error before any encoding; so is a write that fails (it names the file)
        check_folder(folder)
        # the training run's dataset, unflipped (build_shard makes the flips)
        ds = train_sspo.make_dataset({**cfg, "latent_cache": "", "random_flip": False})
        build(cfg, ds, src, folder, meta_path, rank, world, device, cuda)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")


def check_folder(folder):
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"latent_cache {folder} is a file, not a folder")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    foreign = sorted(f for f in names if not f.startswith(("meta.json", "shard_")))
    if foreign:  # never write into a folder of someone else's files
        raise ValueError(f"{folder} is not empty and not a latent cache (it has {foreign[0]!r}); choose a new "
                         "or empty folder for latent_cache")


def build(cfg, ds, src, folder, meta_path, rank, world, device, cuda):
    if src == "scratch" or (os.path.isdir(src) and not os.path.isdir(os.path.join(src, "vae"))):
        raise ValueError(f"init_from={src!r} has no VAE (a pixel-space model): there is nothing to cache")
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", local_files_only=model.check_model_path(src))
    dtype = torch.bfloat16 if cuda and cfg["mixed_precision"] == "bf16" else torch.float32  # as train_sspo.py loads it
    vae = vae.to(device, dtype).eval().requires_grad_(False)
    meta = {**describe(cfg, len(ds), 2 if "image_l" in ds[0] else 1), **vae_id(vae)}
    if os.path.isfile(meta_path):  # go on with a cache of the same build; never mix two
        try:
            with open(meta_path) as f:
                old = json.load(f)
        except ValueError as e:
            raise ValueError(f"{meta_path}: not a latent cache's meta.json ({e})") from None
        if old != meta:
            diff = "; ".join(f"{k}: {old.get(k)!r} there, {v!r} here" for k, v in meta.items() if old.get(k) != v)
            raise ValueError(f"{folder} holds a cache built for something else ({diff}); choose another "
                             "latent_cache (nothing there is overwritten)")
    elif rank == 0:
        write_meta(folder, meta)
    os.makedirs(folder, exist_ok=True)
    n = math.ceil(len(ds) / SHARD)
    for s in range(rank, n, world):  # what a stopped build of these shards left; other ranks' files are theirs
        for ext in ("npy", "json"):
            if os.path.exists(shard_path(folder, s, ext) + ".tmp"):
                os.remove(shard_path(folder, s, ext) + ".tmp")
    todo = [s for s in range(rank, n, world) if not os.path.isfile(shard_path(folder, s, "json"))]
    print(f"latents: {len(ds)} examples x {meta['images']} image(s) x {len(meta['flips'])} flip(s) at "
          f"{cfg['resolution']} px -> {folder}; rank {rank} of {world}: {len(todo)} of its shards to build")
    tallies = dict.fromkeys(("skipped", "converted", "upscaled"), 0)
    bar = tqdm(total=sum(min(len(ds), (s + 1) * SHARD) - s * SHARD for s in todo), disable=rank != 0,
               desc="encode", unit="example", dynamic_ncols=True)
    for s in todo:
        x, rows = build_shard(ds, s, vae, cfg, device, bar)
        tallies = {k: v + sum(rows[k]) for k, v in tallies.items()}
        write_shard(folder, s, x, rows)
    bar.close()
    print(f"latents: rank {rank} done; data it read: " + ", ".join(f"{k} {v}" for k, v in tallies.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
