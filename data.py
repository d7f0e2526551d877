"""
Training data and what a step draws: real data (Pick-a-Pic v2 parquet shards, image folders with metadata.jsonl in
the diffusers convention, clip folders of frames or video files, and the VAE latent cache that latents.py builds),
the tiny worlds' (tiny/world.py, tiny/video.py), the order of the examples and the noise of each micro-step (one
random stream for pretraining, another for fine-tuning), what the data needed, and pictures of samples.
Every dataset yields {"prompt": str, "image_w": (3, R, R) float in [-1, 1]} ((3, F, R, R) for clips) and, for pairs,
"image_l"; a latent cache yields "latent_w" / "latent_l" instead. A dataset with a judge (the tiny worlds) also
offers judge_batch(images, prompts), eval_prompts() and tie_margin: how the training loop reaches the judge.
"""
import collections
import glob
import hashlib
import io
import itertools
import json
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import checkpoint
import ddp
import diffusion
import losses
from tiny import video, world
from tiny.world import to_uint8

def save_grid(images, path, labels=None, cols=8, tile=64):
    """Save (N, 3, H, W) images in [-1, 1] as one PNG, tiles upscaled to at least `tile` px (nearest, so small
    images stay crisp), an optional label under each."""
    x = to_uint8(images)
    n, h = len(x), x.shape[1]
    scale = max(1, tile // h)
    side, strip = h * scale, 12 if labels else 0
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * (side + 2), rows * (side + strip + 2)), (40, 40, 40))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, cols)
        xy = (c * (side + 2) + 1, r * (side + strip + 2) + 1)
        grid.paste(Image.fromarray(x[i]).resize((side, side), Image.NEAREST), xy)
        if labels:
            draw.text((xy[0] + 2, xy[1] + side), labels[i], fill=(230, 230, 230))
    grid.save(path)


