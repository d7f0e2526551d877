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
DIR/shard_NNNNNN.json (their prompts, and what data.SkipBad reported), each written whole (data.write_shard). The .json is written last and marks
a shard done, so a build that was stopped goes on from where it was. Rank r of N builds shards r, r + N, ...
"""
import json
import math
import os
import sys

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

import config
import data
import model


@torch.no_grad()
def build_shard(ds, s, vae, cfg, device, bar):
    """Encode examples [s x SHARD, ...) of ds, a data.SkipBad image dataset (unflipped) -> (moments, rows)."""
    idx = range(s * data.SHARD, min(len(ds), (s + 1) * data.SHARD))
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
    cfg = config.get_config(argv)
    if not cfg["latent_cache"]:
        raise SystemExit("config error: latents.py writes the cache named by latent_cache; set --latent_cache=DIR")
    data.check_latent_config(cfg)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
    src = cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"]
    folder, meta_path = cfg["latent_cache"], os.path.join(cfg["latent_cache"], "meta.json")
    try:  # bad input is a one-line error before any encoding; so is a write that fails (it names the file)
        check_folder(folder)
        # the training run's dataset, unflipped (build_shard makes the flips)
        ds = data.make_dataset({**cfg, "latent_cache": "", "random_flip": False})
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
    dtype = torch.bfloat16 if cuda and cfg["mixed_precision"] != "no" else torch.float32  # as train_sspo.py loads it
    vae = vae.to(device, dtype).eval().requires_grad_(False)
    meta = {**data.describe(cfg, len(ds), 2 if "image_l" in ds[0] else 1), **data.vae_id(vae)}
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
        data.write_meta(folder, meta)
    os.makedirs(folder, exist_ok=True)
    n = math.ceil(len(ds) / data.SHARD)
    for s in range(rank, n, world):  # what a stopped build of these shards left; other ranks' files are theirs
        for ext in ("npy", "json"):
            if os.path.exists(data.shard_path(folder, s, ext) + ".tmp"):
                os.remove(data.shard_path(folder, s, ext) + ".tmp")
    todo = [s for s in range(rank, n, world) if not os.path.isfile(data.shard_path(folder, s, "json"))]
    print(f"latents: {len(ds)} examples x {meta['images']} image(s) x {len(meta['flips'])} flip(s) at "
          f"{cfg['resolution']} px -> {folder}; rank {rank} of {world}: {len(todo)} of its shards to build")
    tallies = dict.fromkeys(("skipped", "converted", "upscaled"), 0)
    bar = tqdm(total=sum(min(len(ds), (s + 1) * data.SHARD) - s * data.SHARD for s in todo), disable=rank != 0,
               desc="encode", unit="example", dynamic_ncols=True)
    for s in todo:
        x, rows = build_shard(ds, s, vae, cfg, device, bar)
        tallies = {k: v + sum(rows[k]) for k, v in tallies.items()}
        data.write_shard(folder, s, x, rows)
    bar.close()
    print(f"latents: rank {rank} done; data it read: " + ", ".join(f"{k} {v}" for k, v in tallies.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
