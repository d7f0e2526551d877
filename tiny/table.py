"""
The paper's table in miniature: base, SFT, Diffusion-DPO, Diffusion-KTO, SPIN-Diffusion, SSPO and SSPO's ablations
(the oracle SSR among them), each trained from the same tiny base with the same optimizer steps and the same data, for
several seeds, then judged -- each at its own learning rate and beta, chosen by a tuning stage of equal size for every
tuned method (GRIDS: 6 points each, on a validation seed, judged on the seen prompts only).

    python -m tiny.table                       # tuning stage, then the table: 12 rows x 3 seeds, 2 runs at a time
    python -m tiny.table --objectives          # + the other objectives' rows (DMPO, MaPO, ...) at DPO's learning rate
    python -m tiny.table --seeds 0 --only SSPO SFT --jobs 1
    python -m tiny.table --tune_seeds          # no tuning stage: every row at its config's point
    python -m tiny.table --out out/quick --set max_steps=20      # --set KEY=VALUE: overrides for every run
    python -m tiny.table --base out/tiny_base4500 --out out/table4500   # runs from another (already trained) base
    python -m tiny.table --video               # the tiny video world: base, SFT, Diffusion-DPO, SSPO on clips

Re-runnable: a run whose eval/scores.json exists is not trained again (delete out/table to start over). Writes
out/table/table.md (printed too: the table, what the logs say per row, the tuning stage's grids and chosen points),
tuning.md, results.json, samples.png (every method's samples on the same prompts and noise) and curves.png (judge
against step, mean over seeds). Each run is `python train_sspo.py CONFIG --seed=S --out_dir=...` then `python
evaluate.py RUN`; its log is out/table/NAME_POINT_sS/run.log (tuning runs: out/table/tune/).
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import diffusion
import model
from checkpoint import read_checkpoint
from tiny import video, world

BASE = "out/tiny_base"
OUT = "out/table"
BASE_CONFIG = "configs/tiny_base.py"
W = world  # the world's module: prompts, held-out combinations, judge (video for --video)
# name -> (config, overrides). All share configs/tiny.py's budget; SFT, SPIN and SSPO read winners only, DPO pairs.
RUNS = {
    "SFT, oracle": ("configs/tiny_sft.py", ["--tiny_mode=base", "--tiny_p_correct=1.0"]),  # correct renders only
    "SFT": ("configs/tiny_sft.py", []),
    "SFT, base data": ("configs/tiny_sft.py", ["--tiny_mode=base"]),  # control: fine-tuning as such, no preference
    "Diffusion-DPO": ("configs/tiny_dpo.py", []),
    "Diffusion-KTO": ("configs/tiny_kto.py", []),
    "SPIN-Diffusion": ("configs/tiny_spin.py", []),
    "SSPO": ("configs/tiny.py", []),
    "SSPO, oracle SSR": ("configs/tiny.py", ["--ssr=oracle"]),  # flips by the judge: the upper bound of SSR
    "SSPO, ref = first": ("configs/tiny.py", ["--ref_policy=first"]),
    "SSPO, ref = last": ("configs/tiny.py", ["--ref_policy=last"]),
    "SSPO, SSR indicator": ("configs/tiny.py", ["--ssr=indicator"]),
    "SSPO, SSR off": ("configs/tiny.py", ["--ssr=off"]),
}
# --objectives: the other preference objectives of the literature (losses.py), same budget, pairs
OBJECTIVES = {
    "DMPO": ("configs/tiny_dmpo.py", []),
    "MaPO": ("configs/tiny_mapo.py", []),
    "SEE-DPO": ("configs/tiny_see_dpo.py", []),
    "DPO-C&M": ("configs/tiny_dpo_cm.py", []),
    "Diffusion-SDPO": ("configs/tiny_sdpo.py", []),
    "Inversion-DPO": ("configs/tiny_inversion_dpo.py", []),
}
ALL = {**RUNS, **OBJECTIVES}
# --video: the tiny video world, each method on configs/tiny_video.py's budget (SFT and SSPO read winners only)
VIDEO_RUNS = {
    "SFT": ("configs/tiny_video.py", ["--method=sft"]),
    "Diffusion-DPO": ("configs/tiny_video.py", ["--method=dpo"]),
    "SSPO": ("configs/tiny_video.py", []),
}
SLOW = ("SPIN-Diffusion", "SSPO", "Inversion-DPO")  # names starting with these sample or invert: scheduled first

# The tuning stage: each tuned method gets a grid of the same size over its own knobs (6 points: the learning rate for
# all, beta too for the preference methods; SFT, which has no beta, gets six learning rates). Every point is trained
# on the validation seed (one: a run of SSPO costs 15 min on one core of a 2-core machine) and judged on the seen
# prompts only; the table then runs each method at its best point on
# fresh seeds (--seeds) and reports seen and held-out prompts. A row without a grid runs at the chosen point of the
# row it follows: SSPO's ablations at SSPO's, the SFT controls at SFT's, the other objectives at Diffusion-DPO's
# learning rate (with their own beta: the scale of each objective's logit is its own).
TUNE_SEEDS = [100]
GRIDS = {
    "SFT": {"lr": [1e-5, 2e-5, 3e-5, 6e-5, 1e-4, 3e-4]},
    "Diffusion-DPO": {"lr": [3e-5, 1e-4, 3e-4], "beta": [100.0, 1000.0]},
    "Diffusion-KTO": {"lr": [3e-5, 1e-4, 3e-4], "beta": [20.0, 200.0]},  # no 1/2 in its logit, and unpaired
    "SPIN-Diffusion": {"lr": [3e-5, 1e-4, 3e-4], "beta": [100.0, 1000.0]},
    "SSPO": {"lr": [3e-5, 1e-4, 3e-4], "beta": [100.0, 1000.0]},
}
FOLLOWS = {"SFT, oracle": "SFT", "SFT, base data": "SFT", **{n: "SSPO" for n in RUNS if n.startswith("SSPO, ")},
           **{n: "Diffusion-DPO:lr" for n in OBJECTIVES}}
VIDEO_TUNE_SEEDS = [101]  # not 100: the video base's clip stage drew the fine-tuning stream with seed 100
VIDEO_GRIDS = {  # smaller: a video run costs 4-8x an image run; the learning rate alone, three points each
    "SFT": {"lr": [3e-5, 1e-4, 3e-4]},
    "Diffusion-DPO": {"lr": [3e-5, 1e-4, 3e-4]},
    "SSPO": {"lr": [3e-5, 1e-4, 3e-4]},
}


def grid_points(grid):
    """{key: values} -> [{key: value}], every combination."""
    return [dict(zip(grid, vs)) for vs in itertools.product(*grid.values())]


def point_tag(point):
    return "_".join(f"{k}{v:.0e}" if v < 1e-3 else f"{k}{v:g}" for k, v in point.items())


def point_args(point):
    return [f"--{k}={v!r}" for k, v in point.items()]


LOGGED = ("loss", "d_w", "d_l", "d_s", "pref_acc", "implicit_acc", "flip_rate", "tie_rate", "judge_s_ok", "ssr_agree")
EXTRA = []  # --set
EVAL = {}  # evaluate.py's protocol for the base and every run: --images_per_prompt, --dtype, --steps


def run_dir(name, seed, point=None, stage=""):
    slug = name.lower().replace(", ", "_").replace(" = ", "_").replace(" ", "_").replace("-", "").replace("&", "")
    return os.path.join(OUT, stage, "_".join([slug, *([point_tag(point)] if point else []), f"s{seed}"]))


def sh(cmd, log, env):
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed; see {log}")


def eval_args():
    return [f"--{k}={v}" for k, v in EVAL.items()]


def judged_as_asked(scores_path):
    protocol = json.load(open(scores_path))["protocol"]
    return all(protocol[k] == v for k, v in EVAL.items())


def train_and_eval(name, seed, env, point=None, stage=""):
    """-> wall seconds of training and of evaluation; skips what is already done. point: {key: value} overrides of
    the tuning grid, applied after the row's own."""
    d = run_dir(name, seed, point, stage)
    os.makedirs(d, exist_ok=True)
    timing_path, scores = os.path.join(d, "time.json"), os.path.join(d, "eval", "scores.json")
    if os.path.exists(scores) and os.path.exists(timing_path):
        timing = json.load(open(timing_path))
        if judged_as_asked(scores):
            return timing
        t1 = time.time()  # trained, but judged under another protocol: judge it again
        sh([sys.executable, "evaluate.py", d, *eval_args()], os.path.join(d, "run.log"), env)
        timing["eval_s"] = time.time() - t1
        json.dump(timing, open(timing_path, "w"))
        return timing
    config, overrides = (VIDEO_RUNS if W is video else ALL)[name]
    log = os.path.join(d, "run.log")
    t0 = time.time()
    resume = ["--init_from=resume"] if os.path.exists(os.path.join(d, "ckpt.pt")) else []
    sh([sys.executable, "train_sspo.py", config, f"--seed={seed}", f"--out_dir={d}", *overrides,
        *point_args(point or {}), *EXTRA, *resume], log, env)
    t1 = time.time()
    sh([sys.executable, "evaluate.py", d, *eval_args()], log, env)
    timing = {"train_s": t1 - t0, "eval_s": time.time() - t1}
    json.dump(timing, open(timing_path, "w"))
    print(f"  {name}{' at ' + point_tag(point) if point else ''}, seed {seed}: trained in {timing['train_s'] / 60:.1f} "
          f"min, evaluated in {timing['eval_s']:.0f} s", flush=True)
    return timing