def save_comparison(columns, prompts, labels, path, tile=64, blocks=1):
    """Save one labelled picture comparing models on the same prompts and noise: a header with each column's name,
    then one row per prompt (its text on the left, one tile per model, each with its label, e.g. its score below).
    columns: {name: (N, 3, H, W) in [-1, 1]}; labels: {name: N strings}; the rows are laid out in `blocks` side by
    side."""
    names, n = list(columns), len(prompts)
    tiles = {k: to_uint8(v) for k, v in columns.items()}
    side = max(tile, tiles[names[0]].shape[1])
    text_w, row_h, head = 170, side + 14, 14
    rows = (n + blocks - 1) // blocks
    block_w = text_w + len(names) * (side + 4)
    img = Image.new("RGB", (blocks * block_w, head + rows * row_h), (40, 40, 40))
    draw = ImageDraw.Draw(img)
    for b in range(blocks):
        for j, k in enumerate(names):
            draw.text((b * block_w + text_w + j * (side + 4) + 2, 1), k, fill=(255, 255, 160))
    for i, prompt in enumerate(prompts):
        b, r = divmod(i, rows)
        x0, y0 = b * block_w, head + r * row_h
        words, line, lines = prompt.split(), "", []
        for w in words:  # wrap the prompt into lines of about 26 characters
            if line and len(line) + len(w) > 26:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        lines.append(line)
        for li, text in enumerate(lines[:side // 12]):
            draw.text((x0 + 4, y0 + 2 + 12 * li), text, fill=(230, 230, 230))
        for j, k in enumerate(names):
            xy = (x0 + text_w + j * (side + 4), y0)
            img.paste(Image.fromarray(tiles[k][i]).resize((side, side), Image.NEAREST), xy)
            draw.text((xy[0] + 2, xy[1] + side), labels[k][i], fill=(230, 230, 230))
    img.save(path)




def _tiles(clips, tile):
    """(N, 3, F, R, R) in [-1, 1] -> uint8 (N, F, S, S, 3), upscaled (nearest) to S >= tile px."""
    x = video.clip_to_uint8(torch.as_tensor(clips))
    k = max(1, -(-tile // x.shape[2]))
    return x.repeat(k, axis=2).repeat(k, axis=3)


def save_clip_strip(clips, path, labels=None, tile=48):
    """One PNG, one row per clip: its frames left to right, an optional label under each row."""
    x = _tiles(clips, tile)
    n, F, S = x.shape[:3]
    strip = 12 if labels else 0
    img = Image.new("RGB", (F * (S + 2), n * (S + strip + 2)), (40, 40, 40))
    draw = ImageDraw.Draw(img)
    for i, f in itertools.product(range(n), range(F)):
        img.paste(Image.fromarray(x[i, f]), (f * (S + 2) + 1, i * (S + strip + 2) + 1))
    for i, label in enumerate(labels or []):
        draw.text((3, i * (S + strip + 2) + S + 1), label, fill=(230, 230, 230))
    img.save(path)


def save_gif(clips, path, tile=48, fps=8):
    """An animated GIF of the clips side by side, looping: frame f shows every clip's frame f."""
    x = _tiles(clips, tile)
    n, F, S = x.shape[:3]
    row = np.full((F, S, n * (S + 2), 3), 40, np.uint8)
    for i in range(n):
        row[:, :, i * (S + 2) + 1:i * (S + 2) + 1 + S] = x[i]
    frames = [Image.fromarray(f) for f in row]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)


# ----------------------------------------------------------------------------------------------------------------
# Real data: Pick-a-Pic v2 parquet shards (pairs), a prompts-only parquet, and a diffusers-style imagefolder.
# Items are {"prompt": str, "image_w": (3, R, R) float32 in [-1, 1]} plus "image_l" for pairs (w = preferred).
# Everything that can be checked cheaply is checked in __init__, so a bad file fails before hours of training,
# with one line naming the file/row/key. Item i of epoch e draws its augmentation from default_rng([seed, e, i]):
# the same in every process and DataLoader worker, and a new draw each epoch (call set_epoch).


def draw_aug(rng, random_crop, random_flip):
    """-> (crop, flip). crop None = center crop, else (u, v) in [0, 1)^2, the offset as a fraction of the slack.
    One draw per item, shared by the winner and the loser: Diffusion-DPO concatenates the pair before augmenting
    so both get the same crop and flip (a flip seen by only one image would be a difference the loss learns)."""
    crop = tuple(rng.random(2)) if random_crop else None
    return crop, bool(random_flip and rng.random() < 0.5)


NOTED = collections.Counter()  # this process's count of images load_image converted / upscaled (SkipBad reads it)


def to_rgb(im):
    """Any PIL image -> RGB, all pixels decoded. 16-bit greyscale (I;16, and I as 16-bit PNGs open) is scaled to
    8 bits, where PIL's convert would clip everything above 255 to white; transparency (RGBA, LA, PA, P with a
    transparent colour) is composited onto white, as an image viewer shows it; CMYK, L, P, YCbCr, ... by PIL."""
    if im.mode.startswith("I;16") or im.mode == "I":
        return Image.fromarray((np.asarray(im, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def load_image(src, resolution, aug=(None, False), name=None):
    """src: a path or encoded image bytes -> (3, R, R) float32 in [-1, 1]. Any mode is converted (to_rgb); then
    like torchvision's Resize(R) (PIL bilinear, shortest side = R, which the Diffusion-DPO and diffusers trainers
    use; a smaller image is upscaled), then Center/RandomCrop(R), then the flip from `aug`, then ToTensor +
    Normalize(0.5, 0.5). `name` is what an error calls the image. ValueError for bytes that are missing (None),
    corrupt or truncated."""
    name = name or (os.fspath(src) if isinstance(src, (str, os.PathLike)) else "image bytes")
    if src is None:
        raise ValueError(f"{name}: no image (missing bytes)")
    # Someone may have set this global to accept truncated files; then PIL silently pads them with grey. We want
    # an error instead, so turn it off for this decode only (DataLoader workers are processes, not threads).
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
            NOTED["converted"] += im.mode != "RGB"
            img = to_rgb(im)  # decodes all pixels now: JPEGs load lazily, so truncation shows up here
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    R, (w, h), (crop, flip) = resolution, img.size, aug
    NOTED["upscaled"] += min(w, h) < R
    W, H = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)  # torchvision Resize's rounding
    if (W, H) != img.size:
        img = img.resize((W, H), Image.BILINEAR)
    if crop is None:  # torchvision CenterCrop's offsets
        x, y = int(round((W - R) / 2)), int(round((H - R) / 2))
    else:  # uniform over the W - R + 1 (H - R + 1) possible offsets, like RandomCrop
        x, y = int(crop[0] * (W - R + 1)), int(crop[1] * (H - R + 1))
    img = img.crop((x, y, x + R, y + R))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1).copy()) / 127.5 - 1


def _open_parquet(f, columns):
    """-> pq.ParquetFile (use it in a `with`), after checking the file exists, is parquet and has `columns`."""
    import pyarrow.parquet as pq
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f}: no such file")
    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        raise ValueError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        pf.close()
        raise ValueError(f"{f}: missing column{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))} "
                         f"(has: {', '.join(names)})")
    return pf


def _check_captions(f, col, row0):
    """Reject null / non-string captions now, rather than crash the tokenizer mid-run."""
    if str(col.type) not in ("string", "large_string"):
        raise ValueError(f"{f}: column 'caption' has type {col.type}, expected string")
    if col.null_count:
        bad = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]
        raise ValueError(f"{f} row {row0 + bad}: caption is null")


def _check_labels(f, col, row0):
    """label_0 -> float array, after checking every value is 0, 0.5 or 1 (a null is not)."""
    import pyarrow as pa
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise ValueError(f"{f}: column 'label_0' has type {col.type}, expected a number")
    lab = col.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN, which fails the check below
    bad = np.flatnonzero(~np.isin(lab, (0, 0.5, 1)))
    if len(bad):
        raise ValueError(f"{f} row {row0 + bad[0]}: label_0 = {col[int(bad[0])].as_py()!r}, expected 0, 0.5 or 1")
    return lab


def read_prompts(path):
    """Prompts-only parquet (column `caption`) -> list of str in file order, duplicates dropped keeping the first
    (Pick-a-Pic's validation_unique style)."""
    with _open_parquet(path, ["caption"]) as pf:
        col = pf.read(columns=["caption"]).column("caption")
    _check_captions(path, col, 0)
    return list(dict.fromkeys(col.to_pylist()))


def _parquet_files(paths):
    """A parquet file, a folder (its *.parquet, sorted) or a list of files -> list of file paths."""
    if isinstance(paths, (str, os.PathLike)) and os.path.isdir(paths):
        files = sorted(glob.glob(os.path.join(os.fspath(paths), "*.parquet")))
        if not files:
            raise FileNotFoundError(f"{os.fspath(paths)}: folder has no *.parquet files")
    else:
        files = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: no such parquet file or folder")
    return files


class PickAPic(torch.utils.data.Dataset):
    """Pick-a-Pic v2 shards: caption, jpg_0, jpg_1 (JPEG bytes), label_0 (1: image 0 preferred, 0: image 1,
    0.5: tie). Ties are dropped, as in Diffusion-DPO. __init__ reads only caption and label_0 (to validate them and
    build the index); images (and the caption, kept off the heap) are read per item, a whole row group at a time,
    because a row group is the smallest unit parquet can read. Random access therefore costs one row-group read
    per item that misses the small cache below: with a shuffled sampler over big shards, expect I/O-bound loading
    (more DataLoader workers help; so do row groups of a few hundred rows). losers=False: items without the
    losing image, which is then never decoded (SFT and SSPO train on the winners only)."""

    def __init__(self, paths, resolution, random_crop=False, random_flip=True, seed=0, losers=True):
        self.files = _parquet_files(paths)
        self.resolution, self.random_crop, self.random_flip, self.seed, self.epoch, self.losers = \
            resolution, random_crop, random_flip, seed, 0, losers
        # index as flat numpy arrays, not a list of tuples: ~1M rows stay a few MB and are not copied page by
        # page into every forked DataLoader worker by Python's refcounting
        fid, pos, win, self.rg_start, n_rows = [], [], [], [], 0
        for k, f in enumerate(self.files):
            with _open_parquet(f, ["caption", "jpg_0", "jpg_1", "label_0"]) as pf:
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                self.rg_start.append(starts)
                for g in range(pf.num_row_groups):
                    t = pf.read_row_group(g, columns=["caption", "label_0"])
                    _check_captions(f, t.column("caption"), starts[g])
                    lab = _check_labels(f, t.column("label_0"), starts[g])
                    keep = np.flatnonzero(lab != 0.5)  # drop ties
                    fid.append(np.full(len(keep), k, np.int32))
                    pos.append(starts[g] + keep)  # row in file
                    win.append((lab[keep] == 0).astype(np.int8))  # 0: jpg_0 won, 1: jpg_1 won
                    n_rows += len(lab)
        if sum(map(len, fid)) == 0:  # an empty list of files lands here too
            src = self.files[0] if len(self.files) == 1 else f"{len(self.files)} parquet files"
            raise ValueError(f"{src}: no usable rows ({n_rows} rows in all; ties, label_0 = 0.5, are dropped)")
        self.fid, self.pos, self.win = np.concatenate(fid), np.concatenate(pos), np.concatenate(win)
        self._cache = {}  # (file, row group) -> table of caption/jpg_0/jpg_1, the most recently used two

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.fid)

    def _row_group(self, k, g):
        t = self._cache.pop((k, g), None)
        if t is None:
            import pyarrow.parquet as pq
            with pq.ParquetFile(self.files[k]) as pf:
                t = pf.read_row_group(g, columns=["caption", "jpg_0", "jpg_1"])
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))  # dicts keep insertion order: drop the least recent
        self._cache[(k, g)] = t  # (re)inserted last = most recently used
        return t

    def __getitem__(self, i):
        i = range(len(self))[i]  # negative indices, IndexError; a plain int for the rng
        k, pos, w = int(self.fid[i]), int(self.pos[i]), int(self.win[i])
        g = int(np.searchsorted(self.rg_start[k], pos, side="right")) - 1
        t, r = self._row_group(k, g), pos - int(self.rg_start[k][g])
        aug = draw_aug(np.random.default_rng([self.seed, self.epoch, i]), self.random_crop, self.random_flip)
        img = [load_image(t.column(f"jpg_{c}")[r].as_py(), self.resolution, aug, f"{self.files[k]} row {pos} jpg_{c}")
               for c in ((w, 1 - w) if self.losers else (w,))]
        return {"prompt": t.column("caption")[r].as_py(), "image_w": img[0],
                **({"image_l": img[1]} if self.losers else {})}


