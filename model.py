"""
The Stable Diffusion parts, through diffusers/transformers classes only: load them from a hub id or a folder in
the SD1.5 layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or SDXL's (+ text_encoder_2/ tokenizer_2/),
save a run folder that the pipelines load, encode prompts and images, hand the UNet to diffusion.py as a network
(net), and own LoRA: the adapters, what a run trains, its reference without a second UNet. A model without vae/
works in pixel space: that is the tiny worlds' model (tiny/build.py).

SDXL conditions its UNet on more than the text's hidden states: the pooled embedding of its second text encoder
and six "time ids" (original size, crop offset, target size). Here they ride in the context tensor as one extra
token row (sdxl_context), so every loss, the sampler, caption dropout and DDP handle an SDXL context exactly as an
SD1.5 one; unet_output unpacks the row into the UNet's added_cond_kwargs.

A video model is AnimateDiff's: SD1.5's UNet with a MotionAdapter's temporal layers, diffusers' UNetMotionModel.
It denoises clips (B, C, F, H, W) with the same errors, losses and sampler (it folds the frames into its batch
itself); the VAE encodes and decodes a clip's frames as images.
"""
import copy
import json
import os
import warnings

import diffusers
import torch
import transformers
from diffusers import (AutoencoderKL, AutoencoderKLWan, DDIMScheduler, DiffusionPipeline,
                       FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, MotionAdapter, SD3Transformer2DModel,
                       UNet2DConditionModel, UNetMotionModel, UniPCMultistepScheduler, WanTransformer3DModel)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from safetensors.torch import save_file
from transformers import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast,
                          UMT5EncoderModel)

import diffusion

# the libraries' per-file progress bars and their hint to install accelerate would bury our own progress bar
for _lib in (diffusers, transformers):
    _lib.utils.logging.set_verbosity_error()
    _lib.utils.logging.disable_progress_bar()

PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")  # + "vae" for latent models
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")  # + these for SDXL (a UNet with addition_embed_type='text_time')
N_TIME_IDS = 6  # SDXL base: original (h, w), crop (top, left), target (h, w); the refiner's 5 are not supported


# the flow-matching families (model_index.json's _class_name -> their parts), and T5's prompt length in their pipelines
FLOW_PARTS = {
    "StableDiffusion3Pipeline": {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
                                 "text_encoder": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer,
                                 "text_encoder_2": CLIPTextModelWithProjection, "tokenizer_2": CLIPTokenizer,
                                 "text_encoder_3": T5EncoderModel, "tokenizer_3": T5TokenizerFast,
                                 "scheduler": FlowMatchEulerDiscreteScheduler},
    "FluxPipeline": {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                     "tokenizer": CLIPTokenizer, "text_encoder_2": T5EncoderModel, "tokenizer_2": T5TokenizerFast,
                     "scheduler": FlowMatchEulerDiscreteScheduler},
    # Wan2.1 text-to-video: its scheduler is the class its folder names (the published UniPC multistep sampler on
    # flow sigmas, or the flow Euler one)
    "WanPipeline": {"transformer": WanTransformer3DModel, "vae": AutoencoderKLWan, "text_encoder": UMT5EncoderModel,
                    "tokenizer": T5TokenizerFast, "scheduler": None}}
FLOW_SCHEDULERS = {c.__name__: c for c in (FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)}
T5_LENGTH = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512, "WanPipeline": 512}  # the pipelines' defaults
TRANSFORMERS = (SD3Transformer2DModel, FluxTransformer2DModel, WanTransformer3DModel)


def pipeline_of(path):
    """The pipeline class a model folder or hub id names in its model_index.json ('' if it has none)."""
    local = os.path.isdir(path)
    if local and not os.path.isfile(os.path.join(path, "model_index.json")):
        return ""
    try:
        return DiffusionPipeline.load_config(path, local_files_only=local).get("_class_name", "")
    except (OSError, ValueError):
        return ""


def is_flow(m):
    """A flow-matching model (SD3, FLUX.1, Wan2.1): its denoiser is a transformer."""
    return m.get("pipeline") in FLOW_PARTS


def denoiser_dir(unet):
    """The folder a run keeps its denoiser in, as the pipelines name it: unet/, or transformer/ (SD3, FLUX.1, Wan)."""
    return "transformer" if isinstance(_inner(unet), TRANSFORMERS) else "unet"


def _inner(unet):
    """The diffusers model inside a DDP wrapper or a LoraReference."""
    while hasattr(unet, "module") or isinstance(unet, LoraReference):
        unet = unet.unet if isinstance(unet, LoraReference) else unet.module
    return unet


def is_sdxl_unet(config):
    return config.get("addition_embed_type") == "text_time"


def is_animatediff(unet):
    """An AnimateDiff UNet (UNetMotionModel): its motion modules can be trained and saved alone."""
    return isinstance(_inner(unet), UNetMotionModel)


def is_video(unet):
    """An AnimateDiff UNet (UNetMotionModel) or a Wan transformer: it denoises clips (B, C, F, H, W)."""
    return isinstance(_inner(unet), (UNetMotionModel, WanTransformer3DModel))


