"""
Which words a tiny-world model listens to: on the same noise, how much the UNet's prediction changes when one word of
the prompt is swapped for another of its kind (colour, shape, place or motion), at a few timesteps; for a video model
also how much the prediction differs between frames. A word the model ignores moves the prediction by orders of
magnitude less than the others (docs/tiny_world.md: the place word of the first image base; docs/video.md: the
motion word of the video base).

    python -m tiny.probe out/tiny_base
    python -m tiny.probe out/tiny_video_base --timesteps 999 900 500
"""
import argparse

import torch

import data
import model


@torch.no_grad()
def word_effects(m, world, timesteps=(999, 700, 400), resolution=16, frames=8, n_prompts=16, seed=0):
    """-> {t: {kind: mean |d prediction|}} over n_prompts of the world's prompts, each kind's word swapped for the
    next of its kind, and for a video model 'frames': mean |prediction - its mean over frames| (0 = a still clip)."""
    combos = world.ALL_COMBOS[::max(1, len(world.ALL_COMBOS) // n_prompts)][:n_prompts]
    kinds = {"colour": 0, "shape": 1, "motion" if model.is_video(m["unet"]) else "place": 2}
    shape = (len(combos), *model.latent_shape(m, resolution, frames))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # the same noise for every prompt set

    def predict(cs, t):
        ctx = model.encode_prompts(m, [world.prompt_of(c) for c in cs], resolution)
        return model.unet_output(m["unet"], x, torch.full((len(cs),), t), ctx).float()

    out = {}
    for t in timesteps:
        ref = predict(combos, t)
        row = {}
        for kind, i in kinds.items():
            values = sorted({c[i] for c in world.ALL_COMBOS})
            swapped = [(*c[:i], values[(values.index(c[i]) + 1) % len(values)], *c[i + 1:]) for c in combos]
            row[kind] = (predict(swapped, t) - ref).abs().mean().item()
        if x.dim() == 5:
            row["frames"] = (ref - ref.mean(2, keepdim=True)).abs().mean().item()
        out[t] = row
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model_dir", help="a tiny-world run directory or SD-layout folder (image or video)")
    p.add_argument("--timesteps", type=int, nargs="*", default=[999, 700, 400])
    p.add_argument("--frames", type=int, default=8, help="frames of a clip (video models)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    try:
        m = model.load_model(a.model_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load a model from {a.model_dir}: {e}")
    world = data.tiny_world("tiny_video" if model.is_video(m["unet"]) else "tiny")
    resolution = m["unet"].config.sample_size * model.vae_factor(m)
    effects = word_effects(m, world, a.timesteps, resolution, a.frames, seed=a.seed)
    cols = list(next(iter(effects.values())))
    print(f"mean |change of the prediction| when one word is swapped, {a.model_dir} (same noise):\n")
    print("| t | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for t, row in effects.items():
        print(f"| {t} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    if "frames" in cols:
        print("\nframes: mean |prediction - its mean over the frames| on the original prompts (0: a still clip)")


if __name__ == "__main__":
    main()
