"""
Training data. Two kinds:
  - the tiny world: a synthetic text-to-image task generated on the fly (prompts from a small grammar, images drawn
    with PIL, a deterministic judge), our offline stand-in for Pick-a-Pic + PickScore;
  - real data: Pick-a-Pic v2 parquet shards, and image folders with metadata.jsonl (the diffusers convention).
Every dataset yields {"prompt": str, "image_w": (3, R, R) float in [-1, 1]} and, for pairs, "image_l".
"""
import collections
import glob
import io
import itertools
import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFilter

# ---------------------------------------------------------------------------------------------------------------
# the tiny world: "a red circle on the left"

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7)}  # centre, x y
PREP = {"left": "on the", "right": "on the", "top": "at the", "bottom": "at the"}
WORDS = [*COLOURS, *SHAPES, *POSITIONS, "a", "on", "at", "the"]
RADIUS = 0.28  # half-size of a shape, as a fraction of the image side
ALL_FLAWS = ("colour", "position", "shape", "blur", "extra", "noise")  # what render() can get wrong
FLAWS = ("colour", "position", "shape", "blur")  # the base distribution's default (see TinyWorld)

ALL_COMBOS = list(itertools.product(COLOURS, SHAPES, POSITIONS))  # 48 prompts
# 8 combinations never seen in training; each colour and position is held out twice, each shape two or three
# times, and all of them are still seen in other combinations (compositional generalization)
HELD_OUT = [(c, SHAPES[(2 * i + k) % 3], list(POSITIONS)[(i + 2 * k) % 4]) for i, c in enumerate(COLOURS) for k in (0, 1)]
TRAIN_COMBOS = [c for c in ALL_COMBOS if c not in HELD_OUT]


def prompt_of(combo):
    colour, shape, position = combo
    return f"a {colour} {shape} {PREP[position]} {position}"


def parse_prompt(prompt):
    """'a red circle on the left' -> ('red', 'circle', 'left'); ValueError for a prompt outside the grammar."""
    w = prompt.lower().split()
    if len(w) != 6 or w[1] not in COLOURS or w[2] not in SHAPES or w[5] not in POSITIONS:
        raise ValueError(f"not a tiny-world prompt: {prompt!r}")
    return w[1], w[2], w[5]