def check_model_path(path):
    """FileNotFoundError unless `path` is an SD-layout folder (SDXL's when its UNet is an SDXL one) or looks like a
    hub id. Reads no weights. A path whose first part is a folder here (out/tiny_bsae) is taken as a local path with
    a typo, not as a hub id to download."""
    local = os.path.isdir(path)
    first = path.split("/")[0]
    if not local and (path.startswith((".", "/", "~")) or os.path.exists(path) or ("/" in path and os.path.isdir(first))):
        raise FileNotFoundError(f"model folder {path!r} does not exist (expected an SD-layout folder or a hub id"
                                + (f"; {first}/ is a folder here, so this is not read as a hub id" if os.path.isdir(first)
                                   else "") + "; a run folder of train_sspo.py is one: train it first, e.g. the tiny "
                                "base with python train_sspo.py configs/tiny_base.py)")
    pipeline = pipeline_of(path) if local else ""
    if pipeline in FLOW_PARTS:
        missing = [p for p in FLOW_PARTS[pipeline] if not os.path.isdir(os.path.join(path, p))]
        if missing:
            raise FileNotFoundError(f"model folder {path!r} lacks {', '.join(p + '/' for p in missing)} ({pipeline} "
                                    f"layout: {' '.join(p + '/' for p in FLOW_PARTS[pipeline])})")
        return local
    if local and pipeline and not os.path.isdir(os.path.join(path, "unet")):
        raise FileNotFoundError(f"model folder {path!r}: its model_index.json names {pipeline}, not a family trained "
                                f"here (SD1.5, SDXL, AnimateDiff: a unet/; {', '.join(FLOW_PARTS)}: a transformer/)")
    if local:
        missing = [p for p in PARTS if not os.path.isdir(os.path.join(path, p))]
        if missing:
            raise FileNotFoundError(f"model folder {path!r} lacks {', '.join(p + '/' for p in missing)} (SD1.5 layout: "
                                    f"{' '.join(p + '/' for p in PARTS)} and optionally vae/)")
        try:
            with open(os.path.join(path, "unet", "config.json")) as f:
                sdxl = is_sdxl_unet(json.load(f))
        except (OSError, ValueError):
            sdxl = False  # no readable config: from_pretrained names the file
        missing = [p for p in SDXL_PARTS if sdxl and not os.path.isdir(os.path.join(path, p))]
        if missing:
            raise FileNotFoundError(f"model folder {path!r} lacks {', '.join(p + '/' for p in missing)}: its UNet is an "
                                    f"SDXL one (addition_embed_type='text_time'), which needs both text encoders")
    return local


def load_model(path, device="cpu", frozen_dtype=torch.float32, fuse_lora=True, vae="", motion_adapter="",
               t5_max_length=0):
    """-> dict(unet, vae or None, text_encoder, tokenizer, scheduler, text_encoder_2, tokenizer_2; the last two None
    but for SDXL). The UNet stays fp32 (master weights); the frozen text encoders and VAE may be cast to
    `frozen_dtype`, but a VAE whose config asks for it (force_upcast: SDXL's overflows in fp16) stays fp32 under
    fp16, as diffusers' pipelines keep it. `vae`: another VAE's folder or hub id in its place (SDXL's fp16-safe
    madebyollin/sdxl-vae-fp16-fix, as the peers' --pretrained_vae_model_name_or_path). A LoRA run's folder holds
    the base in unet/ and the adapter in lora/: fuse_lora merges it into the UNet, so a LoRA run loads like a full
    one (training, which resumes the adapter itself, passes False). A folder whose unet/ is a UNetMotionModel (an
    AnimateDiff run's) loads as one; `motion_adapter` (a MotionAdapter folder or hub id, e.g.
    guoyww/animatediff-motion-adapter-v1-5-2) turns an SD1.5 UNet into one, as AnimateDiffPipeline does. A folder
    whose model_index.json names StableDiffusion3Pipeline or FluxPipeline loads as that flow-matching model
    (load_flow): "unet" then holds its transformer; t5_max_length: its T5 prompt tokens (0: the pipeline's)."""
    local = check_model_path(path)

    def part(cls, sub, where=path):  # OSError naming the part: a missing or damaged file, a hub id that does not resolve
        here = os.path.isdir(where)
        try:
            return cls.from_pretrained(where, subfolder=sub, local_files_only=here)
        except (OSError, ValueError) as e:
            raise OSError(f"{os.path.join(where, sub or '') if here else f'{where} ({sub})'}: {cls.__name__}: {e}") from None
    pipeline = pipeline_of(path)
    if pipeline in FLOW_PARTS:
        return load_flow(path, pipeline, part, device, frozen_dtype, fuse_lora and local, vae, t5_max_length)
    try:
        video = UNet2DConditionModel.load_config(path, subfolder="unet", local_files_only=local)["_class_name"] == \
            "UNetMotionModel"
    except (OSError, ValueError, KeyError):
        video = False  # part() names what is wrong with unet/
    unet = part(UNetMotionModel if video else UNet2DConditionModel, "unet")
    if motion_adapter and not video:
        here = os.path.isdir(motion_adapter)
        if not here and (motion_adapter.startswith((".", "/", "~")) or os.path.exists(motion_adapter)):
            raise FileNotFoundError(f"motion adapter folder {motion_adapter!r} does not exist (expected a MotionAdapter "
                                    "folder or a hub id)")
        adapter = part(MotionAdapter, None, motion_adapter)
        try:
            unet = UNetMotionModel.from_unet2d(unet, adapter)
        except ValueError as e:  # diffusers' check that the adapter's blocks match the UNet's
            raise ValueError(f"{motion_adapter}: does not fit {path}'s UNet: {e}") from None
    sdxl = is_sdxl_unet(unet.config)
    m = {
        "unet": unet.to(device),
        "text_encoder": part(CLIPTextModel, "text_encoder"),
        "tokenizer": part(CLIPTokenizer, "tokenizer"),
        # DDIMScheduler reads SD1.5's PNDM config too; we use its betas/alphas, never its .step()
        "scheduler": part(DDIMScheduler, "scheduler"),
        "vae": None,
        "text_encoder_2": part(CLIPTextModelWithProjection, "text_encoder_2") if sdxl else None,
        "tokenizer_2": part(CLIPTokenizer, "tokenizer_2") if sdxl else None,
    }
    if vae:  # a VAE folder or hub id: its files at the top, or in a vae/ subfolder
        if not os.path.isdir(vae) and (vae.startswith((".", "/", "~")) or os.path.exists(vae)):
            raise FileNotFoundError(f"vae folder {vae!r} does not exist (expected a VAE folder or a hub id)")
        m["vae"] = part(AutoencoderKL, "vae" if os.path.isdir(os.path.join(vae, "vae")) else None, vae)
    elif not local or os.path.isdir(os.path.join(path, "vae")):
        m["vae"] = part(AutoencoderKL, "vae")
    check_scheduler(m["scheduler"], path)
    if sdxl:
        check_sdxl(m, path)
    if fuse_lora and local:
        fuse_run_lora(m["unet"], path, "unet")
    for k in ("text_encoder", "text_encoder_2", "vae"):
        if m[k] is not None:
            upcast = k == "vae" and frozen_dtype == torch.float16 and m[k].config.force_upcast
            m[k].to(device=device, dtype=torch.float32 if upcast else frozen_dtype).eval().requires_grad_(False)
    return m