def read_metadata(root, what, why_not=lambda p: None if os.path.isfile(p) else "is not a file"):
    """root/metadata.jsonl (the diffusers imagefolder convention) -> (rows, paired): each row [text, file, loser
    file?] with the paths joined to root; `loser_file_name` on every line (pairs) or on none. Every line is checked
    before any training: valid JSON, the keys, their types, and that each file exists and why_not(path) has
    nothing against it (it returns None, or what is wrong)."""
    meta, rows, paired_all = os.path.join(root, "metadata.jsonl"), [], None
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"{meta}: no such file ({what} needs metadata.jsonl with file_name, text)")
    with open(meta, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{meta} line {n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
            paired = "loser_file_name" in d
            if paired_all is not None and paired != paired_all:
                raise ValueError(f"{where}: {'has' if paired else 'lacks'} loser_file_name but earlier lines "
                                 f"{'do not' if paired else 'do'} (all lines must be pairs, or none)")
            paired_all = paired
            keys = ["text", "file_name"] + ["loser_file_name"] * paired
            for key in keys:
                if key not in d:
                    raise ValueError(f"{where}: missing key '{key}'")
                if not isinstance(d[key], str):
                    raise ValueError(f"{where}: '{key}' must be a string, got {type(d[key]).__name__}")
                p = os.path.join(root, d[key])
                if key != "text" and not os.path.exists(p):
                    raise FileNotFoundError(f"{where}: {key} {p} does not exist")
                if key != "text" and why_not(p):
                    raise ValueError(f"{where}: {key} {p} {why_not(p)}")
            rows.append([d["text"]] + [os.path.join(root, d[key]) for key in keys[1:]])
    if not rows:
        raise ValueError(f"{meta}: no rows")
    return rows, paired_all


class ImageFolder(torch.utils.data.Dataset):
    """The diffusers imagefolder convention: root/metadata.jsonl, one JSON object a line with `file_name` (relative
    to root) and `text`; with `loser_file_name` too (on every line or none) the items are pairs, unless
    losers=False: then the losing images are checked to exist but never read."""

    def __init__(self, root, resolution, random_crop=False, random_flip=True, seed=0, losers=True):
        self.resolution, self.random_crop, self.random_flip, self.seed, self.epoch, self.losers = \
            resolution, random_crop, random_flip, seed, 0, losers
        self.rows, self.paired = read_metadata(root, "an imagefolder")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        i = range(len(self))[i]
        text, *files = self.rows[i]
        aug = draw_aug(np.random.default_rng([self.seed, self.epoch, i]), self.random_crop, self.random_flip)
        pair = self.paired and self.losers
        imgs = [load_image(p, self.resolution, aug) for p in (files if pair else files[:1])]
        return {"prompt": text, "image_w": imgs[0], **({"image_l": imgs[1]} if pair else {})}


class SkipBad(torch.utils.data.Dataset):
    """A real dataset whose unreadable examples (corrupt or truncated image, missing image bytes: load_image's
    ValueError naming file and row) are replaced by the next readable one, i + 1, i + 2, ...: every batch keeps its
    size, so DDP ranks stay in step and a run stays a pure function of its config (the replacement may repeat an
    example in the batch). Each item also carries, for the epoch's summary in train_sspo.py: `skipped` (unreadable
    examples passed over), `error` (the first one's message, else ""), `converted` and `upscaled` (images not in
    RGB, smaller than the resolution)."""

    def __init__(self, ds):
        self.ds = ds

    def set_epoch(self, epoch):
        self.ds.set_epoch(epoch)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        errors, before = [], collections.Counter(NOTED)
        for k in range(len(self.ds)):
            try:
                item = self.ds[(i + k) % len(self.ds)]
            except ValueError as e:
                errors.append(str(e))
                continue
            return {**item, "skipped": len(errors), "error": errors[0] if errors else "",
                    "converted": NOTED["converted"] - before["converted"], "upscaled": NOTED["upscaled"] - before["upscaled"]}
        raise ValueError(f"no readable example in the dataset; the first: {errors[0]}")


# ---------------------------------------------------------------------------------------------------------------
# Real clips: root/metadata.jsonl as ImageFolder's, each file_name a folder of frames or a video file (PyAV).
# A clip is float (3, F, H, W) in [-1, 1]: the per-sample layout of diffusers' AnimateDiff UNetMotionModel.

FRAME_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v", ".gif")


def decode_video(path, need, stride=1):
    """The first `need` frames of a video file, every stride-th kept -> (list of PIL RGB images, frames decoded:
    `need`, or all of a shorter video). ValueError for a file PyAV cannot decode; ImportError without PyAV, which
    SkipBad must not swallow as one bad clip."""
    try:
        import av
    except ImportError:
        raise ImportError(f"{path}: reading video files needs PyAV: pip install av") from None
    out, n = [], 0
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                if n % stride == 0:
                    out.append(frame.to_image().convert("RGB"))
                n += 1
                if n == need:
                    break
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from None
    return out, n


def _bmp(im):
    buf = io.BytesIO()
    im.save(buf, "BMP")
    return buf.getvalue()


def load_clip(path, resolution, frames, stride=1, flip=False):
    """A frame folder (its images sorted by name) or a video file -> (3, F, R, R) float in [-1, 1]: frames 0,
    stride, 2 stride, ..., each resized and center-cropped by load_image, all with the same flip. ValueError
    naming the file for a clip too short, a corrupt frame or video."""
    need = (frames - 1) * stride + 1
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTS))
        n, srcs, names = len(files), [os.path.join(path, f) for f in files[:need:stride]], [None] * frames
    else:  # a BMP round trip is lossless, so video frames go through load_image exactly as image files do
        images, n = decode_video(path, need, stride)
        srcs, names = [_bmp(im) for im in images], [f"{path} frame {k * stride}" for k in range(frames)]
    if n < need:
        raise ValueError(f"{path}: {n} frames, needs {need} (frames={frames}, stride={stride})")
    return torch.stack([load_image(s, resolution, (None, flip), name) for s, name in zip(srcs, names)], dim=1)


