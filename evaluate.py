"""
Evaluate a run directory: generate images for a prompt set under a stated protocol and score them -- the tiny world's
judge on its seen and held-out prompts, or the paper's metrics (PickScore, HPSv2, LAION aesthetic, CLIP score,
ImageReward: scorers.py) -- and, with --base, the win rate of the run against another model on the same prompts and
the same noise.

    python evaluate.py out/tiny_sspo --base out/tiny_base
    python evaluate.py out/animatediff_sspo --base out/animatediff_base --references /data/chronomagic/test \
        --weights fid=/models/inception-2015-12-05.pt fvd=/models/i3d_torchscript.pt
    python evaluate.py out/sd15_sspo --base stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --prompts pickapic_validation_unique.parquet --dtype float16 \
        --weights aesthetic=/models/sac+logos+ava1-l14-linearMSE.pth
    torchrun --nproc_per_node=8 evaluate.py out/sd15_sspo --prompts PartiPrompts.tsv    # prompts sharded over ranks

Protocols: 'paper' (SSPO.md 7: guidance 7.5, 50 steps, one image per prompt; the default for Stable Diffusion runs)
and 'run' (the run's own sample_steps and guidance, 4 images per prompt; the default for the tiny world). Both draw
the noise from one CPU generator seeded once. --steps, --guidance, --seed and --images_per_prompt override either.
The architecture comes from the run directory. Writes RUN_DIR/eval/ (or --out) scores.json (per image and means,
with the protocol and the models' identity), grid.png, and with --base side_by_side.png (base left, run right, same
noise); a second evaluation into the same folder replaces the first. A video run with --references DIR (a clip
folder: metadata.jsonl with file_name and text) samples one clip per reference prompt and scores it against its
reference (PSNR, SSIM) and the set against the references' (FID over frames, FVD over clips: scorers.detector).
"""
import argparse
import csv
import glob
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import config
import data
import diffusion
import model
import scorers
from checkpoint import read_checkpoint
from ddp import print0, setup, teardown
from tiny import video, world

PAPER = {"steps": 50, "guidance": 7.5, "images_per_prompt": 1}  # SSPO.md 7 (the paper's pipeline: PNDM; ours: DDIM)
PAPER_METRICS = "pickscore,hpsv2,aesthetic,clip,imagereward"
MAX_TILES = 64  # images in grid.png / pairs in side_by_side.png: the first image of the first 64 prompts


def load_run(run_dir, device="cpu", dtype=torch.float32):
    """-> (model parts, the run's config, its step). The run directory is an SD-layout folder; ckpt.pt holds the
    config (memory-mapped: the optimizer state in it is never read)."""
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} not found: not a run directory of train_sspo.py")
    ckpt = read_checkpoint(ckpt_path, mmap=True)
    return load_model(run_dir, device, dtype, ckpt["config"].get("t5_max_length", 0)), ckpt["config"], int(ckpt["step"])


def load_model(path, device="cpu", dtype=torch.float32, t5_max_length=0):
    """An SD-layout folder or hub id (a run directory is one), its UNet cast to `dtype` for sampling; a flow model's
    prompts take t5_max_length T5 tokens (0: its pipeline's), the run's own."""
    try:
        m = model.load_model(path, device, frozen_dtype=dtype, t5_max_length=t5_max_length)
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
        raise SystemExit(f"error: {e}")
    m["unet"].to(dtype).eval()
    return m


def unet_sha256(path):
    """First 16 hex digits of the sha256 of the UNet weights a local model loads (all shards in order; not variants
    such as .fp16.safetensors, which from_pretrained does not load by default), and of a LoRA run's adapter after
    them (model.load_model fuses it): which weights were scored."""
    for ext in ("safetensors", "bin"):
        folder = "transformer" if os.path.isdir(os.path.join(path, "transformer")) else "unet"
        files = [f for f in sorted(glob.glob(os.path.join(path, folder, "*." + ext))) if os.path.basename(f).count(".") == 1]
        if files:
            break
    else:
        return None  # a hub id
    files += glob.glob(os.path.join(path, model.LORA_DIR, model.LORA_FILE))
    h = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------------------------------------------
# prompt sets