def load_flow(path, pipeline, part, device, frozen_dtype, fuse_lora, vae, t5_max_length):
    """A StableDiffusion3Pipeline or FluxPipeline folder -> the dict load_model returns: "unet" its transformer (fp32),
    the VAE, text encoders and tokenizers under the pipeline's names, its FlowMatchEulerDiscreteScheduler, "pipeline"
    (the class name) and "t5_length". The frozen parts in frozen_dtype; a run's lora/ fused as for SD1.5."""
    parts = dict(FLOW_PARTS[pipeline])
    if parts["scheduler"] is None:  # Wan: the class its scheduler/ names
        name = DiffusionPipeline.load_config(path, local_files_only=os.path.isdir(path)).get("scheduler", [0, ""])[1]
        if name not in FLOW_SCHEDULERS:
            raise ValueError(f"{path}: scheduler {name!r}; a Wan model samples here with "
                             f"{' or '.join(FLOW_SCHEDULERS)}")
        parts["scheduler"] = FLOW_SCHEDULERS[name]
    m = {k: part(cls, k) for k, cls in parts.items() if k != "vae" or not vae}
    if vae:
        m["vae"] = part(AutoencoderKL, "vae" if os.path.isdir(os.path.join(vae, "vae")) else None, vae)
    m["unet"], m["pipeline"] = m.pop("transformer").to(device), pipeline
    m["t5_length"] = t5_max_length or T5_LENGTH[pipeline]
    c = m["scheduler"].config
    if pipeline == "FluxPipeline" and not c.use_dynamic_shifting:
        raise ValueError(f"{path}: a FLUX.1 scheduler without use_dynamic_shifting (FLUX.1-schnell's): its sampler "
                         "is not implemented here (FLUX.1-dev's is)")
    if isinstance(m["scheduler"], UniPCMultistepScheduler) and not (c.use_flow_sigmas and
                                                                    c.prediction_type == "flow_prediction"):
        raise ValueError(f"{path}: a UniPC scheduler without use_flow_sigmas and prediction_type='flow_prediction' "
                         "is not a flow-matching schedule")
    if pipeline != "FluxPipeline" and c.get("use_dynamic_shifting"):
        raise ValueError(f"{path}: a {pipeline} scheduler with use_dynamic_shifting: not implemented (its shift is "
                         "fixed)")
    if fuse_lora:
        fuse_run_lora(m["unet"], path, "transformer")
    for k, v in m.items():  # Wan's VAE stays float32, as WanPipeline's documentation loads it (0.5 GB)
        if k.startswith(("text_encoder", "vae")):
            fp32 = k == "vae" and isinstance(v, AutoencoderKLWan)
            v.to(device=device, dtype=torch.float32 if fp32 else frozen_dtype).eval().requires_grad_(False)
    return m


def fuse_run_lora(unet, path, prefix):
    """A LoRA run's lora/ (if `path` has one) merged into its base `unet`, which is then a plain model again; an
    unreadable adapter file is an OSError naming it."""
    if not os.path.isfile(os.path.join(path, LORA_DIR, LORA_FILE)):
        return
    try:
        unet.load_lora_adapter(os.path.join(path, LORA_DIR), prefix=prefix, weight_name=LORA_FILE,
                               local_files_only=True)
    except (OSError, ValueError) as e:
        raise OSError(f"{os.path.join(path, LORA_DIR, LORA_FILE)}: {e}") from None
    unet.fuse_lora()
    unet.unload_lora()


def check_sdxl(m, where):
    """ValueError unless the SDXL parts fit together as StableDiffusionXLPipeline uses them: the UNet attends to both
    encoders' hidden states side by side and embeds the second one's pooled output with the six time ids."""
    c, e1, e2 = m["unet"].config, m["text_encoder"].config, m["text_encoder_2"].config
    want = c.addition_time_embed_dim * N_TIME_IDS + e2.projection_dim
    if c.cross_attention_dim != e1.hidden_size + e2.hidden_size or c.projection_class_embeddings_input_dim != want:
        raise ValueError(f"{where}: the SDXL UNet expects context width {c.cross_attention_dim} and added embedding "
                         f"{c.projection_class_embeddings_input_dim}; the text encoders give {e1.hidden_size} + "
                         f"{e2.hidden_size} and {want} with {N_TIME_IDS} time ids (the refiner's 5 are not supported)")
    if e2.projection_dim + N_TIME_IDS > c.cross_attention_dim:
        raise ValueError(f"{where}: the pooled embedding and time ids ({e2.projection_dim} + {N_TIME_IDS}) do not fit "
                         f"in one context row of {c.cross_attention_dim}")


def check_scheduler(scheduler, where):
    """ValueError for a schedule this code cannot train or sample: a prediction type other than eps or v, or eps
    prediction with a zero terminal SNR (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) divides by zero at abar = 0)."""
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"{where}: prediction_type={kind!r}; 'epsilon' (SD1.x) and 'v_prediction' are implemented")
    if kind == "epsilon" and scheduler.alphas_cumprod[-1] == 0:
        raise ValueError(f"{where}: a zero-terminal-SNR schedule (rescale_betas_zero_snr) needs prediction_type="
                         "'v_prediction'")


