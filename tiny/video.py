"""
The tiny video world: the tiny world's shapes set moving ("a red circle moving left", "a blue square growing"), a base
distribution with one flaw in most draws (static, wrong direction, jitter, wrong colour), and a judge. A clip is float
(3, F, H, W) in [-1, 1] (channels, frames, height, width: the per-sample layout of diffusers' AnimateDiff
UNetMotionModel); a clip to judge or draw is uint8 (F, H, W, 3). Its dataset yields {"prompt": str, "image_w":
(3, F, R, R)} and, for pairs, "image_l": the training loop's keys. Real clips are data.py's (clipfolder).
"""
import itertools

import numpy as np
import torch

from tiny import world
from tiny.world import COLOURS, RADIUS, SHAPES

# ---------------------------------------------------------------------------------------------------------------
# the tiny video world: "a red circle moving left", "a blue square growing"

# Each motion starts where the shape comes from (entering the frame cut by its border) and opposite motions do not
# share a segment: left and right, or growing and shrinking, over the same segment have the same mean over frames,
# so a model's per-frame layers would get no gradient to tell the two words apart (docs/video.md).
MOVES = {"left": ((0.8, 0.5), (0.4, 0.5)), "right": ((0.2, 0.5), (0.6, 0.5)),  # centre (x, y) first -> last frame
         "up": ((0.5, 0.8), (0.5, 0.4)), "down": ((0.5, 0.2), (0.5, 0.6))}
SIZES = {"growing": (0.14, 0.30), "shrinking": (0.36, 0.20)}  # radius first -> last frame, the shape centred
MOTIONS = (*MOVES, *SIZES)
WORDS = [*COLOURS, *SHAPES, "a", "moving", *MOTIONS]  # the tiny tokenizer's vocabulary (model.build_tokenizer)
FLAWS = ("static", "direction", "jitter", "colour")  # what render_clip can get wrong, one at a time

ALL_COMBOS = list(itertools.product(COLOURS, SHAPES, MOTIONS))  # 72 prompts
# 12 combinations never seen in training: each colour held out 3 times, each shape 4, each motion twice, and all of
# them still seen in other combinations (compositional generalization, as world.HELD_OUT)
HELD_OUT = [(c, SHAPES[k], MOTIONS[(i + 2 * k) % 6]) for i, c in enumerate(COLOURS) for k in range(3)]
TRAIN_COMBOS = [c for c in ALL_COMBOS if c not in HELD_OUT]


def prompt_of(combo):
    colour, shape, motion = combo
    return f"a {colour} {shape} moving {motion}" if motion in MOVES else f"a {colour} {shape} {motion}"


def parse_video_prompt(prompt):
    """'a red circle moving left' -> ('red', 'circle', 'left'); 'a red circle growing' -> (..., 'growing');
    ValueError for a prompt outside the grammar."""
    w = prompt.lower().split()
    ok = (len(w) == 5 and w[3] == "moving" and w[4] in MOVES) or (len(w) == 4 and w[3] in SIZES)
    if not ok or w[0] != "a" or w[1] not in COLOURS or w[2] not in SHAPES:
        raise ValueError(f"not a tiny-video prompt: {prompt!r}")
    return w[1], w[2], w[-1]


def track(motion, frames):
    """-> centres (F, 2) and radii (F,) of the shape in each frame, as fractions of the side: linear in time, the
    frames evenly spaced from the first moment to the last (one frame: the first moment)."""
    t = np.linspace(0, 1, frames)[:, None]
    (a, b), (r0, r1) = MOVES.get(motion, ((0.5, 0.5), (0.5, 0.5))), SIZES.get(motion, (RADIUS, RADIUS))
    return (1 - t) * np.array(a) + t * np.array(b), ((1 - t) * r0 + t * r1)[:, 0]