def read_prompt_file(path):
    """One prompt set -> list of str: Pick-a-Pic parquet (column `caption`, duplicates dropped, as validation_unique),
    PartiPrompts tsv (column `Prompt`), an HPSv2 benchmark json (a list of strings), or text (one prompt per line)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: prompt file {path} not found")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".parquet":
            prompts = data.read_prompts(path)
        elif ext == ".tsv":
            with open(path, newline="", encoding="utf-8-sig") as f:  # plain tabs: a prompt may start with a quote
                rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                if "Prompt" not in (rows.fieldnames or []):
                    raise ValueError(f"{path}: no column 'Prompt' (PartiPrompts tsv); has: {rows.fieldnames}")
                prompts = [r["Prompt"] for r in rows]
        elif ext == ".json":
            with open(path, encoding="utf-8-sig") as f:
                prompts = json.load(f)
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"{path}: expected a JSON list of prompt strings (HPSv2 benchmark), got "
                                 f"{type(prompts).__name__}" + (" with other items" if isinstance(prompts, list) else ""))
        elif ext == ".txt":
            with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first prompt
                prompts = [line.strip() for line in f if line.strip()]
        else:
            raise ValueError(f"{path}: unknown prompt file type {ext!r} (.parquet, .tsv, .json or .txt)")
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}: not valid JSON ({e})")
    except UnicodeDecodeError:
        raise SystemExit(f"error: {path}: not UTF-8 text")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if not prompts or not all(p.strip() for p in prompts):
        raise SystemExit(f"error: {path}: " + ("no prompts" if not prompts else "an empty prompt"))
    return prompts


def prompt_groups(paths, cfg):
    """-> {group: prompts}. A tiny world's default: its seen and held-out prompts (images 40 + 8, clips 60 + 12).
    One file: group 'all'; several (e.g. HPSv2's four style files): one group per file, named by its stem."""
    if not paths:
        W = data.tiny_world(cfg["dataset"])
        if W is None:
            raise SystemExit("error: --prompts is required for a run not on the tiny world (images or clips) "
                             "(a Pick-a-Pic parquet, PartiPrompts tsv, HPSv2 json, or text file)")
        return {"seen": [W.prompt_of(c) for c in W.TRAIN_COMBOS], "heldout": [W.prompt_of(c) for c in W.HELD_OUT]}
    if len(paths) == 1:
        return {"all": read_prompt_file(paths[0])}
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: --prompts: two files share a name ({', '.join(paths)}); a group is named by its file")
    return {n: read_prompt_file(p) for n, p in zip(names, paths)}


# -----------------------------------------------------------------------------------------------------------------
# sampling and scoring

def draw_noise(sizes, shape, seed):
    """The paper's protocol: one generator seeded once, reused across all prompts in order, so image i's noise is the
    i-th draw (what a pipeline call per prompt with a shared generator does). One such generator per prompt set of
    `sizes` images (a file: it scores the same alone or beside others). CPU generators, drawn whole on every rank:
    the noise does not depend on the device, the batch size or the number of processes."""
    out = []
    for n in sizes:
        g = torch.Generator().manual_seed(seed)
        out += [torch.randn((1, *shape), generator=g) for _ in range(n)]
    return torch.cat(out)


@torch.no_grad()
def generate(m, prompts, noise, protocol, batch_size, desc):
    """-> uint8 (N, H, W, 3) images ((N, F, H, W, 3) clips): DDIM with classifier-free guidance
    (diffusion.sample: DDIM, or the flow Euler sampler), eta 0."""
    device, out = m["unet"].device, []
    resolution = noise.shape[-1] * model.vae_factor(m)  # SDXL's time ids: the image size sampled
    uncond = model.encode_prompts(m, [""], resolution)
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=dist.is_initialized() and dist.get_rank() > 0):
        cond = model.encode_prompts(m, prompts[i:i + batch_size], resolution)
        x = diffusion.sample(model.net(m["unet"]), m["scheduler"], cond, uncond, noise[i:i + batch_size].to(device),
                             protocol["steps"], protocol["guidance"])
        out.append((video.clip_to_uint8 if x.dim() == 5 else world.to_uint8)(model.latents_to_images(m["vae"], x)))
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def reference_clips(root, resolution, cfg):
    """--references: (its texts, its clips as uint8 (N, F, H, W, 3)) at the sampled resolution and the run's frames
    and stride, centre-cropped like the training data, never flipped. A clip that cannot be read stops here."""
    try:
        ds = data.ClipFolder(root, resolution, cfg["frames"], cfg["frame_stride"], random_flip=False, losers=False)
        with tqdm(range(len(ds)), desc="reading references") as bar:  # closed before an error's line
            items = [ds[i] for i in bar]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --references: {e}")
    return [it["prompt"] for it in items], np.stack([video.clip_to_uint8(it["image_w"]) for it in items])