def save_frozen_parts(m, out_dir, cfg=None, write_folder=None):
    """Write everything but the UNet (text encoders, tokenizers, scheduler, vae) so out_dir is an SD-layout folder
    that StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) loads. A LoRA run (cfg's lora_rank) trains an
    adapter only: its unet/ is the base, written here once, before the adapters are added, by write_folder(folder,
    save) (checkpoint.write_folder: whole or not at all); each checkpoint then writes lora/."""
    if cfg and cfg["lora_rank"]:
        write_folder(os.path.join(out_dir, denoiser_dir(m["unet"])), m["unet"].save_pretrained, point="unet")
    if is_flow(m):  # its pipeline's parts and index, as StableDiffusion3Pipeline / FluxPipeline save them
        for k in FLOW_PARTS[m["pipeline"]]:
            if k != "transformer":
                m[k].save_pretrained(os.path.join(out_dir, k))
        classes = {k: type(_inner(m["unet"]) if k == "transformer" else m[k]) for k in FLOW_PARTS[m["pipeline"]]}
        index = {"_class_name": m["pipeline"], **{k: [c.__module__.split(".")[0], c.__name__]
                                                  for k, c in classes.items()}}
        extra = {"transformer_2": [None, None]} if m["pipeline"] == "WanPipeline" else \
            {"image_encoder": [None, None], "feature_extractor": [None, None]}
        with open(os.path.join(out_dir, "model_index.json"), "w") as f:
            json.dump({**index, **extra}, f, indent=2)
        return
    for k in ("text_encoder", "tokenizer", "scheduler", "vae", *SDXL_PARTS):
        if m.get(k) is not None:
            m[k].save_pretrained(os.path.join(out_dir, k))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    if m.get("text_encoder_2") is not None:  # SDXL base's index (its force_zeros_for_empty_prompt: True)
        index.update({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers",
                      "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "image_encoder": [None, None], "force_zeros_for_empty_prompt": True})
        for k in ("safety_checker", "requires_safety_checker"):
            del index[k]
    if is_video(m["unet"]):  # AnimateDiffPipeline's index: unet/ holds the whole UNetMotionModel, motion_adapter/
        # the trained temporal layers alone (checkpoint.py), which AnimateDiffPipeline also accepts on an SD1.5 UNet
        index.update({"_class_name": "AnimateDiffPipeline", "unet": ["diffusers", "UNetMotionModel"],
                      "motion_adapter": ["diffusers", "MotionAdapter"], "image_encoder": [None, None]})
        for k in ("safety_checker", "requires_safety_checker"):
            index.pop(k, None)
    if m["vae"] is not None:
        index["vae"] = ["diffusers", "AutoencoderKL"]
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


# ---------------------------------------------------------------------------------------------------------------
# LoRA: low-rank adapters through peft, as diffusers integrates it (UNet2DConditionModel.add_adapter), never layers
# of our own, so that StableDiffusionPipeline.load_lora_weights reads what we save

LORA_DIR, LORA_FILE = "lora", "pytorch_lora_weights.safetensors"  # where a run folder keeps its adapter


def check_config(cfg):
    """SystemExit for what LoRA here does not do, refused rather than silently trained otherwise."""
    if cfg["lora_rank"] < 0 or cfg["lora_alpha"] < 0:
        raise SystemExit(f"config error: lora_rank and lora_alpha must be >= 0 (lora_rank 0: full fine-tuning; "
                         f"lora_alpha 0: = lora_rank), got {cfg['lora_rank']} and {cfg['lora_alpha']}")
    if not cfg["lora_rank"]:
        return
    for key, bad, why in (("ema_decay", cfg["ema_decay"] > 0, "an EMA of the adapter is not implemented"),
                          ("train_text_encoder", cfg["train_text_encoder"], "the adapters are on the UNet only"),
                          ("compile_unet", cfg["compile_unet"] != "off", "switching adapters would recompile")):
        if bad:
            raise SystemExit(f"config error: lora_rank={cfg['lora_rank']} with {key}={cfg[key]!r}: {why}")
    if not cfg["lora_targets"] or not all(type(n) is str and n for n in cfg["lora_targets"]):
        raise SystemExit(f"config error: lora_targets must be module names like ('to_q', 'to_k'), got "
                         f"{cfg['lora_targets']!r}")


def has_adapters(unet):
    """Whether the UNet trains a LoRA adapter (trainable gave it one): its checkpoints and pool hold the adapter."""
    return "default" in (getattr(unet, "peft_config", None) or {})


def trainable(unet, cfg):
    """Freeze what a run does not train -> the parameters it trains: the whole UNet; an AnimateDiff UNet's motion
    modules (trained_modules='motion'); or, with lora_rank > 0, a new LoRA adapter alone (and, for SSPO, a second
    one that holds its reference's snapshot: LoraReference)."""
    if cfg["lora_rank"]:
        return add_lora(unet, cfg, ("default", "ref") if cfg["method"] == "sspo" else ("default",))
    if cfg["trained_modules"] == "motion":
        return train_motion_only(unet)
    return list(unet.parameters())


def reference(unet, dtype=torch.float32):
    """The reference a run compares its policy with (replay.py copies snapshots into it): a frozen copy of the UNet
    in `dtype`; for a LoRA run the policy's own UNet with its adapters off or swapped (LoraReference): no second
    UNet."""
    if has_adapters(unet):
        return LoraReference(unet)
    return copy.deepcopy(unet).to(dtype).eval().requires_grad_(False)


def ema_copy(unet):
    return copy.deepcopy(unet).requires_grad_(False)


@torch.no_grad()
def ema_update(ema, unet, decay):
    """ema <- decay ema + (1 - decay) unet, every tensor in one kernel."""
    torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)


def add_lora(unet, cfg, names=("default",)):
    """Freeze the UNet and add one adapter per name (diffusers' LoRA trainers: gaussian A, zero B, so a new adapter
    leaves the output exactly the base's). 'default' is the trained one and stays active; a second one ('ref')
    holds a snapshot for SSPO's reference (LoraReference). -> the trainable parameters, the default adapter's."""
    from peft import LoraConfig
    unet.requires_grad_(False)
    for name in names:
        warnings.filterwarnings("ignore", "Already found a `peft_config`")  # peft's note on a second adapter: wanted
        unet.add_adapter(LoraConfig(r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"] or cfg["lora_rank"],
                                    target_modules=list(cfg["lora_targets"]), init_lora_weights="gaussian"), name)
    unet.set_adapter("default")  # add_adapter activates (and unfreezes) the adapter it adds
    return check_trained_adapter(unet)


def check_trained_adapter(unet):
    """-> the default adapter's parameters, after checking that they and only they require gradients (peft's
    set_adapter and enable/disable_adapters set requires_grad as they switch)."""
    trained = [p for n, p in unet.named_parameters() if ".default." in n]
    wrong = [n for n, p in unet.named_parameters() if p.requires_grad != (".default." in n)]
    if not trained or wrong:
        raise RuntimeError(f"LoRA: the trained adapter must be the only trainable parameters; wrong: {wrong[:3]}")
    return trained


def lora_state(unet, adapter="default"):
    """{name: tensor} of one adapter's weights, named as peft's get_peft_model_state_dict names them (without the
    adapter's name): what the pool, the checkpoint and the saved adapter hold. Views of the parameters: copying
    into them loads an adapter in place."""
    from peft.utils import get_peft_model_state_dict
    return get_peft_model_state_dict(unet, adapter_name=adapter)


def trained_state(unet, cfg):
    """The weights a checkpoint and a pool snapshot hold: the whole UNet; with LoRA its trained adapter only; with
    trained_modules='motion' (AnimateDiff) its temporal layers only."""
    if cfg["lora_rank"]:
        return lora_state(unet)
    if cfg["trained_modules"] == "motion":
        return {k: v for k, v in unet.state_dict().items() if ".motion_modules." in k}
    return unet.state_dict()


def train_motion_only(unet):
    """Freeze an AnimateDiff UNet but for its motion modules (what AnimateDiff and MagicTime train) -> those
    parameters."""
    unet.freeze_unet2d_params()
    trained = [p for n, p in unet.named_parameters() if p.requires_grad]
    if not trained or any(p.requires_grad != (".motion_modules." in n) for n, p in unet.named_parameters()):
        raise RuntimeError("trained_modules='motion': the motion modules must be the only trainable parameters")
    return trained


def load_trained_state(unet, state, cfg):
    if cfg["trained_modules"] == "motion" and not cfg["lora_rank"]:
        missing, unexpected = unet.load_state_dict(state, strict=False)
        if unexpected or any(".motion_modules." in k for k in missing):
            raise KeyError(f"not a motion-modules state: unexpected {unexpected[:3]}, missing {missing[:3]}")
        return
    if not cfg["lora_rank"]:
        return unet.load_state_dict(state)
    with torch.no_grad():
        for k, t in lora_state(unet).items():
            t.copy_(state[k])


def save_weights(unet, state, folder):
    """What save_pretrained writes, from a state dict gathered from a sharded UNet (FSDP): its config and the weights
    in one safetensors file, which from_pretrained and the pipelines read."""
    unet.save_config(folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["_class_name"] = _inner(unet).__class__.__name__.removeprefix("FSDP")  # FSDP's subclass of the model's
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})


