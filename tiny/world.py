"""
The tiny world: a synthetic text-to-image task generated on the fly, our offline stand-in for Pick-a-Pic +
PickScore. Prompts from a small grammar ("a red circle on the left"), images drawn with PIL at 16 px, a base
distribution with one flaw in most draws, and a deterministic judge that scores an image against its prompt.
Every method trains on it for real and is judged on it for real, on a CPU (docs/tiny_world.md).
"""
import itertools

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

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


PARTS = ("colour", "position", "shape", "clean")  # judge's parts
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
            raise ValueError(f"{type(self).__name__} mode must be 'base' or 'pairs', got {mode!r}")
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
        return self.render(combo, rng, flaw)

    # what an item is made of; video.TinyVideoWorld words, draws, judges and converts clips instead
    prompt_of = staticmethod(prompt_of)
    all_combos, held_out, words = ALL_COMBOS, HELD_OUT, WORDS

    def render(self, combo, rng, flaw):
        return render(combo, self.resolution, rng, flaw)

    def judge(self, x, prompt):
        """x: what render draws (uint8), or an item's float tensor."""
        return judge(to_uint8(x) if torch.is_tensor(x) else x, prompt)[0]

    def eval_prompts(self):
        """What a run's evals sample and judge: {"seen": the training combinations' prompts, "heldout": the rest}."""
        return {"seen": [self.prompt_of(c) for c in self.all_combos if c not in self.held_out],
                "heldout": [self.prompt_of(c) for c in self.held_out]}

    def judge_the_data(self):
        return judge_the_data(self, self.seed, self.mode)

    def judge_batch(self, images, prompts):
        """The judge of each image (float tensors in [-1, 1], as items hold them and the sampler draws them) against
        its prompt -> float64 array: how the training loop reaches the judge (the log's self-sample scores)."""
        return np.array([self.judge(x, p) for x, p in zip(images, prompts)])

    def as_tensor(self, x):
        return to_tensor(x)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i, self.stream])  # stream 0: [seed, i] (zero-padded alike)
        combo = self.combos[rng.integers(len(self.combos))]
        prompt = self.prompt_of(combo)
        if self.mode == "base":
            return {"prompt": prompt, "image_w": self.as_tensor(self.draw(combo, rng))}
        while True:
            a, b = self.draw(combo, rng), self.draw(combo, rng)
            sa, sb = self.judge(a, prompt), self.judge(b, prompt)
            if abs(sa - sb) >= self.tie_margin:
                break
        w, l = (a, b) if sa > sb else (b, a)
        return {"prompt": prompt, "image_w": self.as_tensor(w), "image_l": self.as_tensor(l)}


def judge_the_data(ds, seed, mode):
    """One line for the log: the judge of correct renders of all the tiny world's prompts (the ceiling) and of 256
    of the training images (what the base was trained to draw, or the pairs' winners). ds: a TinyWorld (images or
    clips)."""
    rng = np.random.default_rng(seed)
    correct = np.mean([ds.judge(ds.render(c, rng, None), ds.prompt_of(c)) for c in ds.all_combos])
    drawn = np.mean([ds.judge(ds[i]["image_w"], ds[i]["prompt"]) for i in range(256)])
    return f"judge of the data: correct renders {correct:.3f}, training images ({mode}) {drawn:.3f}"