def tune(names, grids, seeds, jobs, env):
    """The tuning stage: every point of each grid on the validation seeds -> ({name: chosen point}, markdown): the
    point with the best mean judge on seen prompts (held-out prompts are not looked at)."""
    todo = [(n, s, p) for n in names if n in grids for p in grid_points(grids[n]) for s in seeds]
    todo.sort(key=lambda j: not j[0].startswith(SLOW))
    print(f"tuning: {len(todo)} runs on validation seeds {seeds}", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda j: train_and_eval(j[0], j[1], env, j[2], "tune"), todo))
    chosen, lines = {}, []
    for n in names:
        if n not in grids:
            continue
        rows = []
        for p in grid_points(grids[n]):
            sc = [json.load(open(os.path.join(run_dir(n, s, p, "tune"), "eval", "scores.json"))) for s in seeds]
            rows.append((p, np.mean([x["judge_seen_run"] for x in sc]), np.mean([x["judge_heldout_run"] for x in sc])))
        best = max(rows, key=lambda r: r[1])[0]
        chosen[n] = best
        lines += [f"**{n}** (chosen: {point_tag(best)})", "", "| " + " | ".join(grids[n]) + " | judge, seen (chooses) | "
                  "judge, held-out (not used) |", "|" + "---|" * (len(grids[n]) + 2)]
        lines += [f"| {' | '.join(f'{v:g}' for v in p.values())} | {js:.3f}{' **chosen**' * (p == best)} | {jh:.3f} |"
                  for p, js, jh in rows] + [""]
    return chosen, "\n".join(lines)