def save_lora(unet, folder):
    """The trained adapter as the pipeline's load_lora_weights(folder) reads it (its rank and alpha in the file's
    metadata: without them the loader takes alpha = rank): StableDiffusionPipeline's for a UNet, StableDiffusion3's
    or Flux's for their transformers."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
    meta = unet.peft_config["default"].to_dict()
    if isinstance(unet, TRANSFORMERS):
        from diffusers import WanPipeline
        pipe = {SD3Transformer2DModel: StableDiffusion3Pipeline, FluxTransformer2DModel: FluxPipeline,
                WanTransformer3DModel: WanPipeline}[type(unet)]
        return pipe.save_lora_weights(folder, transformer_lora_layers=lora_state(unet), weight_name=LORA_FILE,
                                      transformer_lora_adapter_metadata=meta)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora_state(unet), weight_name=LORA_FILE,
                                              unet_lora_adapter_metadata=meta)


class LoraReference:
    """A LoRA run's reference without a second UNet: the policy's own UNet with its adapters off (theta_0, the base:
    Diffusion-DPO's reference and SSPO's first snapshot) or with the 'ref' adapter, which holds a snapshot, in
    place of the trained one. Called like a UNet, always without gradients; every call switches back to the trained
    adapter and checks that it alone is trainable again before the policy's forward and backward."""

    def __init__(self, unet):
        self.unet, self.adapter, self.config = unet, None, unet.config

    def parameters(self):  # denoising_error and the sampler read the input dtype from here: the policy's
        return self.unet.parameters()

    def load(self, state, step):
        """Use snapshot `state` (an adapter's weights) of step `step`; step 0 is theta_0: adapters off."""
        self.adapter = "ref" if step else None
        if step:
            with torch.no_grad():
                for k, t in lora_state(self.unet, "ref").items():
                    t.copy_(state[k])

    def __call__(self, *args, **kwargs):
        try:
            with torch.no_grad():
                if self.adapter is None:
                    self.unet.disable_adapters()
                else:
                    self.unet.set_adapter(self.adapter)
                return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()
            self.unet.set_adapter("default")
            check_trained_adapter(self.unet)


# ---------------------------------------------------------------------------------------------------------------
# encoding