def tiny_judge(images, prompts, W=world):
    """A tiny world's judge as a metric, in [0, 1] (W: world for images, video for clips)."""
    return torch.tensor([W.judge(np.asarray(im), q)[0] for im, q in zip(images, prompts)])


def tiny_details(images, prompts, W=world):
    """Per image: the judge's parts, the kind of sample (W.kind_of), and for images where the shape landed."""
    out = []
    for im, q in zip(images, prompts):
        parts = W.judge(np.asarray(im), q)[1]
        out.append({"parts": parts, "kind": W.kind_of(parts)})
        if W is world:
            out[-1].update(centroid=world.foreground_centroid(im), position=world.parse_prompt(q)[2])
        else:
            out[-1].update(motion=W.parse_prompt(q)[2])
    return out


def tiny_breakdown(details, W=world):
    """What a set of tiny-world images (clips) gets wrong: the mean of each judge part, the share of each kind of
    sample, and the mean centroid (x, y) of the shapes per position word (clips: their mean displacement (x, y) and
    change of log area per motion word; None if all empty)."""
    out = {p: float(np.mean([d["parts"][p] for d in details])) for p in W.PARTS}
    out.update({k: float(np.mean([d["kind"] == k for d in details])) for k in W.KINDS})
    for w in world.POSITIONS if W is world else ():
        c = [d["centroid"] for d in details if d["position"] == w and d["centroid"] is not None]
        out[f"at_{w}"] = [round(float(v), 3) for v in np.mean(c, 0)] if c else None
    for w in video.MOTIONS if W is video else ():
        c = [[d["parts"][p] for p in ("net_x", "net_y", "grow")] for d in details
             if d["motion"] == w and d["kind"] != "empty"]
        out[f"moves_{w}"] = [round(float(v), 3) for v in np.mean(c, 0)] if c else None
    return out


def tiny_data_images(prompts, cfg, seed):
    """The training data's images (clips) for these prompts: one draw of the base distribution each (the config's
    p_correct and flaws), so the data's row of the breakdown has the same prompts as the models'."""
    base = data.make_dataset({**cfg, "tiny_mode": "base"})
    rng = np.random.default_rng([seed, 7])
    return np.stack([base.draw(data.tiny_world(cfg["dataset"]).parse_prompt(q), rng) for q in prompts])


def score_all(fn, images, prompts, batch_size):
    """(N,) float64 scores of uint8 images (PIL for the scorers) or clips (arrays), in batches."""
    return in_batches(fn, batch_size, [x if x.ndim == 4 else Image.fromarray(x) for x in images], prompts)