def point_of(name, chosen):
    """The overrides a table row runs with: its own chosen point, or that of the row it follows."""
    if name in chosen:
        return chosen[name]
    follows, _, key = FOLLOWS.get(name, "").partition(":")
    if follows not in chosen:
        return None
    return {key: chosen[follows][key]} if key else dict(chosen[follows])


def win_rate(run, base):
    """Share of images (same prompt, same noise) the judge scores higher for the run than for the base; ties half."""
    d = np.array([r["judge"] for r in run["per_image"]]) - np.array([b["judge"] for b in base["per_image"]])
    return float(((d > 1e-6) + 0.5 * (np.abs(d) <= 1e-6)).mean())


def mean_std(xs):
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.3f}"


@torch.no_grad()
def samples_picture(names, seed, path, protocol, points, n=16):
    """One row per method (its run of `seed`): the first n//2 seen and all held-out prompts, one noise draw shared
    by every row, each tile labelled with its judge score. Clips (--video): 3 seen and 3 held-out prompts, a row of
    frames per method and prompt, and samples.gif."""
    if W is video:
        prompts = [W.prompt_of(c) for c in W.TRAIN_COMBOS[:3] + W.HELD_OUT[:3]]
    else:
        prompts = [W.prompt_of(c) for c in W.TRAIN_COMBOS[:n - len(W.HELD_OUT)] + W.HELD_OUT]
    rows, labels = [], []
    for d in [BASE] + [run_dir(name, seed, points[name]) for name in names]:
        m = model.load_model(d)
        m["unet"].eval()
        u = m["unet"].config
        shape = model.latent_shape(m, u.sample_size, 8 if W is video else 0)  # the video world's 8 frames
        noise = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(0))
        cond = model.encode_prompts(m, prompts)
        uncond = model.encode_prompts(m, [""])
        x = model.latents_to_images(m["vae"], diffusion.sample(model.net(m["unet"]), m["scheduler"], cond, uncond,
                                                               noise, protocol["steps"], protocol["guidance"]))
        rows.append(x)
        labels += [f"{W.judge(img, p)[0]:.2f}" for img, p in zip(x, prompts)]
    if W is video:
        names = ["base", *names]
        data.save_clip_strip(torch.cat(rows), path, [f"{names[i // len(prompts)]}: {prompts[i % len(prompts)]} "
                                                      f"{lab}" for i, lab in enumerate(labels)])
        data.save_gif(torch.cat(rows), path[:-4] + ".gif")
        return
    data.save_grid(torch.cat(rows), path, labels, cols=len(prompts), tile=48)
    grid = Image.open(path)  # method names down the left side
    img = Image.new("RGB", (grid.width + 130, grid.height), (40, 40, 40))
    img.paste(grid, (130, 0))
    for i, name in enumerate(["base"] + list(names)):
        ImageDraw.Draw(img).text((4, i * grid.height / len(rows) + 20), name, fill=(230, 230, 230))
    img.save(path)
    with open(path[:-4] + ".txt", "w") as f:
        f.write("rows: base, " + ", ".join(names) + "\ncolumns: " + "; ".join(prompts) + "\n")