def why_not_a_clip(path):
    """None for a folder of frame images or a video file (by extension), else what is wrong (read_metadata)."""
    if not (os.path.isdir(path) or path.lower().endswith(VIDEO_EXTS)):
        return f"is neither a folder of frames nor a video file ({', '.join(VIDEO_EXTS)})"


class ClipFolder(torch.utils.data.Dataset):
    """ImageFolder for clips: root/metadata.jsonl, one JSON object a line with `file_name` (a folder of frame
    images or a video file, relative to root) and `text`, and `loser_file_name` on every line or none (pairs, unless
    losers=False). Everything cheap is checked here; a clip too short or corrupt fails when loaded, with a
    ValueError naming it, which SkipBad skips and counts."""

    def __init__(self, root, resolution, frames=8, stride=1, random_flip=True, seed=0, losers=True):
        self.resolution, self.frames, self.stride, self.random_flip, self.seed, self.losers, self.epoch = \
            resolution, frames, stride, random_flip, seed, losers, 0
        self.rows, self.paired = read_metadata(root, "a clip folder", why_not_a_clip)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        i = range(len(self))[i]
        text, *files = self.rows[i]
        _, flip = draw_aug(np.random.default_rng([self.seed, self.epoch, i]), False, self.random_flip)
        pair = self.paired and self.losers  # one flip for every frame of both clips (draw_aug says why)
        clips = [load_clip(p, self.resolution, self.frames, self.stride, flip) for p in (files if pair else files[:1])]
        return {"prompt": text, "image_w": clips[0], **({"image_l": clips[1]} if pair else {})}