def in_batches(fn, batch_size, *arrays):
    """fn over the arrays' rows, batch_size at a time (clips at full size do not fit memory at once) -> a float64
    array of the rows' results (scores, or features) concatenated."""
    out = [fn(*(a[i:i + batch_size] for a in arrays)) for i in range(0, len(arrays[0]), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def gather(obj):
    """Every rank's obj, in rank order (a list of one without torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def thumbs(images, side=128):
    """uint8 (N, H, W, 3) -> (N, 3, h, h) floats in [-1, 1] for data.save_grid, large images shrunk to `side`;
    clips (N, F, H, W, 3) -> (N, 3, F, H, W) for video.save_clip_strip."""
    if images.ndim == 5:
        return torch.stack([video.clip_to_tensor(x) for x in images])
    if len(images) and images.shape[1] > side:
        images = np.stack([np.asarray(Image.fromarray(x).resize((side, side), Image.BICUBIC)) for x in images])
    return torch.stack([world.to_tensor(x) for x in images])


# -----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--base", default="", help="a run directory, SD-layout folder or hub id to compare against")
    p.add_argument("--prompts", nargs="*", default=[], help=".parquet (caption), .tsv (Prompt), .json (list), .txt")
    p.add_argument("--references", default="", help="clips: a clip folder (metadata.jsonl) to compare against")
    p.add_argument("--metrics", default="", help=f"comma-separated: judge,{PAPER_METRICS} (default: judge for the "
                   f"tiny world, else all but judge); clips with --references: {','.join(scorers.REFERENCE_METRICS)}")
    p.add_argument("--weights", nargs="*", default=[], help="KEY=PATH_OR_HUB_ID overrides of scorers.WEIGHTS")
    p.add_argument("--protocol", default="", choices=["", "paper", "run"], help="default: 'run' for the tiny world")
    p.add_argument("--images_per_prompt", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=16, help="images per sampler and scorer call, per process")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="UNet, VAE, text")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="", help="folder of the results (default RUN_DIR/eval; another keeps an earlier one)")
    args = p.parse_args(argv)
    for k in ("images_per_prompt", "batch_size", "steps"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise SystemExit(f"error: --{k} must be >= 1, got {getattr(args, k)}")
    if args.guidance is not None and args.guidance < 0:
        raise SystemExit(f"error: --guidance must be >= 0 (1.0: no guidance), got {args.guidance}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    weights = dict(scorers.WEIGHTS)
    for kv in args.weights:
        k, _, v = kv.partition("=")
        if k not in weights or not v:
            raise SystemExit(f"error: --weights {kv!r}: expected KEY=PATH with KEY one of {', '.join(weights)}")
        weights[k] = v
    metrics = [s for s in args.metrics.split(",") if s]
    for s in metrics:
        if s != "judge" and s not in scorers.SCORERS and s not in scorers.REFERENCE_METRICS:
            raise SystemExit(f"error: unknown metric {s!r} (judge, {', '.join(scorers.SCORERS)}, "
                             f"{', '.join(scorers.REFERENCE_METRICS)})")

    rank, world_size, device = setup({"device": args.device, "ddp_timeout": config.defaults()["ddp_timeout"]})
    try:
        evaluate(args, weights, metrics, rank, world_size, device)
    finally:
        teardown()


def evaluate(args, weights, metrics, rank, world_size, device):
    """Protocol and prompts, scorers, noise; then each rank samples and scores its shard, and rank 0 writes."""
    dtype = getattr(torch, args.dtype)
    m, cfg, step = load_run(args.run_dir, device, dtype)
    W = data.tiny_world(cfg["dataset"])  # world (images), video (clips) or None (real data)
    tiny = W is not None
    name = args.protocol or ("run" if tiny or model.is_flow(m) else "paper")  # the paper's is SD1.5's DDIM
    defaults = PAPER if name == "paper" else {"steps": cfg["sample_steps"], "guidance": cfg["guidance"],
                                              "images_per_prompt": 4}
    ipp = defaults["images_per_prompt"] if args.images_per_prompt is None else args.images_per_prompt
    # the image size: the run's own under 'run' (it may train at another than its init model's), else the
    # pipeline's default, the UNet's sample_size
    f = model.vae_factor(m)
    resolution = cfg["resolution"] if name == "run" else getattr(m["unet"].config, "sample_size", 128) * f
    shape = model.latent_shape(m, resolution, cfg.get("frames", 0))
    if args.references and (args.prompts or len(shape) != 4):
        raise SystemExit("error: --references brings its own prompts: drop --prompts" if args.prompts else
                         f"error: --references compares clips; {args.run_dir} is an image model")
    metrics = metrics or (list(scorers.REFERENCE_METRICS) if args.references else ["judge"] if tiny else PAPER_METRICS.split(","))
    if len(shape) == 4 and set(metrics) - {"judge", *scorers.REFERENCE_METRICS}:
        raise SystemExit(f"error: clips are scored by the tiny video world's judge or against --references "
                         f"({', '.join(scorers.REFERENCE_METRICS)}), not by {', '.join(metrics)}")
    if not args.references and set(metrics) & set(scorers.REFERENCE_METRICS):
        raise SystemExit(f"error: {', '.join(set(metrics) & set(scorers.REFERENCE_METRICS))}: needs --references")
    if not set(metrics) - {"fid", "fvd"}:
        raise SystemExit("error: --metrics: FID and FVD score a set; add psnr or ssim, a score per clip (the win rate "
                         "and the pictures' labels)")
    refs = reference_clips(args.references, resolution, cfg) if args.references else None
    groups = {"all": refs[0]} if refs else prompt_groups(args.prompts, cfg)
    protocol = {"sampler": "DDIM, eta 0", "steps": defaults["steps"] if args.steps is None else args.steps,
                "guidance": defaults["guidance"] if args.guidance is None else args.guidance, "seed": args.seed,
                "generator": "one CPU generator per prompt file, seeded once, reused across its prompts in order",
                "images_per_prompt": ipp, "name": name, "dtype": args.dtype,
                "prompts": ", ".join(args.prompts) or args.references or "the tiny world's seen + held-out prompts",
                "n_prompts": sum(len(v) for v in groups.values()), "resolution": resolution,
                # ddp.setup allows TF32 on CUDA: float32 matmuls and convolutions (the scorers', and the
                # UNet's with --dtype=float32) run in TF32 there
                "tf32": device.type == "cuda"}
    try:
        diffusion.check_sampler_steps(m["scheduler"], protocol["steps"], "--steps")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    prompts = [q for qs in groups.values() for q in qs for _ in range(ipp)]
    group_of = [g for g, qs in groups.items() for _ in qs for _ in range(ipp)]
    if "judge" in metrics:
        bad = [q for q in prompts if not _tiny_prompt(q, W or world)]
        if bad:
            raise SystemExit(f"error: the judge scores tiny-world prompts only, not {bad[0]!r}")

    # scorers first: a scorer whose weights are found but broken stops the run before hours of sampling
    scorer, skipped = {}, {}
    for s in metrics:
        try:
            scorer[s] = ((lambda x, q: tiny_judge(x, q, W or world)) if s == "judge" else
                         getattr(scorers, s) if s in ("psnr", "ssim") else
                         scorers.detector(s, weights, device) if s in ("fid", "fvd") else scorers.load(s, weights, device))
        except (OSError, ValueError) as e:  # found, but not what the scorer needs
            raise SystemExit(f"error: {s} scorer: {str(e).strip().splitlines()[0]}")
        if isinstance(scorer[s], scorers.Skipped):
            skipped[s] = scorer.pop(s)._asdict()
    print0("protocol:", protocol)
    for s, why in skipped.items():
        print0(f"skipped {s}: {why['reason']} (looked for {why['path']})")
    if not scorer:
        raise SystemExit("error: every metric was skipped (see above): nothing would be scored")

    models = {"run": m}
    if args.base:
        base_run = os.path.isfile(os.path.join(args.base, "ckpt.pt"))
        models["base"] = load_run(args.base, device, dtype)[0] if base_run else load_model(args.base, device, dtype)
        try:  # its schedule may differ from the run's (another steps_offset): before any sampling
            diffusion.check_sampler_steps(models["base"]["scheduler"], protocol["steps"], "--steps")
        except ValueError as e:
            raise SystemExit(f"error: {args.base}: {e}")
    if args.base:  # the same noise for both: the same latent shape (under 'paper', the same default size too)
        size = lambda mm: getattr(mm["unet"].config, "sample_size", None)
        other = model.latent_shape(models["base"], resolution, cfg.get("frames", 0))
        if other != shape or (name == "paper" and size(models["base"]) != size(m)):
            raise SystemExit(f"error: {args.run_dir} samples {shape} latents, {args.base} {other} (default size "
                             f"{size(models['base'])}): no common noise")
    # a generator per prompt file; the tiny world's seen and held-out prompts are one set
    noise = draw_noise([len(qs) * ipp for qs in groups.values()] if args.prompts else [len(prompts)], shape, args.seed)
    lo, hi = rank * len(prompts) // world_size, (rank + 1) * len(prompts) // world_size  # this rank's shard of the images

    scores, shown, details = {}, {}, {}
    if refs:  # each clip against its prompt's reference; FID and FVD: features, the distance on rank 0
        ref_shard = refs[1][[i // ipp for i in range(lo, hi)]]
        scores["reference"] = {s: in_batches(fn, args.batch_size, refs[1][rank::world_size])
                               for s, fn in scorer.items() if s in ("fid", "fvd")}
    for k, mm in models.items():
        images = generate(mm, prompts[lo:hi], noise[lo:hi], protocol, args.batch_size, f"sampling {k}")
        scores[k] = {s: in_batches(fn, args.batch_size, images, ref_shard) if s in ("psnr", "ssim") else
                     in_batches(fn, args.batch_size, images) if s in ("fid", "fvd") else
                     score_all(fn, images, prompts[lo:hi], args.batch_size) for s, fn in scorer.items()}
        shown[k] = {i: images[i - lo] for i in range(lo, hi) if i % ipp == 0 and i // ipp < MAX_TILES}
        if "judge" in scorer:
            details[k] = tiny_details(images, prompts[lo:hi], W or world)
    parts = gather((scores, shown, details))
    if rank > 0:
        return
    scores = {k: {s: np.concatenate([sc[k][s] for sc, _, _ in parts if len(sc[k][s])] or [np.zeros(0)])
                  for s in scores[k]} for k in scores}
    reference = scores.pop("reference", {})
    distances = {f"{s}_{k}": scorers.frechet_distance(scores[k].pop(s), reference[s]) for s in reference for k in models}
    shown = {k: dict(kv for _, sh, _ in parts for kv in sh[k].items()) for k in models}
    breakdown = {}
    if "judge" in scorer:  # the run, the base and the training data, side by side
        W = W or world
        breakdown = {k: {"judge": float(scores[k]["judge"].mean()), **tiny_breakdown([d for _, _, de in parts
                                                                                       for d in de[k]], W)} for k in models}
        asked = [q for q in dict.fromkeys(prompts) for _ in range(8)]  # 8 draws a prompt, whatever ipp
        images = tiny_data_images(asked, cfg, args.seed)
        breakdown["data"] = {"judge": float(tiny_judge(images, asked, W).mean()),
                             **tiny_breakdown(tiny_details(images, asked, W), W)}
    write_results(args, cfg, step, protocol, weights, metrics, skipped, groups, prompts, group_of, scores, shown,
                  breakdown, W or world, distances)


def _tiny_prompt(q, W):
    try:
        return bool(W.parse_prompt(q))
    except ValueError:
        return False


def write_results(args, cfg, step, protocol, weights, metrics, skipped, groups, prompts, group_of, scores, shown,
                  breakdown, W=world, distances=None):
    """scores.json, grid.png, side_by_side.png (clips: also grid.gif, side_by_side.gif), and the markdown tables on
    the console. distances: FID and FVD, one number a model ({'fid_run': ...})."""
    done = [s for s in metrics if s not in skipped and s not in ("fid", "fvd")]
    group_of = np.array(group_of)
    result = {"run_dir": os.path.abspath(args.run_dir), "step": step, "method": cfg["method"],
              "init_from": cfg["init_from"], "unet_sha256": unet_sha256(args.run_dir), "protocol": protocol,
              "scorers": {s: {k: v for k, v in weights.items() if k.split("_")[0] == s} for s in metrics if s != "judge"},
              "skipped": skipped,
              "per_image": [{"prompt": q, "group": g, **{s: float(scores["run"][s][i]) for s in done},
                             **({"base": {s: float(scores["base"][s][i]) for s in done}} if args.base else {})}
                            for i, (q, g) in enumerate(zip(prompts, group_of))]}
    if args.base:
        result["base_dir"] = os.path.abspath(args.base) if os.path.exists(args.base) else args.base
        result["base_unet_sha256"] = unet_sha256(args.base)
    for k in scores:  # means per metric, prompt group and model: judge_seen_run, pickscore_all_base, ...
        for s in done:
            for g in groups:
                result[f"{s}_{g}_{k}"] = float(scores[k][s][group_of == g].mean())
    if args.base:  # per image, same prompt and noise; a tie counts half
        result["win_rates"] = {}
        for s in done:
            d = scores["run"][s] - scores["base"][s]
            result["win_rates"][s] = float(((d > 1e-6) + 0.5 * (np.abs(d) <= 1e-6)).mean())
        result["win_rate_vs_base"] = result["win_rates"][done[0]]
    if breakdown:
        result["breakdown"] = breakdown
    result.update(distances or {})
    out = args.out or os.path.join(args.run_dir, "eval")
    os.makedirs(out, exist_ok=True)
    if not args.base and os.path.exists(os.path.join(out, "side_by_side.png")):
        os.remove(os.path.join(out, "side_by_side.png"))  # an earlier comparison's: these scores do not describe it
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump(result, f, indent=1)
    idx = sorted(shown["run"])
    labels = [f"{scores['run'][done[0]][i]:.2f}" for i in idx]
    tiles = {k: thumbs(np.stack([shown[k][i] for i in idx])) for k in shown}
    if tiles["run"].dim() == 5:  # clips: a row of frames each, and GIFs (base and run alternate side by side)
        data.save_clip_strip(tiles["run"], os.path.join(out, "grid.png"), [f"{prompts[i]}: {lab}" for i, lab in
                                                                            zip(idx, labels)])
        data.save_gif(tiles["run"][:16], os.path.join(out, "grid.gif"))
        if args.base:
            pairs = torch.stack([tiles[k] for k in ("base", "run")], 1).flatten(0, 1)  # base, run, base, run, ...
            data.save_clip_strip(pairs, os.path.join(out, "side_by_side.png"),
                                  [f"{k} {scores[k][done[0]][i]:.2f}: {prompts[i]}" for i in idx for k in ("base", "run")])
            data.save_gif(pairs[:16], os.path.join(out, "side_by_side.gif"))
    else:
        data.save_grid(tiles["run"], os.path.join(out, "grid.png"), labels)
    if args.base and tiles["run"].dim() == 4:  # a row per prompt: base | run on the same noise, each with its score
        data.save_comparison({k: tiles[k] for k in ("base", "run")},
                             [prompts[i] for i in idx], {k: [f"{done[0]} {scores[k][done[0]][i]:.2f}" for i in idx]
                                                         for k in ("base", "run")},
                             os.path.join(out, "side_by_side.png"), blocks=3 if len(idx) > 24 else 1)

    cols = [(s, g) for s in done for g in groups]
    head = [s if g == "all" else f"{s}, {'held-out' if g == 'heldout' else g} prompts" for s, g in cols]
    print0("\n| model | run dir | " + " | ".join(head) + " |\n|---|---|" + "---|" * len(cols))
    for k, d in [("run", args.run_dir)] + ([("base", args.base)] if args.base else []):
        print0(f"| {k} | {d} | " + " | ".join(f"{result[f'{s}_{g}_{k}']:.3f}" for s, g in cols) + " |")
    if breakdown:
        print0(breakdown_table(breakdown, W))
    for s in ("fid", "fvd"):
        for k in (f"{s}_{k}" in (distances or {})) * list(scores):
            print0(f"{s.upper()} of {k} against {args.references} ({len(prompts)} clips): {distances[f'{s}_{k}']:.2f}")
    if args.base:
        print0(f"\nwin rate of {args.run_dir} against {args.base} ({len(prompts)} images, same noise): " +
               ", ".join(f"{s} {r:.3f}" for s, r in result["win_rates"].items()))
    print0(f"wrote {out}/scores.json, grid.png" + (", side_by_side.png" if args.base else ""))


def breakdown_table(breakdown, W=world):
    """Markdown: the judge, its parts and the kinds of samples per model ('data': the base distribution's images for
    the same prompts), then where the shapes land per position word (clips: how they move per motion word)."""
    parts, kinds = ("judge", *W.PARTS), W.KINDS
    lines = ["\n| model | " + " | ".join(parts) + " | " + " | ".join(kinds) + " |", "|---|" + "---|" * (len(parts) + len(kinds))]
    for k, b in breakdown.items():
        lines.append(f"| {k} | " + " | ".join(f"{b[p]:.2f}" for p in parts) + " | "
                     + " | ".join(f"{b[c]:.0%}" for c in kinds) + " |")
    if W is video:
        lines += ["\nhow the shapes move, per motion word: the fitted displacement over the clip (x, y), fractions of "
                  "the side, y down, and the change of log area (the data's row: what the words ask)",
                  "\n| model | " + " | ".join(video.MOTIONS) + " |", "|---|" + "---|" * len(video.MOTIONS)]
        cell = "({:+.2f}, {:+.2f}) {:+.2f}".format
        for k, b in breakdown.items():
            lines.append(f"| {k} | " + " | ".join("-" if b[f"moves_{w}"] is None else cell(*b[f"moves_{w}"])
                                                 for w in video.MOTIONS) + " |")
    if W is not world:
        return "\n".join(lines)
    lines += ["\nmean (x, y) of the shapes, per position word (left (0.28, 0.5), right (0.72, 0.5), top (0.5, 0.28), "
              "bottom (0.5, 0.72)):", "\n| model | " + " | ".join(world.POSITIONS) + " |", "|---|" + "---|" * len(world.POSITIONS)]
    for k, b in breakdown.items():
        lines.append(f"| {k} | " + " | ".join("-" if b[f"at_{w}"] is None else "({:.2f}, {:.2f})".format(*b[f"at_{w}"])
                                             for w in world.POSITIONS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