def curves_picture(curves, path, key="judge_seen"):
    """judge against optimizer step, one line per method (mean over seeds), drawn with pillow."""
    W, H, pad = 820, 420, 50
    img = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(img)
    pts = [p for c in curves.values() for p in c]
    x_max = max(s for s, _ in pts)
    y_lo, y_hi = min(v for _, v in pts) - 0.02, max(v for _, v in pts) + 0.02
    X = lambda s: pad + (W - 5 * pad) * s / x_max
    Y = lambda v: H - pad - (H - 2 * pad) * (v - y_lo) / (y_hi - y_lo)
    dr.line([(pad, pad), (pad, H - pad), (X(x_max), H - pad)], fill="black")
    for v in np.linspace(y_lo, y_hi, 5):
        dr.text((4, Y(v) - 6), f"{v:.2f}", fill="black")
    for s in sorted({s for s, _ in pts}):  # the eval steps
        dr.text((X(s) - 8, H - pad + 6), f"{s:.0f}", fill="black")
    dr.text((W / 2 - 60, H - 18), "optimizer step", fill="black")
    dr.text((pad, 10), f"tiny world: {key.replace('_', ' on ')} prompts (mean over seeds)", fill="black")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#000000", "#aec7e8", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94"]
    for i, (name, c) in enumerate(curves.items()):
        col = colours[i % len(colours)]
        dr.line([(X(s), Y(v)) for s, v in c], fill=col, width=2)
        dr.line([(W - 2.4 * pad, pad + 14 * i + 6), (W - 2.1 * pad, pad + 14 * i + 6)], fill=col, width=2)  # legend
        dr.text((W - 2 * pad, pad + 14 * i), name, fill=col)
    img.save(path)