def encode_prompts(m, prompts, resolution=None):
    """list of B strings -> the UNet's context: (B, 77, D) last hidden states, as SD1.5 conditions on them (padded
    to 77 tokens); for SDXL (B, 78, D1 + D2) as StableDiffusionXLPipeline.encode_prompt computes it (both
    encoders' penultimate hidden states side by side) with the extra row of sdxl_context: the second encoder's
    pooled output and the time ids of a `resolution` image (default: the model's own), uncropped, as the pipeline
    passes them and Diffusion-DPO's SDXL training does. Gradients flow only when the encoder is being trained (in
    train mode with requires_grad)."""
    def ids(tokenizer, encoder, length=None):
        return tokenizer(list(prompts), padding="max_length", max_length=length or tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(encoder.device)
    enc = m["text_encoder"]
    if m.get("pipeline") == "StableDiffusion3Pipeline":  # as StableDiffusion3Pipeline.encode_prompt, no clip_skip:
        # both CLIPs' penultimate hidden states side by side, zero-padded to T5's width, then T5's states after them
        outs = [e(ids(t, e, m["tokenizer"].model_max_length), output_hidden_states=True) for t, e in
                ((m["tokenizer"], enc), (m["tokenizer_2"], m["text_encoder_2"]))]
        t5 = m["text_encoder_3"](ids(m["tokenizer_3"], m["text_encoder_3"], m["t5_length"]))[0]
        clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return pooled_context(torch.cat([clip, t5], dim=-2), torch.cat([o[0] for o in outs], dim=-1))
    if m.get("pipeline") == "WanPipeline":  # as WanPipeline.encode_prompt: cleaned prompts, UMT5's states under
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # the attention mask, zero past each prompt
        tok = m["tokenizer"]([prompt_clean(p) for p in prompts], padding="max_length", max_length=m["t5_length"],
                             truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tok.attention_mask.to(enc.device)
        return enc(tok.input_ids.to(enc.device), mask).last_hidden_state * mask[..., None].to(enc.dtype)
    if m.get("pipeline") == "FluxPipeline":  # as FluxPipeline.encode_prompt: T5's states, CLIP's pooled output
        t5 = m["text_encoder_2"](ids(m["tokenizer_2"], m["text_encoder_2"], m["t5_length"]))[0]
        return pooled_context(t5, enc(ids(m["tokenizer"], enc)).pooler_output)
    with torch.set_grad_enabled(enc.training and torch.is_grad_enabled()):
        if m.get("text_encoder_2") is None:
            return enc(ids(m["tokenizer"], enc))[0]
        out1 = enc(ids(m["tokenizer"], enc), output_hidden_states=True)
        out2 = m["text_encoder_2"](ids(m["tokenizer_2"], m["text_encoder_2"]), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2])], dim=-1)
        R = resolution or m["unet"].config.sample_size * vae_factor(m)
        time_ids = torch.tensor([R, R, 0, 0, R, R], device=hidden.device).expand(len(prompts), -1)
        return sdxl_context(hidden, out2.text_embeds.to(hidden), time_ids)