# ----------------------------------------------------------------------------------------------------------------
# The VAE latent cache of a real dataset (built by latents.py): the encoder's moments of every image, stored once.
# Layout and why: latents.py's docstring.

SHARD = 256  # examples a shard: 64 MB at 512 px in bf16 with pairs and flips


def check_config(cfg):
    """SystemExit, before any work, for what the config's dataset cannot give."""
    synthetic = {"tiny": world, "tiny_video": video}.get(cfg["dataset"])
    if synthetic and cfg["data_path"]:
        raise SystemExit(f"config error: data_path={cfg['data_path']!r} is set but dataset={cfg['dataset']!r} draws its own "
                         f"{'clips' if cfg['dataset'] == 'tiny_video' else 'images'} (dataset='pickapic', 'imagefolder' "
                         "or 'clipfolder' to read it)")
    if not synthetic and not cfg["data_path"]:
        raise SystemExit(f"config error: dataset={cfg['dataset']!r} needs data_path")
    if not synthetic and not os.path.exists(cfg["data_path"]):
        raise SystemExit(f"config error: data_path {cfg['data_path']!r} does not exist")
    known = video.FLAWS if cfg["dataset"] == "tiny_video" else world.ALL_FLAWS
    bad = [f for f in cfg["tiny_flaws"] if f not in known]
    if bad:
        raise SystemExit(f"config error: tiny_flaws has {bad}; the {'video ' * (known is video.FLAWS)}world's "
                         f"flaws: {', '.join(known)}")
    if cfg["ssr"] == "oracle" and not synthetic:
        raise SystemExit(f"config error: ssr='oracle' flips by the tiny worlds' judge; dataset={cfg['dataset']!r} has none")
    if cfg["latent_cache"]:
        check_latent_config(cfg)