def main():
    global OUT, BASE, BASE_CONFIG, W
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", default=None, help=f"a subset of: {', '.join(ALL)}")
    p.add_argument("--objectives", action="store_true", help="add the other objectives' rows to the table: "
                   f"{', '.join(OBJECTIVES)} (about 30 min more for 3 seeds on 2 cores)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time; each gets 2 // jobs threads (at least 1)")
    p.add_argument("--out", default=OUT, help="where the runs and the table go")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--video", action="store_true", help="the tiny video world: base (configs/tiny_video_base.py), "
                   f"{', '.join(VIDEO_RUNS)} (configs/tiny_video.py); --out, --base default to out/video_table and "
                   "out/tiny_video_base")
    p.add_argument("--images_per_prompt", type=int, default=0, help="images (clips) judged per prompt, for the base "
                   "and every run: default 8 (clips: 4; evaluate.py's own default is 4)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the sampler's dtype when "
                   "judging (evaluate.py --dtype): bfloat16 samples twice as fast on a CPU with native bf16 (AMX), 30x "
                   "slower on one without (AVX2); on the base it gave the judge of float32 within 0.001")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps when judging the base and every run (evaluate.py "
                   "--steps), as the tiny configs sample: 5 judge the base alike but hide a degraded model's loss")
    p.add_argument("--base", default=BASE, help=f"the base every run starts from; only the default ({BASE}) is "
                   "trained here when missing, another must be a finished run folder")
    p.add_argument("--tune_seeds", type=int, nargs="*", default=None, help="the validation seeds of the tuning stage "
                   f"(default {TUNE_SEEDS}; video {VIDEO_TUNE_SEEDS}); none: no tuning, every row at its config's point")
    args = p.parse_args()
    default_base = p.get_default("base")
    if args.video:
        W, BASE_CONFIG, default_base = video, "configs/tiny_video_base.py", "out/tiny_video_base"
        args.out = "out/video_table" if args.out == p.get_default("out") else args.out
        args.base = default_base if args.base == p.get_default("base") else args.base
    OUT, BASE = args.out, args.base
    EVAL.update(images_per_prompt=args.images_per_prompt or (4 if args.video else 8), dtype=args.dtype,
                steps=args.steps)
    EXTRA[:] = ["--" + kv for kv in args.set] + ([f"--init_from={BASE}"] if BASE != default_base else [])
    if args.video and args.objectives:
        raise SystemExit("error: --objectives: the video table has the methods' rows only (--only to choose)")
    known = VIDEO_RUNS if args.video else ALL
    args.only = args.only or list(VIDEO_RUNS if args.video else RUNS) + list(OBJECTIVES) * args.objectives
    unknown = [n for n in args.only if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown run {unknown}; known: {', '.join(known)}")
    grids, tune_seeds = (VIDEO_GRIDS, VIDEO_TUNE_SEEDS) if args.video else (GRIDS, TUNE_SEEDS)
    tune_seeds = tune_seeds if args.tune_seeds is None else args.tune_seeds
    if set(tune_seeds) & set(args.seeds):
        raise SystemExit(f"error: the table's seeds {args.seeds} must be fresh: not the validation seeds {tune_seeds}")
    os.makedirs(OUT, exist_ok=True)
    t_start = time.time()
    env = dict(os.environ)
    if not os.path.exists(os.path.join(BASE, "ckpt.pt")):
        if BASE != default_base:
            raise SystemExit(f"error: --base {BASE}: no ckpt.pt there; train it first (python train_sspo.py "
                             f"{BASE_CONFIG} --out_dir={BASE} ...)")
        print(f"training the base: python train_sspo.py {BASE_CONFIG} (log: {OUT}/base.log)", flush=True)
        sh([sys.executable, "train_sspo.py", BASE_CONFIG], os.path.join(OUT, "base.log"), env)
    was = read_checkpoint(os.path.join(BASE, "ckpt.pt"), mmap=True)["config"]
    if data.stream_of(was) == 1 and was["seed"] in set(args.seeds) | set(tune_seeds):  # the base was itself a fine-tune
        raise SystemExit(f"error: seed {was['seed']} would replay the stream {BASE} was trained on: choose others")
    base_scores = os.path.join(BASE, "eval", "scores.json")
    if not os.path.exists(base_scores) or not judged_as_asked(base_scores):
        sh([sys.executable, "evaluate.py", BASE, *eval_args()], os.path.join(OUT, "base.log"), env)
    t_base = time.time() - t_start

    env["OMP_NUM_THREADS"] = str(max(1, 2 // args.jobs))
    chosen, tuning = {}, ""
    if tune_seeds:
        tuned = [n for n in known if n in grids and (n in args.only or any(
            FOLLOWS.get(o, "").partition(":")[0] == n for o in args.only))]
        chosen, tuning = tune(tuned, grids, tune_seeds, args.jobs, env)
        open(os.path.join(OUT, "tuning.md"), "w").write(tuning)
        print(f"\nthe tuning stage (mean over validation seeds {tune_seeds}):\n\n{tuning}", flush=True)
    points = {n: point_of(n, chosen) for n in args.only}
    jobs = sorted(((n, s) for n in args.only for s in args.seeds), key=lambda j: not j[0].startswith(SLOW))
    print(f"{len(jobs)} runs, {args.jobs} at a time, {env['OMP_NUM_THREADS']} thread(s) each", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        timings = dict(zip(jobs, pool.map(lambda j: train_and_eval(*j, env, points[j[0]]), jobs)))

    base = json.load(open(os.path.join(BASE, "eval", "scores.json")))
    data_row = base["breakdown"]["data"]  # the base distribution's images: what the base was trained to draw
    results = {"base": {"judge_seen": [base["judge_seen_run"]], "judge_heldout": [base["judge_heldout_run"]],
                        "correct": [base["breakdown"]["run"]["correct"]]},
               "data": {"judge": [data_row["judge"]], "correct": [data_row["correct"]]}}
    curves, logged = {}, {}
    for name in args.only:
        r = results[name] = {"judge_seen": [], "judge_heldout": [], "correct": [], "win_rate": [], "train_min": [],
                             "point": points[name]}
        per_step, per_update = {}, {}
        for s in args.seeds:
            d = run_dir(name, s, points[name])
            sc = json.load(open(os.path.join(d, "eval", "scores.json")))
            r["judge_seen"].append(sc["judge_seen_run"])
            r["judge_heldout"].append(sc["judge_heldout_run"])
            r["correct"].append(sc["breakdown"]["run"]["correct"])
            r["win_rate"].append(win_rate(sc, base))
            r["train_min"].append(timings[(name, s)]["train_s"] / 60)
            for line in open(os.path.join(d, "log.jsonl")):
                e = json.loads(line)
                if e["kind"] == "eval":
                    per_step.setdefault(e["step"], []).append(e["judge_seen"])
                for k in LOGGED if e["kind"] == "train" else ():
                    if k in e:
                        per_update.setdefault(k, []).append(e[k])
        logged[name] = {k: float(np.mean(v)) for k, v in per_update.items()}
        curves[name] = [(k, float(np.mean(v))) for k, v in sorted(per_step.items())]
    json.dump({"seeds": args.seeds, "tune_seeds": tune_seeds, "results": results, "logged": logged,
               "protocol": base["protocol"]}, open(os.path.join(OUT, "results.json"), "w"), indent=1)

    lines = ["| method | point | judge, seen prompts | judge, held-out prompts | correct samples | win rate vs base | "
             "train min / run |", "|---|---|---|---|---|---|---|",
             f"| data: the base distribution's {'clips' if W is video else 'images'} | | {data_row['judge']:.3f} (all "
             f"{len(W.ALL_COMBOS)}) | | {data_row['correct']:.3f} | | |",
             f"| base | | {base['judge_seen_run']:.3f} | {base['judge_heldout_run']:.3f} | "
             f"{base['breakdown']['run']['correct']:.3f} | - | - |"]
    for name in args.only:
        r = results[name]
        tag = point_tag(r["point"]).replace("_", ", ") if r["point"] else "config's"
        lines.append(f"| {name} | {tag} | {mean_std(r['judge_seen'])} | {mean_std(r['judge_heldout'])} | "
                     f"{mean_std(r['correct'])} | {mean_std(r['win_rate'])} | {np.mean(r['train_min']):.1f} |")
    keys = [k for k in LOGGED if any(k in v for v in logged.values())]
    lines += ["", "What the logs say (mean over every logged update and seed; d_w, d_l: policy minus reference error on "
              "the winners and on the losers or self-samples; pref_acc: d_w < d_l; flip_rate, tie_rate: SSR's s = -1, "
              "s = 0; judge_s_ok: self-samples the judge finds at least as good as their winner; ssr_agree: SSR's "
              "choice is the judge's):", "", "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {n} | " + " | ".join(f"{logged[n][k]:.4g}" if k in logged[n] else "" for k in keys) + " |"
              for n in args.only if logged[n]]
    total = (time.time() - t_start) / 60
    lines.append(f"\nmean ± std over seeds {args.seeds}; judge of {base['protocol']['images_per_prompt']} "
                 f"{'clips' if W is video else 'images'} per "
                 f"prompt ({base['protocol']['steps']} DDIM steps, guidance {base['protocol']['guidance']}, "
                 f"{base['protocol']['dtype']}, seed "
                 f"{base['protocol']['seed']}); base trained in this call: {t_base / 60:.1f} min; this call took "
                 f"{total:.1f} min (runs already done are not redone)")
    table = "\n".join(lines) + (f"\n\nThe tuning stage (mean over validation seeds {tune_seeds}):\n\n{tuning}" if tuning
                                  else "")
    print("\n" + table)
    open(os.path.join(OUT, "table.md"), "w").write(table + "\n")
    samples_picture(args.only, args.seeds[0], os.path.join(OUT, "samples.png"), base["protocol"], points)
    curves_picture(curves, os.path.join(OUT, "curves.png"))
    print(f"wrote {OUT}/table.md, results.json, samples.png, curves.png")


if __name__ == "__main__":
    main()
