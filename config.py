"""
The config: the defaults (the literals at the top of train_sspo.py, one per line with what each does), then config
files (Python, executed: configs/*.py), then --key=value overrides, as nanoGPT's configurator does. Strict: an
unknown key, another type than the default's, or a value that would train something else than asked is a one-line
error before any work starts. Here: names, types, choices and the values any run can check alone; what a dataset or
the model asks of the config, data.check_config and model.check_config say (train_sspo.main calls both first).
evaluate.py, latents.py and dev/bench.py read training configs through here too.
"""
import ast
import difflib
import os
import sys

import losses

DEFAULTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_sspo.py")


def defaults():
    """{key: value} of train_sspo.py's defaults block: its top-level assignments of a literal to a lowercase name,
    read with ast (no script imports another: the block stays where a reader of the training script sees it)."""
    out = {}
    for node in ast.parse(open(DEFAULTS_FILE).read()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.islower() and not name.startswith("_"):
                try:
                    out[name] = ast.literal_eval(node.value)
                except ValueError:  # not a literal: not a default
                    pass
    return out


CHOICES = {"dataset": ("tiny", "pickapic", "imagefolder", "tiny_video", "clipfolder"), "tiny_mode": ("base", "pairs"),
           "trained_modules": ("all", "motion"),
           "method": tuple(losses.OBJECTIVES),
           "noising": ("forward", "ddim_inversion"), "ssr": ("sign", "indicator", "off", "oracle"), "ref_policy": ("uniform", "first", "last"),
           "ref_redraw": ("stretch", "step"), "pool_storage": ("memory", "disk"), "ref_dtype": ("float32", "bfloat16"),
           "lr_schedule": ("constant", "cosine"),
           "bad_data": ("skip", "stop"), "nonfinite": ("skip", "stop"),
           "noise_schedule": ("scaled_linear", "squaredcos_cap_v2", "linear"),
           "prediction_type": ("epsilon", "v_prediction"), "timestep_density": ("uniform", "logit_normal"),
           "compile_unet": ("off", "whole", "regional"), "device": ("auto", "cpu", "cuda"), "parallel": ("ddp", "fsdp"),
           "mixed_precision": ("bf16", "bf16_cpu", "no")}


def bf16_autocast(cfg, device):
    """Whether the training step runs under bf16 autocast: 'bf16' on CUDA, 'bf16_cpu' anywhere."""
    return cfg["mixed_precision"] == "bf16_cpu" or device.type == "cuda" and cfg["mixed_precision"] != "no"


def get_config(argv):
    """nanoGPT-style: the defaults, then config files (Python, executed), then --key=value; strict about names,
    types and choices, and about values that would train something else than asked."""
    DEFAULTS = defaults()
    cfg = dict(DEFAULTS)

    def put(key, val, where):
        if key not in cfg:
            near = difflib.get_close_matches(key, cfg, n=1)
            raise SystemExit(f"config error: unknown key {key!r} in {where}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        want = type(DEFAULTS[key])
        if want is float and type(val) is int:
            val = float(val)
        if type(val) is not want:
            raise SystemExit(f"config error: {key} in {where} must be {want.__name__} like {DEFAULTS[key]!r}, "
                             f"got {type(val).__name__} {val!r}")
        cfg[key] = val

    if "-h" in argv or "--help" in argv:  # the running script's usage, then every key with its default
        print((sys.modules["__main__"].__doc__ or "").strip() + "\n\nkeys and defaults (what each does: the comment "
              "beside it at the top of train_sspo.py):\n" + "\n".join(f"  --{k}={v!r}" for k, v in DEFAULTS.items()))
        raise SystemExit(0)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"config error: {arg!r} must be --key=value"
                                 + (" (to resume a run: --init_from=resume)" if key == "resume" else ""))
            if type(DEFAULTS.get(key)) is str and not text.startswith(("'", '"')):
                val = text  # a string key takes the text as it is: --out_dir=2025 is the folder '2025'
            else:
                try:
                    val = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    val = text  # a bare string
            put(key, val, arg)
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"config error: config file {arg!r} not found")
            scope = {}
            try:
                exec(compile(open(arg).read(), arg, "exec"), scope)
            except Exception as e:
                raise SystemExit(f"config error: {arg} does not run: {type(e).__name__}: {e}")
            for key, val in scope.items():  # every public name but imported modules, functions and classes
                if not key.startswith("_") and not isinstance(val, (type(os), type(put), type)):
                    put(key, val, arg)
    for key, options in CHOICES.items():
        if cfg[key] not in options:
            raise SystemExit(f"config error: {key}={cfg[key]!r} is not one of {', '.join(map(repr, options))}")
    if cfg["zero_snr"] and cfg["prediction_type"] != "v_prediction":
        raise SystemExit("config error: zero_snr=True needs prediction_type='v_prediction' (at a zero terminal SNR "
                         "the noise cannot be told from x_t = eps)")
    if cfg["train_text_encoder"] and cfg["method"] != "sft":
        raise SystemExit("config error: train_text_encoder is for SFT pretraining; alignment keeps the encoder frozen")
    if cfg["parallel"] == "fsdp":
        for key, bad, why in (
                ("lora_rank", cfg["lora_rank"] > 0, "the base is frozen and the adapters small: DDP holds a LoRA run "
                                                    "(FLUX.1-dev: 57.5 GB of states a GPU, docs/memory.md)"),
                ("pool_storage", losses.needs_reference(cfg) and cfg["pool_storage"] == "memory",
                 "each rank writes its shard of a snapshot to out_dir/pool: pool_storage='disk'"),
                ("train_text_encoder", cfg["train_text_encoder"], "the text encoder is not sharded"),
                ("trained_modules", cfg["trained_modules"] != "all", "FSDP trains the whole denoiser"),
                ("channels_last", cfg["channels_last"], "not implemented for a sharded model"),
                ("compile_unet", cfg["compile_unet"] != "off", "not implemented for a sharded model")):
            if bad:
                raise SystemExit(f"config error: parallel='fsdp' with {key}={cfg[key]!r}: {why}")
    if cfg["text_cache"] < 0:
        raise SystemExit(f"config error: text_cache must be >= 0 (0: no cache), got {cfg['text_cache']}")
    if cfg["pool_capacity"] < 0 or cfg["pool_capacity"] == 1:
        raise SystemExit(f"config error: pool_capacity must be 0 (keep all) or >= 2, got {cfg['pool_capacity']}")
    if cfg["sdpo_safeguard"] and cfg["method"] not in ("dpo", "sspo", "dmpo"):
        raise SystemExit(f"config error: sdpo_safeguard is for method 'dpo', 'sspo' or 'dmpo', not {cfg['method']!r}")
    if cfg["noising"] != "forward" and cfg["method"] == "sft":
        raise SystemExit("config error: noising='ddim_inversion' is for the preference methods, not sft")
    if cfg["ssr_draws"] < 0 or not 1 <= cfg["ssr_t_max"] <= 1000 or cfg["ssr_margin"] < 0:
        raise SystemExit(f"config error: ssr_draws must be >= 0, ssr_t_max in [1, 1000] and ssr_margin >= 0, got "
                         f"{cfg['ssr_draws']}, {cfg['ssr_t_max']}, {cfg['ssr_margin']}")
    if not 0 <= cfg["sdpo_mu"] <= 1:
        raise SystemExit(f"config error: sdpo_mu must be in [0, 1], got {cfg['sdpo_mu']}")
    if not 0 < cfg["dmpo_alpha"] < 1:
        raise SystemExit(f"config error: dmpo_alpha must be in (0, 1), got {cfg['dmpo_alpha']}")
    if cfg["mapo_snr"] <= 0 or cfg["see_gamma"] < 0:
        raise SystemExit("config error: mapo_snr must be > 0 and see_gamma >= 0")
    lo_hi = cfg["cm_t_range"]
    if len(lo_hi) != 2 or not all(type(v) is int for v in lo_hi) or not 0 <= lo_hi[0] < lo_hi[1]:
        raise SystemExit(f"config error: cm_t_range must be two ints (lo, hi) with 0 <= lo < hi, got {lo_hi}")
    if not cfg["out_dir"]:
        raise SystemExit("config error: out_dir is empty (the run directory, like 'out/run')")
    for key in ("batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every", "sample_steps",
                "ckpt_every", "self_sample_steps", "inversion_steps", "keep_checkpoints", "ddp_timeout", "resolution",
                "n_eval_images", "frames", "frame_stride"):
        if cfg[key] < 1:
            raise SystemExit(f"config error: {key} must be >= 1, got {cfg[key]}")
    channels = cfg["unet_channels"]
    for key, ok, want in (  # values of the right type that would train something else than asked, silently
            ("beta", cfg["beta"] > 0, "> 0 (a negative beta prefers the losers)"),
            ("lr", cfg["lr"] > 0, "> 0"),
            ("grad_clip", cfg["grad_clip"] >= 0, ">= 0 (0: no clipping)"),
            ("weight_decay", cfg["weight_decay"] >= 0, ">= 0"),
            ("warmup_steps", cfg["warmup_steps"] >= 0, ">= 0"),
            ("num_workers", cfg["num_workers"] >= 0, ">= 0 (0: load in the training process)"),
            ("text_dim", cfg["text_dim"] > 0 and cfg["text_dim"] % 4 == 0, "a positive multiple of 4 (the tiny CLIP's heads)"),
            ("guidance", cfg["guidance"] >= 0, ">= 0 (1.0: no guidance)"),
            ("self_sample_guidance", cfg["self_sample_guidance"] >= 0, ">= 0 (1.0: no guidance)"),
            ("inversion_guidance", cfg["inversion_guidance"] >= 0, ">= 0 (1.0: no guidance)"),
            ("seed", cfg["seed"] >= 0, ">= 0 (numpy's generators take no negative seeds)"),
            ("tiny_p_correct", 0 <= cfg["tiny_p_correct"] <= 1, "in [0, 1]"),
            ("ema_decay", 0 <= cfg["ema_decay"] < 1, "in [0, 1) (0: no EMA)"),
            ("caption_dropout", 0 <= cfg["caption_dropout"] <= 1, "in [0, 1]"),
            ("eta", 0 <= cfg["eta"] <= 1, "in [0, 1]"),
            ("self_sample_eta", 0 <= cfg["self_sample_eta"] <= 1, "in [0, 1]"),
            ("adam_beta1", 0 <= cfg["adam_beta1"] < 1, "in [0, 1)"),
            ("adam_beta2", 0 <= cfg["adam_beta2"] < 1, "in [0, 1)"),
            ("unet_channels", len(channels) >= 2 and all(type(c) is int and c > 0 and c % 8 == 0 for c in channels),
             "two or more positive multiples of 8 (the GroupNorm's 8 groups), like (32, 64)")):
        if not ok:
            raise SystemExit(f"config error: {key} must be {want}, got {cfg[key]!r}")
    return cfg