def render_clip(combo, frames=8, resolution=16, rng=None, flaw=None):
    """Draw `combo` as a uint8 (F, R, R, 3) clip, each frame drawn like world.render. rng shifts the whole track a
    little and scales the shape (world.render's jitter, once per clip); `flaw` makes one thing wrong: static (every
    frame the same moment of the track), direction (another motion), jitter (each frame's centre off its track by
    up to 0.12 of the side: no coherent path), colour. A one-frame clip is the motion's first moment, where the shape
    starts: the frames as images that a video base first learns to draw (configs/tiny_video_frames.py; a random
    moment would smear the place the motion word sets along its track, docs/video.md)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    colour, shape, motion = combo
    if flaw == "colour":
        colour = rng.choice([c for c in COLOURS if c != colour])
    if flaw == "direction":
        motion = rng.choice([m for m in MOTIONS if m != motion])
    centres, radii = track(motion, frames)
    centres, radii = centres + rng.uniform(-0.03, 0.03, 2), radii * rng.uniform(0.95, 1.05)
    if flaw == "static":
        k = rng.integers(frames)
        centres, radii = centres[[k] * frames], radii[[k] * frames]
    if flaw == "jitter":
        centres = centres + rng.uniform(-0.12, 0.12, (frames, 2))
    return np.stack([np.asarray(world._draw(shape, c, r, COLOURS[colour], resolution))
                     for c, r in zip(centres, radii)])


def clip_to_tensor(x):
    """uint8 (F, R, R, 3) -> float (3, F, R, R) in [-1, 1]."""
    return torch.from_numpy(x.astype(np.float32) / 127.5 - 1).permute(3, 0, 1, 2)


def clip_to_uint8(x):
    """float (3, F, R, R) or (B, 3, F, R, R) in [-1, 1] -> uint8 (..., F, R, R, 3)."""
    return world.to_uint8(x.movedim(-4, -3))


_AREAS = {}


def _shape_score(w, shape):
    """world.judge's shape score made scale-free, for shapes that grow: each shape's template is drawn at the
    foreground's centroid with the radius that gives it the foreground's area, and the named shape's soft IoU is
    compared with the best other shape's. w: soft coverage (R, R)."""
    R = w.shape[0]
    if R not in _AREAS:  # each shape's area at RADIUS, in pixels
        _AREAS[R] = {s: np.asarray(world._draw(s, (0.5, 0.5), RADIUS, (255, 255, 255), R))[..., 0].sum() / 255
                     for s in SHAPES}
    c, iou = world._centroid(w) / R, {}
    for s, off in world._template_offsets(R).items():  # offsets were measured at RADIUS; they scale with r
        r = RADIUS * np.sqrt(w.sum() / _AREAS[R][s])
        t = np.asarray(world._draw(s, c - off * r / RADIUS, r, (255, 255, 255), R), dtype=np.float32)[..., 0] / 255
        iou[s] = np.minimum(w, t).sum() / np.maximum(w, t).sum()
    margin = iou[shape] - max(v for k, v in iou.items() if k != shape)
    return min((margin + 0.05) / 0.15, iou[shape] / 0.7)


def _fit_net(y, idx, frames):
    """Least-squares slope of y (n, ...) over frame indices idx, times F - 1: the net change over the clip, which a
    single noisy frame moves far less than last - first does."""
    t = idx - idx.mean()
    return (t @ (y - y.mean(0))) / (t @ t) * (frames - 1)


ZERO = {"colour": 0.0, "shape": 0.0, "clean": 0.0, "motion": 0.0, "smooth": 0.0, "travel": 0.0, "net_x": 0.0,
        "net_y": 0.0, "grow": 0.0}


