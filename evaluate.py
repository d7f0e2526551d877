"""
Evaluate a run directory on the tiny world: sample every prompt under a stated protocol, score with the judge on
seen and held-out prompts, and (with --base) the win rate against another run on the same prompts and noise.

    python evaluate.py out/tiny_sspo --base out/tiny_base

Writes RUN_DIR/eval/scores.json (per image and means, with the protocol and the model's identity), grid.png, and
side_by_side.png (base left, run right, same noise) with --base. The architecture comes from the run directory.
The paper's metrics for Stable Diffusion (PickScore, HPSv2, ImageReward, aesthetic) are not implemented yet.
"""
import argparse
import json
import os

import numpy as np
import torch

import data
import model


def load_run(run_dir):
    """-> (model parts, the run's config, its step). The run directory is an SD-layout folder; ckpt.pt holds the
    config (memory-mapped: the optimizer state in it is never read)."""
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} not found: not a run directory of train_sspo.py")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    cfg, step = ckpt["config"], int(ckpt["step"])
    if cfg["dataset"] != "tiny":
        raise SystemExit(f"error: {run_dir} trained on {cfg['dataset']!r}; only the tiny world's judge is "
                         "implemented so far (PickScore/HPSv2/ImageReward are not)")
    m = model.load_model(run_dir)
    m["unet"].eval()
    return m, cfg, step


@torch.no_grad()
def sample_all(m, prompts, protocol):
    """The paper's protocol, in miniature: one generator seeded once and reused across all prompts in order."""
    g = torch.Generator().manual_seed(protocol["seed"])
    u = m["unet"]
    shape = (u.config.in_channels, u.config.sample_size, u.config.sample_size)
    uncond = model.encode_prompts(m["tokenizer"], m["text_encoder"], [""])
    out = []
    for i in range(0, len(prompts), 64):
        chunk = prompts[i:i + 64]
        cond = model.encode_prompts(m["tokenizer"], m["text_encoder"], chunk)
        noise = torch.randn((len(chunk), *shape), generator=g)
        x = model.ddim_sample(u, m["scheduler"], cond, uncond, noise, protocol["steps"], protocol["guidance"])
        out.append(model.latents_to_images(m["vae"], x))
    return torch.cat(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--base", default="", help="another run directory to compare against (win rate, side by side)")
    p.add_argument("--images_per_prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=0, help="DDIM steps (default: the run's sample_steps)")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance scale (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    m, cfg, step = load_run(args.run_dir)
    protocol = {"sampler": "DDIM, eta 0", "steps": args.steps or cfg["sample_steps"],
                "guidance": args.guidance or cfg["guidance"], "seed": args.seed,
                "generator": "one, seeded once, reused across prompts in order",
                "images_per_prompt": args.images_per_prompt}
    seen = [data.prompt_of(c) for c in data.TRAIN_COMBOS]
    held = [data.prompt_of(c) for c in data.HELD_OUT]
    prompts = [q for q in seen + held for _ in range(args.images_per_prompt)]
    print("protocol:", protocol)
    runs = {"run": (args.run_dir, m)}
    if args.base:
        runs["base"] = (args.base, load_run(args.base)[0])
    scores, images = {}, {}
    for name, (d, mm) in runs.items():
        images[name] = sample_all(mm, prompts, protocol)
        scores[name] = np.array([data.judge(x, q)[0] for x, q in zip(images[name], prompts)])
    n_seen = len(seen) * args.images_per_prompt
    result = {"run_dir": os.path.abspath(args.run_dir), "step": step, "protocol": protocol, "per_image": [{"prompt": q, "judge": float(s)} for q, s in zip(prompts, scores["run"])]}
    rows = []
    for name, s in scores.items():
        rows.append((name, runs[name][0], s[:n_seen].mean(), s[n_seen:].mean()))
        result[f"judge_seen_{name}"], result[f"judge_heldout_{name}"] = float(s[:n_seen].mean()), float(s[n_seen:].mean())
    if args.base:  # a tie counts half
        d = scores["run"] - scores["base"]
        result["base_dir"] = os.path.abspath(args.base)
        result["win_rate_vs_base"] = float(((d > 1e-6) + 0.5 * (np.abs(d) <= 1e-6)).mean())
    out = os.path.join(args.run_dir, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump(result, f, indent=1)
    first = slice(0, None, args.images_per_prompt)  # one image per prompt in the pictures
    data.save_grid(images["run"][first], os.path.join(out, "grid.png"), [f"{s:.2f}" for s in scores["run"][first]])
    if args.base:
        pairs = torch.stack([images["base"][first], images["run"][first]], 1).flatten(0, 1)
        data.save_grid(pairs, os.path.join(out, "side_by_side.png"), cols=8)

    print("\n| model | run dir | judge, seen prompts | judge, held-out prompts |\n|---|---|---|---|")
    for name, d, a, b in rows:
        print(f"| {name} | {d} | {a:.3f} | {b:.3f} |")
    if args.base:
        print(f"\nwin rate of {args.run_dir} against {args.base}: {result['win_rate_vs_base']:.3f} "
              f"({len(prompts)} images, same noise)")
    print(f"wrote {out}/scores.json, grid.png" + (", side_by_side.png" if args.base else ""))


if __name__ == "__main__":
    main()