def check_latent_config(cfg):
    """Config errors that make a latent cache impossible, for latents.py and train_sspo.py alike."""
    if cfg["dataset"] not in ("pickapic", "imagefolder"):
        raise SystemExit("config error: latent_cache is for real data of images (dataset='pickapic' or 'imagefolder'); a "
                         "tiny world draws its examples, and clips are not cached")
    if cfg["random_crop"]:
        raise SystemExit("config error: latent_cache needs random_crop=False: a random crop cannot be precomputed")


def data_files(cfg):
    """{file: size in bytes} of what the dataset reads its index from, named relative to data_path (the data may
    move): a changed file is a different dataset. Training from the cache still reads these to check them."""
    path = cfg["data_path"]
    if cfg["dataset"] == "pickapic":
        files = _parquet_files(path)
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
        check_latent_config(cfg)
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
            flip = draw_aug(aug_rng, False, self.random_flip)[1]
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
    checkpoint.write_file(os.path.join(folder, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def write_shard(folder, s, x, rows):
    """Shard s: the moments (a tensor (n, images, flips, 2C, h, w)), then rows = {"prompt": [n prompts], and
    optionally per example "source" (the index whose images these are) and data.SkipBad's counts}, which mark it
    done."""
    x = x.view(torch.int16) if x.dtype == torch.bfloat16 else x  # numpy has no bfloat16: keep its bits
    checkpoint.write_file(shard_path(folder, s, "npy"), lambda f: np.save(f, x.numpy()))
    checkpoint.write_file(shard_path(folder, s, "json"), lambda f: f.write(json.dumps(rows).encode()))


# ----------------------------------------------------------------------------------------------------------------
# What a run reads and draws: the config's dataset, the order of its examples, and each micro-step's noise. Two
# random streams: 0 for pretraining (a run from scratch), 1 for fine-tuning, so that a fine-tune with the
# pretraining's seed does not replay its data order, noise and examples.

SYNTHETIC = ("tiny", "tiny_video")  # the datasets drawn on the fly, with their judges (world.py, video.py)


def tiny_world(dataset):
    """The module of a synthetic dataset's grammar and judge: world (images) or video (clips); None for real data.
    Both name alike what a run and its evaluation read: TRAIN_COMBOS, HELD_OUT, WORDS, PARTS, KINDS, prompt_of,
    parse_prompt, judge, kind_of."""
    return {"tiny": world, "tiny_video": video}.get(dataset)


def make_dataset(cfg, stream=0):
    """The config's dataset. stream 1 (fine-tuning): the tiny world draws other examples than pretraining's (0)."""
    if cfg["dataset"] == "tiny":
        return world.TinyWorld(cfg["tiny_mode"], cfg["tiny_size"], cfg["resolution"], cfg["tiny_p_correct"], cfg["seed"],
                              flaws=cfg["tiny_flaws"], stream=stream)
    if cfg["dataset"] == "tiny_video":
        return video.TinyVideoWorld(cfg["tiny_mode"], cfg["tiny_size"], cfg["resolution"], cfg["frames"],
                                    cfg["tiny_p_correct"], cfg["seed"], flaws=cfg["tiny_flaws"], stream=stream)
    if cfg["dataset"] == "clipfolder":
        return SkipBad(ClipFolder(cfg["data_path"], cfg["resolution"], cfg["frames"], cfg["frame_stride"],
                                        cfg["random_flip"], cfg["seed"], losers=cfg["method"] in losses.PAIR_METHODS))
    if cfg["latent_cache"]:
        ds = CachedLatents(cfg["latent_cache"], cfg["seed"], cfg["random_flip"])
        ds.check_config(cfg)
        return ds
    cls = PickAPic if cfg["dataset"] == "pickapic" else ImageFolder
    return SkipBad(cls(cfg["data_path"], cfg["resolution"], cfg["random_crop"], cfg["random_flip"], cfg["seed"],
                            losers=cfg["method"] in losses.PAIR_METHODS))  # SFT and SSPO never decode the losers


def open_dataset(cfg, stream, world_size):
    """make_dataset, checked before any work: ValueError for data that does not fit the method or the batch."""
    ds = make_dataset(cfg, stream)
    if cfg["method"] in losses.PAIR_METHODS and not {"image_l", "latent_l"} & ds[0].keys():
        raise ValueError(f"method={cfg['method']!r} needs paired data (image_l), but dataset={cfg['dataset']!r} has "
                         "none" + (" (set tiny_mode='pairs')" if cfg["dataset"] in SYNTHETIC else "")
                         + (": winners are its desirable, losers its undesirable samples" if cfg["method"] == "kto" else ""))
    if len(ds) // world_size < cfg["batch_size"]:
        raise ValueError(f"the dataset has {len(ds)} examples, fewer than one micro-batch of {cfg['batch_size']} "
                         f"per process x {world_size} process(es)")
    return ds


def stream_of(cfg, ckpt=None):
    """Which random stream a run draws from: 0 for pretraining (a run from scratch), 1 for fine-tuning. A fine-tune
    with the pretraining's seed must not replay its data order, noise and examples (it would re-train on exactly
    what the base saw first). A resumed run keeps the stream of the run it resumes."""
    return int((ckpt["config"] if ckpt else cfg)["init_from"] != "scratch")


def micro_batches(ds, cfg, rank, world, epoch, start, stream=0):
    """Yield (batch, (epoch, index of the next micro-batch)) forever, from micro-batch `start` of `epoch` on.
    DistributedSampler deals rank r the positions r, r + world, ... of one seeded permutation per epoch, so the
    global micro-batch is the same set of examples for any number of processes at a fixed global batch."""
    seed = cfg["seed"] if stream == 0 else int(np.random.SeedSequence([cfg["seed"], stream]).generate_state(1)[0])
    while True:
        sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        order = list(sampler)[start * cfg["batch_size"]:]  # fast-forward on resume: no batch is loaded twice
        loader = DataLoader(ds, cfg["batch_size"], sampler=order, num_workers=cfg["num_workers"], drop_last=True)
        for i, batch in enumerate(loader, start + 1):
            yield batch, (epoch, i)
        epoch, start = epoch + 1, 0


def counted(batches, tallies, epoch, tokenizer, bad_data, device):
    """micro_batches, counting what each micro-batch's data needed (tally_data) and reporting each epoch when the
    next one starts (report_data); `epoch` is the one the first micro-batch belongs to."""
    for batch, pos in batches:
        if pos[0] != epoch:  # a new epoch: what the one before needed
            report_data(tallies, epoch, device)
            epoch = pos[0]
        tally_data(tallies["data"], batch, tokenizer, bad_data)
        yield batch, pos


def step_randomness(cfg, step, micro, rank, world, shape, num_timesteps, stream=0, device=None):
    """Noise, timesteps, caption-dropout draws, the self-sampler's x_T, the VAE's latent noise (winner, loser),
    the self-sampler's per-step noise (K, B, ...; None unless SSPO samples with self_sample_eta > 0) and SSR's own
    (eps (K, B, ...), t (K, B)) draws (None unless ssr_draws > 0) of one micro-step, a pure function of (seed, step,
    micro, stream), on `device` if given.
    Drawn for the whole global micro-batch and dealt like DistributedSampler deals examples (rank r takes rows
    r, r + world, ...): each example gets the same draws whatever the number of processes, and resume is exact."""
    # SeedSequence pads its entropy with zeros to 4 words: stream 0 is [seed, step, micro] as before streams existed
    key = np.random.SeedSequence([cfg["seed"], step, micro, stream]).generate_state(1)[0]
    g = torch.Generator().manual_seed(int(key))
    n = world * shape[0]
    eps = torch.randn((n, *shape[1:]), generator=g)[rank::world]
    t = diffusion.sample_timesteps(n, num_timesteps, g, cfg["timestep_density"])[rank::world]
    drop = (torch.rand(n, generator=g) < cfg["caption_dropout"])[rank::world]
    x_T = torch.randn((n, *shape[1:]), generator=g)[rank::world]
    vae_noise = torch.randn((2, n, *shape[1:]), generator=g)[:, rank::world]
    eta_noise = crit = None
    if cfg["method"] == "sspo" and cfg["self_sample_eta"] > 0:  # drawn last: the draws above do not depend on it
        eta_noise = torch.randn((cfg["self_sample_steps"], n, *shape[1:]), generator=g)[:, rank::world]
    if cfg["method"] == "sspo" and cfg["ssr_draws"] > 0:  # SSR's own (eps, t) draws, after all the others
        crit = (torch.randn((cfg["ssr_draws"], n, *shape[1:]), generator=g)[:, rank::world],
                diffusion.sample_timesteps((cfg["ssr_draws"], n), cfg["ssr_t_max"], g)[:, rank::world])
    if device is not None:  # drop stays on the CPU: it picks prompts
        eps, t, x_T, vae_noise = (x.to(device) for x in (eps, t, x_T, vae_noise))
        eta_noise = None if eta_noise is None else eta_noise.to(device)
        crit = None if crit is None else (crit[0].to(device), crit[1].to(device))
    return eps, t, drop, x_T, vae_noise, eta_noise, crit


# ----------------------------------------------------------------------------------------------------------------
# What the data needed, counted per epoch for the log

DATA_TALLIES = ("skipped", "converted", "upscaled", "empty_caption", "long_caption")


def tally_data(counts, batch, tokenizer, bad_data):
    """Count, per micro-batch, what the data needed: examples skipped as unreadable and images converted or
    upscaled (data.SkipBad), empty captions (trained as the unconditional prompt) and captions longer than the
    tokenizer's 77 tokens (encode_prompts truncates them). bad_data='stop' stops at the first unreadable example."""
    for err in batch.get("error", ()):
        if err and bad_data == "stop":
            raise SystemExit(f"error: {err} (bad_data='stop'; 'skip' replaces such examples)")
        if err:  # every rank's (log.txt gets rank 0's; the epoch's counts sum all ranks)
            rank = dist.get_rank() if dist.is_initialized() else 0
            msg = (f"rank {rank}: " if dist.is_initialized() else "") + f"skipped unreadable data: {err}"
            if rank == 0:
                ddp.print0(msg)
            else:
                tqdm.write(msg)
    for k in ("skipped", "converted", "upscaled"):
        counts[k] += int(batch[k].sum()) if k in batch else 0
    counts["empty_caption"] += sum(not p.strip() for p in batch["prompt"])
    counts["long_caption"] += sum(len(ids) > tokenizer.model_max_length for ids in tokenizer(list(batch["prompt"])).input_ids)


def report_data(tallies, epoch, device, partial=False):
    """One line per epoch (summed over ranks), then the counts start again."""
    n = dist.get_world_size() if dist.is_initialized() else 1
    c = {k: v * n for k, v in ddp.all_mean(tallies["data"], device).items()}
    ddp.print0(f"data of epoch {epoch}{' so far' if partial else ''}: " + ", ".join(f"{k} {v:.0f}" for k, v in c.items()))
    tallies["data"] = dict.fromkeys(DATA_TALLIES, 0)