def render(combo, resolution=16, rng=None, flaw=None):
    """Draw `combo` as a uint8 (R, R, 3) array: a shape on black, drawn at 4x and box-filtered down (anti-aliased).
    rng adds a little jitter of place and size; `flaw` makes one thing wrong."""
    rng = rng if rng is not None else np.random.default_rng(0)
    colour, shape, position = combo
    if flaw == "colour":
        colour = rng.choice([c for c in COLOURS if c != colour])
    if flaw == "shape":
        shape = rng.choice([s for s in SHAPES if s != shape])
    if flaw == "position":
        position = rng.choice([p for p in POSITIONS if p != position])
    centre = np.array(POSITIONS[position]) + rng.uniform(-0.04, 0.04, 2)
    img = _draw(shape, centre, RADIUS * rng.uniform(0.95, 1.05), COLOURS[colour], resolution)
    if flaw == "blur":
        img = img.filter(ImageFilter.GaussianBlur(0.14 * resolution))
    x = np.asarray(img, dtype=np.float32)
    if flaw == "extra":  # a second shape of another colour somewhere else
        other = (rng.choice([c for c in COLOURS if c != colour]), rng.choice(SHAPES),
                 rng.choice([p for p in POSITIONS if p != position]))
        x = np.maximum(x, render(other, resolution, rng))
    if flaw == "noise":  # per-pixel noise: not a default flaw, it makes a small model's samples grainy everywhere
        x = x + rng.normal(0, 60, x.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def _draw(shape, centre, radius, fill, resolution):
    """PIL image of one shape on black; centre (x, y) and radius as fractions of the side."""
    S = 4 * resolution
    (cx, cy), r = np.asarray(centre) * S, radius * S
    img = Image.new("RGB", (S, S))
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    return img.resize((resolution, resolution), Image.BOX)


def _chroma(rgb):
    """Colour with brightness divided out: an anti-aliased edge (colour x coverage) has its shape's chroma."""
    return rgb / np.maximum(rgb.max(-1, keepdims=True), 1e-6)


def _centroid(w):
    ys, xs = np.mgrid[:w.shape[0], :w.shape[1]]
    return np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum()


def judge(image, prompt):
    """How well an image matches its prompt, in [0, 1]: the mean of four scores, each in [0, 1] --
    colour: chromaticity of the foreground vs the named colour's;
    position: foreground centroid vs the named place;
    shape: soft IoU of the foreground with the named shape drawn at that centroid, against the best other shape;
    clean: no pixels of a foreign colour (noise) and no excess of half-lit pixels (blur, smears).
    image: uint8 (R, R, 3) array, or float (3, R, R) in [-1, 1]. Returns (score, dict of the four)."""
    colour, shape, position = parse_prompt(prompt)
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
        x = (x.transpose(1, 2, 0) + 1) * 127.5
    x, R = x / 255.0, x.shape[0]
    light = x.max(-1)
    fg = light > 0.45
    if fg.sum() < 2:
        return 0.0, {"colour": 0.0, "position": 0.0, "shape": 0.0, "clean": 0.0}
    chroma = _chroma(x[fg]).mean(0)
    s_colour = 1 - np.linalg.norm(chroma - _chroma(np.array(COLOURS[colour], dtype=np.float32))) / 0.4
    w = np.clip(light / max(light[fg].mean(), 1e-6), 0, 1)  # soft coverage of each pixel
    c = _centroid(w)
    iou = {}
    for s, off in _template_offsets(R).items():  # each shape drawn with its centroid on the image's
        t = np.asarray(_draw(s, c / R - off, RADIUS, (255, 255, 255), R), dtype=np.float32)[..., 0] / 255
        iou[s] = np.minimum(w, t).sum() / np.maximum(w, t).sum()
    best = max(iou, key=iou.get)  # the drawn shape's centre is its centroid minus that shape's offset
    centre = c / R - _template_offsets(R)[best]
    s_position = 1 - max(0.0, np.linalg.norm(centre - np.array(POSITIONS[position])) - 0.05) / 0.2
    margin = iou[shape] - max(v for k, v in iou.items() if k != shape)
    s_shape = min((margin + 0.05) / 0.15, iou[shape] / 0.7)
    lit = light > 0.12
    foreign = lit & (np.linalg.norm(_chroma(x) - chroma, axis=-1) > 0.35)
    half_lit = lit & (light < 0.75 * light[fg].mean())
    # sharp anti-aliased edges leave at most 0.38 of the lit pixels half-lit (a triangle's most), the blur flaw >= 0.56
    s_clean = 1 - max(foreign.mean() - 0.01, 0) / 0.05 - max(half_lit.sum() / lit.sum() - 0.45, 0) / 0.1
    parts = {k: float(np.clip(v, 0, 1)) for k, v in
             {"colour": s_colour, "position": s_position, "shape": s_shape, "clean": s_clean}.items()}
    return float(np.mean(list(parts.values()))), parts


KINDS = ("correct", "wrong colour", "wrong place", "unclean", "wrong shape", "empty")


def kind_of(parts):
    """What is wrong with an image, from its judge parts: 'empty' (no foreground), else the first part below 0.5
    in the order colour, place, clean, shape (a blurred shape also fails the shape part), else 'correct'. One kind
    per image, so the kinds of a set add up; each flaw of render() is its own kind (tests/test_world.py)."""
    if not any(parts.values()):
        return "empty"
    for part, kind in (("colour", "wrong colour"), ("position", "wrong place"), ("clean", "unclean"),
                       ("shape", "wrong shape")):
        if parts[part] < 0.5:
            return kind
    return "correct"


def foreground_centroid(image):
    """(x, y) of the lit pixels' centroid as fractions of the side, or None for an empty image: where a shape
    landed, whatever its shape."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
        x = (x.transpose(1, 2, 0) + 1) * 127.5
    light = x.max(-1) / 255
    fg = light > 0.45
    if fg.sum() < 2:
        return None
    return tuple(_centroid(np.clip(light / light[fg].mean(), 0, 1)) / x.shape[0])


_OFFSETS = {}


def _template_offsets(R):
    """Centroid of each shape minus its nominal centre (a triangle's centroid sits below its centre)."""
    if R not in _OFFSETS:
        _OFFSETS[R] = {s: _centroid(np.asarray(_draw(s, (0.5, 0.5), RADIUS, (255, 255, 255), R),
                                               dtype=np.float32)[..., 0] / 255) / R - 0.5 for s in SHAPES}
    return _OFFSETS[R]


def to_tensor(x):
    """uint8 (R, R, 3) -> float (3, R, R) in [-1, 1]."""
    return torch.from_numpy(x.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)


def to_uint8(x):
    """float (3, R, R) or (B, 3, R, R) in [-1, 1] -> uint8 (..., R, R, 3)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


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


class TinyWorld(torch.utils.data.Dataset):
    """`size` examples of the tiny world, item i a pure function of (seed, i).
    mode="base": one draw of the base distribution per prompt (what the base model is pretrained on): correct with
    probability p_correct, else one flaw from FLAWS. mode="pairs": two base draws for one prompt, the one the judge
    prefers first; draws the judge scores within `tie_margin` of each other are ties, dropped and redrawn, as
    Pick-a-Pic drops its ties. stream: 0 for pretraining, 1 for fine-tuning, which draws other examples for the
    same seed (train_sspo.stream_of)."""

    def __init__(self, mode="base", size=50_000, resolution=16, p_correct=0.4, seed=0, tie_margin=0.02,
                 combos=None, flaws=FLAWS, stream=0):
        if mode not in ("base", "pairs"):
            raise ValueError(f"TinyWorld mode must be 'base' or 'pairs', got {mode!r}")
        self.mode, self.size, self.resolution, self.p_correct = mode, size, resolution, p_correct
        self.seed, self.tie_margin, self.combos, self.flaws = seed, tie_margin, combos or TRAIN_COMBOS, tuple(flaws)
        self.stream = stream
        self.epoch = 0  # the tiny world has no augmentation: items do not change across epochs

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.size

    def draw(self, combo, rng):
        flaw = None if rng.random() < self.p_correct or not self.flaws else self.flaws[rng.integers(len(self.flaws))]
        return render(combo, self.resolution, rng, flaw)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i, self.stream])  # stream 0: [seed, i] (zero-padded alike)
        combo = self.combos[rng.integers(len(self.combos))]
        prompt = prompt_of(combo)
        if self.mode == "base":
            return {"prompt": prompt, "image_w": to_tensor(self.draw(combo, rng))}
        while True:
            a, b = self.draw(combo, rng), self.draw(combo, rng)
            sa, sb = judge(a, prompt)[0], judge(b, prompt)[0]
            if abs(sa - sb) >= self.tie_margin:
                break
        w, l = (a, b) if sa > sb else (b, a)
        return {"prompt": prompt, "image_w": to_tensor(w), "image_l": to_tensor(l)}


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


class ImageFolder(torch.utils.data.Dataset):
    """The diffusers imagefolder convention: root/metadata.jsonl, one JSON object a line with `file_name` (relative
    to root) and `text`; with `loser_file_name` too (on every line or none) the items are pairs, unless
    losers=False: then the losing images are checked to exist but never read."""

    def __init__(self, root, resolution, random_crop=False, random_flip=True, seed=0, losers=True):
        self.resolution, self.random_crop, self.random_flip, self.seed, self.epoch, self.losers = \
            resolution, random_crop, random_flip, seed, 0, losers
        meta, self.rows, self.paired = os.path.join(root, "metadata.jsonl"), [], None
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"{meta}: no such file (an imagefolder needs metadata.jsonl with file_name, text)")
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
                if self.paired is not None and paired != self.paired:
                    raise ValueError(f"{where}: {'has' if paired else 'lacks'} loser_file_name but earlier lines "
                                     f"{'do not' if paired else 'do'} (all lines must be pairs, or none)")
                self.paired = paired
                keys = ["text", "file_name"] + ["loser_file_name"] * paired
                for key in keys:
                    if key not in d:
                        raise ValueError(f"{where}: missing key '{key}'")
                    if not isinstance(d[key], str):
                        raise ValueError(f"{where}: '{key}' must be a string, got {type(d[key]).__name__}")
                    if key != "text" and not os.path.isfile(os.path.join(root, d[key])):
                        raise FileNotFoundError(f"{where}: {key} {os.path.join(root, d[key])} does not exist")
                self.rows.append([d["text"]] + [os.path.join(root, d[key]) for key in keys[1:]])
        if not self.rows:
            raise ValueError(f"{meta}: no rows")

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