def judge_clip(clip, prompt):
    """How well a clip matches its prompt, in [0, 1]: score = picture x movement, where
      picture = mean(colour, shape, clean), each the mean over frames of --
        colour, clean: world.judge's parts for the frame (its position part is ignored);
        shape: world.judge's shape score with the templates scaled to the foreground's area (_shape_score);
      movement = mean(motion, smooth) over the foreground's track (centroid c_f and soft area a_f of each frame) --
        motion, for "moving <dir>" with unit vector u: along = net . u, across = |net x u|, net the fitted
          displacement over the clip (0.4 of the side asked): min(along / 0.24, 1) - max(across - 0.05, 0) / 0.1;
          for growing (shrinking, g negated): g = fitted net change of log a_f (ln 3.6 = 1.28 asked):
          min(g / 0.75, 1) - max(|net| - 0.05, 0) / 0.1;
        smooth: 1 - max(rms_f |d_f - mean d| - 0.02, 0) / 0.05, d_f the centroid's step per frame: a straight,
          even track scores 1, a jittering one 0.
    A product, so a perfect picture that does not move (or moves wrongly) scores at most 0.5, and noise, whose
    centroid sits still in the middle, gets no credit for being smooth. Every part is clipped to [0, 1]. `travel`
    (how much the clip moves or changes size at all, 1 = a fifth of the side, or area x 1.8) tells kind_of_clip a
    static clip from a wrong direction; it is not in the score, nor are net_x, net_y (net, y down) and grow (g),
    unclipped, for evaluate.py's table of how the shapes move per motion word. Frames without foreground score 0
    and leave the track; fewer than 2 with foreground: all 0. A one-frame clip is judged by its picture alone (its
    movement parts 0). clip: uint8 (F, R, R, 3), or float (3, F, R, R) in [-1, 1] (a tensor or a float array).
    Returns (score, parts)."""
    colour, shape, motion = parse_video_prompt(prompt)
    x = torch.as_tensor(clip)
    x = x.numpy() if x.dtype == torch.uint8 else clip_to_uint8(x)
    F, R, as_image = len(x), x.shape[1], world.prompt_of((colour, shape, "left"))  # any place: its part is ignored
    frame_parts, cs, areas, idx = [], [], [], []
    for f, im in enumerate(x):
        light = im.max(-1) / 255.0
        fg = light > 0.45  # world.judge's and world.foreground_centroid's foreground and soft coverage
        if fg.sum() < 2:
            frame_parts.append((0.0, 0.0, 0.0))
            continue
        w = np.clip(light / light[fg].mean(), 0, 1)
        p = world.judge(im, as_image)[1]
        frame_parts.append((p["colour"], float(np.clip(_shape_score(w, shape), 0, 1)), p["clean"]))
        cs.append(world._centroid(w) / R), areas.append(w.mean()), idx.append(f)
    if F == 1 and idx:
        return float(np.mean(frame_parts[0])), dict(ZERO, **dict(zip(("colour", "shape", "clean"), frame_parts[0])))
    if len(idx) < 2:
        return 0.0, dict(ZERO)
    cs, idx = np.array(cs), np.array(idx, dtype=np.float64)
    net, g = _fit_net(cs, idx, F), _fit_net(np.log(areas), idx, F)
    if motion in MOVES:
        a, b = np.array(MOVES[motion])
        u = (b - a) / np.linalg.norm(b - a)
        along, across = net @ u, abs(net[0] * u[1] - net[1] * u[0])
        s_motion = min(along / 0.24, 1) - max(across - 0.05, 0) / 0.1
    else:
        s_motion = min(g * (1 if motion == "growing" else -1) / 0.75, 1) - max(np.linalg.norm(net) - 0.05, 0) / 0.1
    steps = np.diff(cs, axis=0) / np.diff(idx)[:, None]
    wobble = np.sqrt(((steps - steps.mean(0)) ** 2).sum(-1).mean())
    colour_, shape_, clean_ = np.mean(frame_parts, axis=0)
    parts = {k: float(np.clip(v, 0, 1)) for k, v in {
        "colour": colour_, "shape": shape_, "clean": clean_, "motion": s_motion,
        "smooth": 1 - max(wobble - 0.02, 0) / 0.05, "travel": max(np.linalg.norm(net) / 0.2, abs(g) / 0.6)}.items()}
    parts.update(net_x=float(net[0]), net_y=float(net[1]), grow=float(g))
    score = np.mean([parts[k] for k in ("colour", "shape", "clean")]) * (parts["motion"] + parts["smooth"]) / 2
    return float(score), parts


# the names world.py has: a tiny world's module reads alike for images and clips (data.tiny_world)
judge, parse_prompt, PARTS = judge_clip, parse_video_prompt, ("colour", "shape", "clean", "motion", "smooth")


KINDS = ("correct", "wrong colour", "jitter", "static", "wrong direction", "unclean", "wrong shape", "empty")


def kind_of_clip(parts):
    """What is wrong with a clip, from judge_clip's parts: 'empty', else the first part below 0.5 in the order
    colour, smooth (jitter: it spoils the motion part too), motion (static if it hardly moves at all, else wrong
    direction), clean, shape, else 'correct'. One kind per clip; each flaw of render_clip is its own kind."""
    if not any(parts.values()):
        return "empty"
    if parts["colour"] < 0.5:
        return "wrong colour"
    if parts["smooth"] < 0.5:
        return "jitter"
    if parts["motion"] < 0.5:
        return "static" if parts["travel"] < 0.5 else "wrong direction"
    for part, kind in (("clean", "unclean"), ("shape", "wrong shape")):
        if parts[part] < 0.5:
            return kind
    return "correct"


kind_of = kind_of_clip


class TinyVideoWorld(world.TinyWorld):
    """world.TinyWorld for clips: `size` examples, item i a pure function of (seed, i, stream). mode="base": one
    draw of the base distribution (correct with probability p_correct, else one flaw from `flaws`); mode="pairs":
    two base draws for one prompt, the one judge_clip prefers first, draws within `tie_margin` redrawn."""

    def __init__(self, mode="base", size=50_000, resolution=16, frames=8, p_correct=0.4, seed=0, tie_margin=0.02,
                 combos=None, flaws=FLAWS, stream=0):
        super().__init__(mode, size, resolution, p_correct, seed, tie_margin, combos or TRAIN_COMBOS, flaws, stream)
        self.frames = frames

    prompt_of = staticmethod(prompt_of)
    all_combos, held_out, words = ALL_COMBOS, HELD_OUT, WORDS

    def render(self, combo, rng, flaw):
        return render_clip(combo, self.frames, self.resolution, rng, flaw)

    def judge(self, x, prompt):
        return judge_clip(x, prompt)[0]

    def as_tensor(self, x):
        return clip_to_tensor(x)