def pooled_context(hidden, pooled):
    """A flow model's two text conditions in one context tensor: hidden (B, L, D), pooled (B, P) with P <= D ->
    (B, L + 1, D), the last row [pooled, zeros] (unet_output splits it again), as sdxl_context does for SDXL."""
    row = torch.zeros(hidden.shape[0], 1, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    row[:, 0, :pooled.shape[-1]] = pooled
    return torch.cat([hidden, row], dim=1)


def sdxl_context(hidden, pooled, time_ids):
    """SDXL's three conditions in one context tensor: hidden (B, 77, D), pooled (B, P), time_ids (B, 6) ->
    (B, 78, D), row 77 = [pooled, time_ids, zeros]. unet_output splits it again."""
    row = torch.zeros(hidden.shape[0], 1, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    P = pooled.shape[-1]
    row[:, 0, :P], row[:, 0, P:P + time_ids.shape[-1]] = pooled, time_ids.to(hidden)
    return torch.cat([hidden, row], dim=1)


def unet_output(unet, x, t, context, guidance=None):
    """The UNet's raw output (eps, or v) at x_t: x, t and context as the UNet takes them (the context in the
    input's dtype). An SDXL context (sdxl_context) is split into encoder_hidden_states and added_cond_kwargs; a
    clip's context is repeated for each of its frames. A flow model's transformer (SD3, FLUX.1) gets its pooled row
    (pooled_context) as pooled_projections and returns the velocity; guidance: FLUX.1-dev's guidance input.
    `unet` may be wrapped (DDP, LoraReference): its config is read from the module inside (none: an SD1.5 UNet)."""
    config = getattr(getattr(unet, "module", unet), "config", {})
    if isinstance(_inner(unet), SD3Transformer2DModel):  # time is s x 1000, one per sample
        return unet(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=context[:, :-1],
                    pooled_projections=context[:, -1, :config.pooled_projection_dim], return_dict=False)[0]
    if isinstance(_inner(unet), FluxTransformer2DModel):
        return flux_output(unet, config, x, t, context, guidance)
    if isinstance(_inner(unet), WanTransformer3DModel):  # a clip (B, C, F, H, W), time s x 1000, no pooled row
        return unet(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=context,
                    return_dict=False)[0]
    if x.dim() == 5:  # a clip (B, C, F, H, W): UNetMotionModel folds its frames into the batch and takes the prompt
        context = context.repeat_interleave(x.shape[2], dim=0)  # once per frame, as AnimateDiffPipeline repeats it
    if not is_sdxl_unet(config):
        return unet(x, t, encoder_hidden_states=context).sample
    P = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim * N_TIME_IDS
    row = context[:, -1]
    added = {"text_embeds": row[:, :P], "time_ids": row[:, P:P + N_TIME_IDS]}
    return unet(x, t, encoder_hidden_states=context[:, :-1], added_cond_kwargs=added).sample


def net(unet, guidance=1.0):
    """The UNet (transformer) as diffusion.py calls a network: net(x_t, t, context) -> its raw output (eps, v or the
    velocity) in float32. x_t and the context are cast to its dtype (a bf16 reference takes bf16 inputs; autocast
    handles the policy). `unet` may be wrapped (DDP, LoraReference). A guidance-distilled model (FLUX.1-dev) takes
    its guidance as an input: `guidance` is the one it trains at (its trainers': the value it samples with), and
    f.guidance_embedded tells the sampler to pass its own instead of running classifier-free guidance."""
    def f(x, t, context, guidance=guidance):
        dtype = next(unet.parameters()).dtype
        return unet_output(unet, x.to(dtype), t, context.to(dtype), guidance).float()
    f.guidance_embedded = bool(getattr(getattr(_inner(unet), "config", None), "guidance_embeds", False))
    return f


def flux_output(unet, config, x, t, context, guidance):
    """FluxTransformer2DModel on unpacked latents (B, C, h, w), as FluxPipeline calls it: 2x2 patches packed into
    (h/2)(w/2) tokens of 4C channels (_pack_latents), each with its (0, row, column) position id, the text's ids all
    zero, time s (the pipeline passes (s x 1000) / 1000; the model scales it back), and for a guidance-distilled model
    (FLUX.1-dev) the guidance value; the output unpacked again."""
    B, C, h, w = x.shape
    packed = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)
    img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
    img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
    img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
    txt_ids = torch.zeros(context.shape[1] - 1, 3, device=x.device, dtype=x.dtype)
    g = torch.full((B,), guidance, device=x.device, dtype=torch.float32) if config.guidance_embeds else None
    out = unet(hidden_states=packed, timestep=t.expand(B).to(x.dtype) / 1000, guidance=g,
               pooled_projections=context[:, -1, :config.pooled_projection_dim],
               encoder_hidden_states=context[:, :-1], txt_ids=txt_ids, img_ids=img_ids.reshape(-1, 3),
               return_dict=False)[0]
    return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


class PromptCache:
    """encode_prompts for a frozen text encoder, each distinct prompt encoded once: its context row (77 or 78, D) is
    kept on the encoder's device, in its dtype, for up to `capacity` prompts (the oldest go first); 0 turns the
    cache off. A trained encoder (train mode) is never cached. New prompts are encoded CHUNK at a time, the last
    chunk filled with the empty prompt: a matmul may round by its number of rows (CLIP's pooled projection does on
    CPU), and a prompt's row must not depend on which other prompts were new with it, or a resumed run would differ.
    SD1.5: 118 KB a prompt in bf16; SD3 with 256 T5 tokens 2.7 MB, FLUX.1 and Wan with 512 4.2 MB (their configs
    keep 512: 2.1 GB)."""
    CHUNK = 16

    def __init__(self, m, capacity, resolution=None):
        self.m, self.capacity, self.resolution, self.store = m, capacity, resolution, {}

    def __call__(self, prompts):
        if self.capacity <= 0 or self.m["text_encoder"].training:
            return encode_prompts(self.m, prompts, self.resolution)
        new = list(dict.fromkeys(p for p in prompts if p not in self.store))
        for i in range(0, len(new), self.CHUNK):
            part = new[i:i + self.CHUNK]
            with torch.no_grad():
                rows = encode_prompts(self.m, part + [""] * (self.CHUNK - len(part)), self.resolution)
            self.store.update(zip(part, rows[:len(part)].clone()))
        out = torch.stack([self.store[p] for p in prompts])
        while len(self.store) > self.capacity:
            del self.store[next(iter(self.store))]
        return out


@torch.no_grad()
def images_to_latents(vae, images, noise=None, generator=None):
    """(B, 3, H, W) in [-1, 1] -> diffusion space: a VAE latent sample (mean + std x noise, as the peers' .sample())
    x the scaling factor (0.18215 for SD1.5), or the pixels themselves for a pixel-space model. `noise` of the
    latent shape makes the draw reproducible; else it comes from `generator`."""
    if vae is None:
        return images
    if images.dim() == 5 and not isinstance(vae, AutoencoderKLWan):  # clips (B, 3, F, H, W): frames as images
        frames = lambda v: None if v is None else v.transpose(1, 2).flatten(0, 1)
        z = images_to_latents(vae, frames(images), frames(noise), generator)
        return z.unflatten(0, (images.shape[0], -1)).transpose(1, 2).contiguous()
    return sample_latents(vae, encode_moments(vae, images), noise, generator)


def encode_moments(vae, images):
    """(B, 3, H, W) in [-1, 1] -> (B, 2C, H/8, W/8) in the VAE's dtype: the encoder's output, the mean and the
    log-variance of the latent's Gaussian. What latents.py stores: the noise is drawn later, at each step."""
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.parameters


def sample_latents(vae, moments, noise=None, generator=None):
    """encode_moments' output -> diffusion space, drawn as images_to_latents draws it (the same arithmetic, so a
    run from the latent cache equals one that encodes)."""
    dist = DiagonalGaussianDistribution(moments.to(vae.device, vae.dtype))
    z = dist.sample(generator) if noise is None else dist.mean + dist.std * noise.to(dist.mean)
    if isinstance(vae, AutoencoderKLWan):  # per channel: (z - mean) / std, as WanPipeline's decode inverts
        mean, std = wan_stats(vae, z)
        return ((z - mean) / std).float()
    if vae.config.shift_factor is not None:  # SD3's and FLUX.1's VAEs: (z - shift) x scale, as their trainers
        z = z - vae.config.shift_factor
    return (z * vae.config.scaling_factor).float()


def wan_stats(vae, z):
    """A Wan VAE's per-channel latent mean and std, shaped to broadcast over (B, C, F, H, W)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return (torch.tensor(vae.config.latents_mean).view(shape).to(z), torch.tensor(vae.config.latents_std)
            .view(shape).to(z))


def to_latents(vae, batch, which, device, noise=None, generator=None):
    """A batch's winners (which='w') or losers ('l') in diffusion space: its images VAE-encoded, or the moments
    that latents.py stored for them, drawn with the same noise."""
    if f"latent_{which}" in batch:
        return sample_latents(vae, batch[f"latent_{which}"].to(device), noise, generator)
    return images_to_latents(vae, batch[f"image_{which}"].to(device), noise, generator)


def vae_factor(m):
    """How many pixels a side of one latent covers: 8 for SD1.5, 1 for a pixel-space model."""
    if isinstance(m["vae"], AutoencoderKLWan):
        return m["vae"].config.scale_factor_spatial
    return 2 ** (len(m["vae"].config.block_out_channels) - 1) if m["vae"] is not None else 1


def latent_shape(m, resolution, frames=0):
    """(C, H, W) of the diffusion space for images of side `resolution`; (C, F, H, W) for a video model's clips of
    `frames` frames."""
    f = vae_factor(m)
    if isinstance(m["vae"], AutoencoderKLWan):  # its VAE compresses time too: frames 1 + k tf -> 1 + k
        return (m["vae"].config.z_dim, (frames - 1) // m["vae"].config.scale_factor_temporal + 1, resolution // f,
                resolution // f)
    C = 3 if m["vae"] is None else m["vae"].config.latent_channels
    return (C, *[frames] * is_video(m["unet"]), resolution // f, resolution // f)


@torch.no_grad()
def latents_to_images(vae, x):
    """diffusion space -> (B, 3, H, W) float images in [-1, 1] ((B, 3, F, H, W) clips: decoded frame by frame)."""
    if isinstance(vae, AutoencoderKLWan):  # the whole clip at once, as WanPipeline decodes
        mean, std = wan_stats(vae, x)
        return vae.decode((x * std + mean).to(vae.dtype)).sample.float().clamp(-1, 1)
    if vae is not None and x.dim() == 5:
        return torch.stack([latents_to_images(vae, x[:, :, f]) for f in range(x.shape[2])], dim=2)
    if vae is not None:
        z = x / vae.config.scaling_factor
        if vae.config.shift_factor is not None:  # SD3's and FLUX.1's VAEs, as their pipelines decode
            z = z + vae.config.shift_factor
        x = vae.decode(z.to(vae.dtype)).sample
    return x.float().clamp(-1, 1)


REGIONS = (ResnetBlock2D, Transformer2DModel)  # what compile_unet='regional' compiles, each on its own


def speed_up(unets, channels_last=False, compile_unet="off"):
    """The opt-in fast paths, in place (bench.py measures them): channels_last memory format, and torch.compile
    (state_dict keys and checkpoints unchanged; each new input shape recompiles). compile_unet 'whole': each UNet is
    one graph; 'regional': each ResNet and transformer block apart, as diffusers' compile_repeated_blocks does:
    blocks of one class and shape share their code, so it compiles in a fraction of the time but cannot fuse across
    blocks. None entries are skipped; the EMA copy (third) is not compiled."""
    unets = [u if isinstance(u, torch.nn.Module) else None for u in unets]  # a LoraReference is the policy's UNet
    for u in unets:
        if u is not None and channels_last:
            u.to(memory_format=torch.channels_last)
    if compile_unet == "regional":  # one graph per (block class, shape, batch): more than dynamo's default of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    for u in unets[:2] if compile_unet != "off" else ():
        if u is not None:
            parts = [m for m in u.modules() if isinstance(m, REGIONS)] if compile_unet == "regional" else [u]
            for m in parts:
                m.compile(dynamic=False)


def check_model_fits(cfg, m):
    """ValueError if the config asks what the loaded model cannot do: more sampler steps than its schedule takes, a
    resolution its VAE and UNet do not divide, a trained text encoder on SDXL, clips for an image model or images
    for a video model."""
    T = m["scheduler"].config.num_train_timesteps
    if is_flow(m):
        return check_flow_fits(cfg, m)
    for k in ("sample_steps", "self_sample_steps"):
        diffusion.check_sampler_steps(m["scheduler"], cfg[k], k)
    if cfg["inversion_steps"] > T:
        raise ValueError(f"inversion_steps={cfg['inversion_steps']} is more than the scheduler's {T} timesteps")
    f = vae_factor(m) * 2 ** (len(m["unet"].config.block_out_channels) - 1)  # the UNet halves the side too
    if cfg["resolution"] % f:
        raise ValueError(f"resolution={cfg['resolution']} is not a multiple of {f} (the VAE's and the UNet's "
                         "downsampling)")
    clips = cfg["dataset"] in ("tiny_video", "clipfolder")
    if clips != is_video(m["unet"]):
        raise ValueError(f"dataset={cfg['dataset']!r} has {'clips' if clips else 'images'}, but the model is "
                         + ("an image model (motion_adapter= makes an SD1.5 UNet an AnimateDiff one)" if clips else
                            "an AnimateDiff video model"))
    if cfg["trained_modules"] == "motion" and not is_animatediff(m["unet"]):
        raise ValueError("trained_modules='motion' trains an AnimateDiff UNet's motion modules; this UNet has none")
    if m.get("text_encoder_2") is not None and cfg["train_text_encoder"]:
        raise ValueError("train_text_encoder=True trains one text encoder; an SDXL model has two (not implemented: "
                         "SDXL fine-tuning keeps both frozen)")


def check_flow_fits(cfg, m):
    """check_model_fits for a flow model (SD3, FLUX.1, Wan2.1): what it cannot do here."""
    clips, video = cfg["dataset"] in ("tiny_video", "clipfolder"), is_video(m["unet"])
    if clips != video:
        raise ValueError(f"dataset={cfg['dataset']!r} has {'clips' if clips else 'images'}, but {m['pipeline']} is "
                         f"{'a video' if video else 'an image'} model")
    if video and (cfg["frames"] - 1) % 4:  # AutoencoderKLWan encodes the first frame, then chunks of 4 (the rest
        raise ValueError(f"frames={cfg['frames']}: a Wan clip has 1 + 4 k frames (its VAE encodes the first "  # lost)
                         "frame, then 4 at a time), e.g. 5, 33 or 81")
    f = vae_factor(m) * 2  # SD3's 2x2 patches, FLUX.1's 2x2 packing
    if cfg["resolution"] % f:
        raise ValueError(f"resolution={cfg['resolution']} is not a multiple of {f} (the VAE's downsampling x the "
                         "transformer's 2x2 patches)")
    for key, bad, why in (
            ("noising", cfg["noising"] != "forward", "DDIM inversion is for DDPM models; the flow ODE run backwards "
                                                     "is not implemented"),
            ("train_text_encoder", cfg["train_text_encoder"], "flow-model fine-tuning keeps the encoders frozen"),
            ("trained_modules", cfg["trained_modules"] != "all", "motion modules are AnimateDiff's"),
            ("eta", cfg["eta"] > 0 or cfg["self_sample_eta"] > 0, "the flow Euler sampler is deterministic"),
            ("compile_unet", cfg["compile_unet"] == "regional", "regional compilation knows the UNet's blocks"),
            ("channels_last", cfg["channels_last"] and video, "Conv3d has no channels_last format"),
            ("vae", cfg["vae"] and video, "a Wan VAE cannot be swapped for an AutoencoderKL")):
        if bad:
            raise ValueError(f"{key}={cfg[key]!r} with a {m['pipeline']} model: {why}")
