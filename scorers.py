"""
The paper's metrics (SSPO.md 7) on transformers classes alone: PickScore, HPSv2, LAION aesthetic, CLIP score and
ImageReward; for clips, PSNR, SSIM, FID and FVD against reference clips. Each loads from a local path (read with
local_files_only) or a hub id; weights that cannot be found come back as a `Skipped(reason, path)` instead of an
exception, so an evaluation says what it could not score.

    scorer = scorers.load("pickscore", scorers.WEIGHTS)     # or Skipped(reason, path)
    scorer(images, prompts)                                  # N PIL images, N prompts -> (N,) float tensor

No package ships these weights (NOTES.md). HPSv2's open_clip checkpoint and ImageReward's BLIP checkpoint are mapped
onto transformers' CLIPModel and BLIP classes by two pure functions, `hpsv2_state_dict_to_clip` and
`imagereward_state_dict_to_blip`; their docstrings are the mapping.
"""
import json
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from transformers import (BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel,
                          CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer)

# Where each scorer looks for its weights: an existing local path, else a hub id ('owner/repo' for a model folder,
# 'owner/repo/file' for one file). evaluate.py overrides any of them: --weights hpsv2=/models/HPS_v2_compressed.pt
WEIGHTS = {
    "pickscore": "yuvalkirstain/PickScore_v1",                      # CLIPModel: ViT-H/14 fine-tuned on Pick-a-Pic
    "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # its tokenizer, as PickScore's model card loads it
    "hpsv2": "xswu/HPSv2/HPS_v2_compressed.pt",                     # open_clip ViT-H-14 checkpoint, {'state_dict': ...}
    "hpsv2_clip": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",           # the transformers config + tokenizer it maps onto
    "aesthetic": "sac+logos+ava1-l14-linearMSE.pth",                 # LAION's MLP head; from the GitHub repo
                                                                     # christophschuhmann/improved-aesthetic-predictor
    "aesthetic_clip": "openai/clip-vit-large-patch14",               # the CLIP whose image embedding the head reads
    "clip": "openai/clip-vit-large-patch14",                         # CLIP score's model (torchmetrics' default)
    "imagereward": "THUDM/ImageReward",                              # folder or repo with ImageReward.pt, med_config.json
    "imagereward_tokenizer": "google-bert/bert-base-uncased",        # BLIP adds [DEC] and [ENC] to it (30,524 ids)
    # clips against reference clips (evaluate.py --references): the detectors FID's and FVD's reference code loads,
    # TorchScript files (see `detector`); no hub copies, so local paths only
    "fid": "inception-2015-12-05.pt",                                # NVlabs' StyleGAN2-ADA metrics: Inception-v3
    "fvd": "i3d_torchscript.pt",                                     # StyleGAN-V's FVD: I3D (Kinetics-400)
}
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward v1.0's normalisation


class Skipped(NamedTuple):
    reason: str
    path: str


class NotFound(Exception):
    """(reason, path): the weights are not there. Anything else that goes wrong while loading is a real error."""


# -----------------------------------------------------------------------------------------------------------------
# preprocessing (SSPO.md 7), on transformers' PIL backend: no torchvision

def clip_preprocess(images, size=224):
    """PickScore, aesthetic, CLIP score, ImageReward: shortest side to `size` (bicubic), center crop, CLIP mean/std.
    N PIL images -> (N, 3, size, size) float32."""
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return proc(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values


def hpsv2_preprocess(images, size=224):
    """HPSv2 (open_clip's ResizeMaxSize): longest side to `size` (bicubic), zero (black) padding to a square, the
    odd pixel of the padding on the right/bottom, then CLIP mean/std: padding is black before normalisation, as in
    open_clip. Unlike open_clip, an image whose longest side already is `size` is padded too, so all come out square."""
    out = []
    for im in images:
        im = im.convert("RGB")
        s = size / max(im.size)
        w, h = round(im.width * s), round(im.height * s)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(im.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
        out.append(canvas)
    return CLIPImageProcessorPil(do_resize=False, do_center_crop=False)(images=out, return_tensors="pt").pixel_values


# -----------------------------------------------------------------------------------------------------------------
# finding weights: a local path, else the hub (or its cache)

def _pretrained(cls, spec, **kw):
    """cls.from_pretrained: an existing folder with local_files_only, else spec as an 'owner/repo' hub id."""
    if os.path.exists(spec):
        return cls.from_pretrained(spec, local_files_only=True, **kw)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise NotFound("no such folder", os.path.abspath(spec))
    try:
        return cls.from_pretrained(spec, **kw)
    except OSError as e:
        raise NotFound(f"not a local folder, and hub id not loadable ({str(e).strip().splitlines()[0]})", spec)


def _file(spec):
    """An existing local file, else 'owner/repo/file' downloaded from the hub (or found in its cache)."""
    if os.path.isfile(spec):
        return spec
    if spec.startswith((".", "/", "~")) or spec.count("/") < 2:
        raise NotFound("no such file", os.path.abspath(spec))
    from huggingface_hub import hf_hub_download
    owner, repo, name = spec.split("/", 2)
    try:
        return hf_hub_download(f"{owner}/{repo}", name)
    except Exception as e:  # offline, no such repo or file: all mean "not found"
        raise NotFound(f"not a local file, and not on the hub ({str(e).strip().splitlines()[0]})", spec)


def _read_state_dict(path):
    """A .safetensors file or a torch pickle of tensors (read with weights_only)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _load(module, sd, source):
    """load_state_dict(strict), its error cut to one line naming the file and the first keys that do not fit."""
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes: the second line of torch's message names the first key that does not fit
        raise ValueError(f"{source}: weights do not fit: {str(e).splitlines()[1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
                         f" ({len(missing)} missing, {len(unexpected)} unexpected)")
    return module


def _clip_embeddings(clip, pixel_values, tokenizer, prompts):
    """L2-normalised projected (image, text) embeddings of a transformers CLIPModel."""
    t = tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(clip.device)
    img = clip.visual_projection(clip.vision_model(pixel_values=pixel_values.to(clip.device)).pooler_output)
    txt = clip.text_projection(clip.text_model(input_ids=t.input_ids, attention_mask=t.attention_mask).pooler_output)
    return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)


def laion_mlp(sd, source):
    """LAION's improved-aesthetic-predictor head, also ImageReward's: five Linear layers, Dropout between the first
    four, no nonlinearity (upstream's ReLUs are commented out). Keys layers.{0,2,4,6,7}.{weight,bias}; the input
    width is read from layers.0.weight (768 for CLIP ViT-L/14 and for ImageReward's BERT)."""
    if "layers.0.weight" not in sd:
        raise ValueError(f"{source}: no key 'layers.0.weight' (has: {', '.join(list(sd)[:5])}): not LAION's MLP head")
    mlp = nn.Sequential(nn.Linear(sd["layers.0.weight"].shape[1], 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                        nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return _load(mlp, {k.removeprefix("layers."): v for k, v in sd.items()}, source).eval()


# -----------------------------------------------------------------------------------------------------------------
# the scorers: each takes WEIGHTS (or a copy with overrides) and a device, returns score(images, prompts) -> (N,)

def pickscore(weights, device="cpu"):
    """PickScore (Kirstain et al. 2023): logit_scale.exp() x cosine(text, image), about 21 for SD1.5 (SSPO.md 7)."""
    clip = _pretrained(CLIPModel, weights["pickscore"]).to(device).eval()
    tok = _pretrained(CLIPTokenizer, weights["pickscore_processor"])

    @torch.no_grad()
    def score(images, prompts):
        img, txt = _clip_embeddings(clip, clip_preprocess(images, clip.config.vision_config.image_size), tok, prompts)
        return clip.logit_scale.exp().float().cpu() * (img * txt).sum(-1).cpu()
    return score


def clip_score(weights, device="cpu"):
    """CLIP score (Hessel et al. 2021, torchmetrics' convention): 100 x max(cosine(text, image), 0)."""
    clip = _pretrained(CLIPModel, weights["clip"]).to(device).eval()
    tok = _pretrained(CLIPTokenizer, weights["clip"])

    @torch.no_grad()
    def score(images, prompts):
        img, txt = _clip_embeddings(clip, clip_preprocess(images, clip.config.vision_config.image_size), tok, prompts)
        return 100 * (img * txt).sum(-1).clamp(min=0).cpu()
    return score


def hpsv2(weights, device="cpu"):
    """HPSv2 (Wu et al. 2023): 100 x cosine(text, image) of open_clip's ViT-H-14 fine-tuned on HPD v2 (the papers
    report x100: about 27 for SD1.5), with longest-side + zero-pad preprocessing. The checkpoint ({'state_dict': ...}
    as hpsv2 saves it, or the bare dict) is mapped onto a CLIPModel built from hpsv2_clip's config."""
    ckpt = _file(weights["hpsv2"])
    config = _pretrained(CLIPConfig, weights["hpsv2_clip"])
    tok = _pretrained(CLIPTokenizer, weights["hpsv2_clip"])
    sd = _read_state_dict(ckpt)
    sd = sd.get("state_dict", sd)
    clip = _load(CLIPModel(config), hpsv2_state_dict_to_clip(sd, ckpt), ckpt).to(device).eval()

    @torch.no_grad()
    def score(images, prompts):
        img, txt = _clip_embeddings(clip, hpsv2_preprocess(images, config.vision_config.image_size), tok, prompts)
        return 100 * (img * txt).sum(-1).cpu()
    return score


def aesthetic(weights, device="cpu"):
    """LAION aesthetic predictor v2: the MLP head on the L2-normalised CLIP ViT-L/14 image embedding (1-10 scale)."""
    head = _file(weights["aesthetic"])
    clip = _pretrained(CLIPModel, weights["aesthetic_clip"]).to(device).eval()
    mlp = laion_mlp(_read_state_dict(head), head).to(device)

    @torch.no_grad()
    def score(images, prompts):
        px = clip_preprocess(images, clip.config.vision_config.image_size).to(device)
        emb = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=px).pooler_output).float(), dim=-1)
        return mlp(emb).squeeze(-1).cpu()
    return score


def imagereward(weights, device="cpu"):
    """ImageReward v1.0 (Xu et al. 2023): BLIP's BERT text encoder reads the prompt (35 tokens) with cross-attention
    to the ViT-L/16 image features; the MLP head scores its [CLS] state: (MLP(h_CLS) - mean) / std. The prompt is
    not prefixed with [ENC] (ImageReward's score() passes the tokenizer's ids as they are)."""
    root = weights["imagereward"].rstrip("/")
    ckpt, med = _file(f"{root}/ImageReward.pt"), _file(f"{root}/med_config.json")
    tok = _pretrained(BertTokenizer, weights["imagereward_tokenizer"])
    tok.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer(): the same two tokens, in this order
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    with open(med) as f:
        med_config = json.load(f)
    net = imagereward_model(imagereward_state_dict_to_blip(_read_state_dict(ckpt), ckpt), med_config, ckpt)
    if med_config["vocab_size"] != len(tok):
        raise ValueError(f"{weights['imagereward_tokenizer']}: {len(tok)} tokens with [DEC] and [ENC], but {med} "
                         f"says vocab_size {med_config['vocab_size']}")
    net.to(device).eval()
    size = net.vision_model.config.image_size

    @torch.no_grad()
    def score(images, prompts):
        t = tok(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt").to(device)
        img = net.vision_model(pixel_values=clip_preprocess(images, size).to(device)).last_hidden_state
        h = net.text_encoder(input_ids=t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=img,
                             encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long, device=device))
        reward = net.mlp(h.last_hidden_state[:, 0].float()).squeeze(-1)
        return ((reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).cpu()
    return score


SCORERS = {"pickscore": pickscore, "hpsv2": hpsv2, "aesthetic": aesthetic, "clip": clip_score,
           "imagereward": imagereward}


def load(name, weights=WEIGHTS, device="cpu"):
    """-> score(images, prompts), or Skipped(reason, path) when its weights are not found. Weights that are found
    but do not fit raise ValueError, one line naming the file and the keys."""
    try:
        return SCORERS[name](weights, device)
    except NotFound as e:
        return Skipped(*e.args)


# -----------------------------------------------------------------------------------------------------------------
# clips against reference clips (the paper's video table): PSNR and SSIM per clip, FID over frames, FVD over clips

REFERENCE_METRICS = ("psnr", "ssim", "fid", "fvd")


def psnr(x, y):
    """uint8 clips (N, F, H, W, 3) (or images) and their references -> (N,) PSNR in dB over all frames and pixels,
    peak 255; identical ones score 100 dB (the MSE floored at 255^2 * 1e-10)."""
    d = (torch.as_tensor(x).double() - torch.as_tensor(y).double()).flatten(1)
    return 10 * torch.log10(255 ** 2 / (d ** 2).mean(1).clamp_min(255 ** 2 * 1e-10))


def ssim(x, y, window=11, sigma=1.5):
    """uint8 clips (N, F, H, W, 3) (or images) and their references -> (N,) SSIM (Wang et al. 2004: Gaussian window
    11 x 11 of sigma 1.5, K1 0.01, K2 0.03, peak 255, valid positions), the mean over channels, positions and frames.
    Frames smaller than the window take a window of their size."""
    n = len(x)
    x, y = (torch.as_tensor(a).double().reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2) for a in (x, y))
    k = min(window, *x.shape[-2:])
    g = torch.exp(-(torch.arange(k, dtype=torch.float64) - (k - 1) / 2) ** 2 / (2 * sigma ** 2))
    w = (torch.outer(g, g) / g.sum() ** 2).expand(3, 1, k, k)
    blur = lambda a: F.conv2d(a, w, groups=3)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(1)


def frechet_distance(a, b):
    """Features (N, D) and (M, D) -> the Frechet distance of the Gaussians fitted to them, FID's and FVD's formula
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64. tr (S_a S_b)^(1/2) is computed as the trace
    of the root of the symmetric S_a^(1/2) S_b S_a^(1/2) (the same eigenvalues): no scipy."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a Frechet distance needs 2 or more samples a side, got {len(a)} and {len(b)}")
    s_a, s_b = (torch.atleast_2d(torch.cov(f.T)) for f in (a, b))
    e, v = torch.linalg.eigh(s_a)
    r = (v * e.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(r @ s_b @ r).clamp_min(0).sqrt().sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + s_a.trace() + s_b.trace() - 2 * cross)


def detector(name, weights=WEIGHTS, device="cpu"):
    """-> features(clips) for 'fid' or 'fvd', or Skipped(reason, path) when the TorchScript file is not found.
    uint8 clips (N, F, H, W, 3) -> float64 features: 'fid' one row per frame, from NVlabs' inception-2015-12-05.pt
    called as their metrics call it (uint8 (n, 3, H, W), return_features=True: 2048 pool features; it resizes to 299
    itself); 'fvd' one row per clip, from StyleGAN-V's i3d_torchscript.pt as StyleGAN-V calls it (frames resized to
    224 x 224, (N, 3, F, 224, 224) in [-1, 1], rescale=False, resize=False, return_features=True: 400 logits)."""
    try:
        path = _file(weights[name])
    except NotFound as e:
        return Skipped(*e.args)
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript; these detectors are shipped as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(path, map_location=device).eval()
    except Exception as e:
        raise ValueError(f"{path}: not a TorchScript file ({type(e).__name__}: {str(e).strip().splitlines()[0]})") from None

    @torch.no_grad()
    def features(clips):
        x = torch.as_tensor(clips).to(device)
        try:
            if name == "fid":
                return net(x.flatten(0, 1).permute(0, 3, 1, 2).contiguous(), return_features=True).double().cpu()
            v = F.interpolate(x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1, size=(x.shape[1], 224, 224),
                              mode="trilinear", align_corners=False)
            return net(v, rescale=False, resize=False, return_features=True).double().cpu()
        except RuntimeError as e:
            raise ValueError(f"{path}: failed on clips of shape {tuple(x.shape)} (N, F, H, W, 3): "
                             f"{str(e).strip().splitlines()[-1]}") from None
    return features


# -----------------------------------------------------------------------------------------------------------------
# weight mappings (pure functions)

_OPEN_CLIP = {  # open_clip name -> transformers CLIPModel name, outside the residual blocks
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",  # open_clip's conv1 has no bias
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_OPEN_CLIP_T = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}  # x @ W
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def hpsv2_state_dict_to_clip(sd, source="HPSv2 checkpoint"):
    """open_clip CLIP state dict (HPSv2's ViT-H-14) -> transformers CLIPModel state dict. Outside the blocks, the
    names in _OPEN_CLIP; the projections open_clip applies as x @ W (visual.proj (width, dim), text_projection) are
    transposed into nn.Linear weights. In each residual block, visual.transformer.resblocks.N. ->
    vision_model.encoder.layers.N. and transformer.resblocks.N. -> text_model.encoder.layers.N., with
    ln_1/ln_2 -> layer_norm1/2, mlp.c_fc/c_proj -> mlp.fc1/fc2, attn.out_proj -> self_attn.out_proj, and the fused
    attn.in_proj_weight/bias (3 x width rows, q then k then v, as nn.MultiheadAttention packs them) split into
    self_attn.{q,k,v}_proj. A 'module.' prefix (DDP) is dropped; any other key is an error."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k in _OPEN_CLIP:
            out[_OPEN_CLIP[k]] = v
        elif k in _OPEN_CLIP_T:
            out[_OPEN_CLIP_T[k]] = v.t().contiguous()
        elif k.startswith(("visual.transformer.resblocks.", "transformer.resblocks.")):
            tower = "vision_model" if k.startswith("visual.") else "text_model"
            i, name = k.removeprefix("visual.").removeprefix("transformer.resblocks.").split(".", 1)
            prefix = f"{tower}.encoder.layers.{i}."
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for proj, w in zip("qkv", v.chunk(3)):
                    out[f"{prefix}self_attn.{proj}_proj.{name.removeprefix('attn.in_proj_')}"] = w.contiguous()
            elif name.rsplit(".", 1)[0] in _OPEN_CLIP_BLOCK:
                module, param = name.rsplit(".", 1)
                out[f"{prefix}{_OPEN_CLIP_BLOCK[module]}.{param}"] = v
            else:
                raise ValueError(f"{source}: unexpected key {k!r} in an open_clip residual block")
        elif k != "attn_mask":  # a buffer some open_clip versions saved
            raise ValueError(f"{source}: unexpected key {k!r}: not an open_clip CLIP state dict")
    return out


_BLIP_VIT = [  # BLIP's timm-style ViT (models/vit.py) -> transformers BlipVisionModel; transformers' own BLIP
    # conversion script renames the same way (its rename_key), then loads strictly
    ("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj", "embeddings.patch_embedding"), ("blocks.", "encoder.layers."), (".norm1", ".layer_norm1"),
    (".norm2", ".layer_norm2"), (".attn.qkv", ".self_attn.qkv"), (".attn.proj", ".self_attn.projection"),
]


def imagereward_state_dict_to_blip(sd, source="ImageReward checkpoint"):
    """ImageReward.pt (THUDM/ImageReward v1.0: keys blip.visual_encoder.*, blip.text_encoder.*, blip.vision_proj,
    blip.text_proj, mlp.layers.*) -> one state dict with BlipForImageTextRetrieval's prefixes:
      blip.visual_encoder.cls_token / pos_embed    -> vision_model.embeddings.class_embedding / position_embedding
      blip.visual_encoder.patch_embed.proj.*       -> vision_model.embeddings.patch_embedding.*
      blip.visual_encoder.blocks.N.norm1 / norm2   -> vision_model.encoder.layers.N.layer_norm1 / layer_norm2
      blip.visual_encoder.blocks.N.attn.qkv        -> ...layers.N.self_attn.qkv (fused q, k, v: the same layout)
      blip.visual_encoder.blocks.N.attn.proj       -> ...layers.N.self_attn.projection
      blip.visual_encoder.blocks.N.mlp.fc1 / fc2   -> ...layers.N.mlp.fc1 / fc2
      blip.visual_encoder.norm                     -> vision_model.post_layernorm
      blip.text_encoder.*                          -> text_encoder.* unchanged: transformers' BlipTextModel is a port
                                                      of BLIP's med.py BertModel and keeps its names, crossattention too
      mlp.layers.*                                 -> mlp.layers.*
    Dropped: blip.vision_proj and blip.text_proj (contrastive projections the score does not use) and position_ids
    buffers. Checked offline only against this mapping's inverse and BLIP's published module names, not against the
    real ImageReward.pt (not available here)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blip.visual_encoder."):
            k = k[len("blip.visual_encoder."):]
            if k.startswith("norm."):
                k = "post_layernorm." + k[5:]
            for old, new in _BLIP_VIT:
                k = k.replace(old, new)
            out["vision_model." + k] = v
        elif k.startswith("blip.text_encoder."):
            if not k.endswith("position_ids"):
                out["text_encoder." + k[len("blip.text_encoder."):]] = v
        elif k.startswith("mlp.layers."):
            out[k] = v
        elif k.split(".")[:2] not in (["blip", "vision_proj"], ["blip", "text_proj"]):
            raise ValueError(f"{source}: unexpected key {k!r}: not an ImageReward (BLIP + MLP) state dict")
    return out


class _ImageReward(nn.Module):
    def __init__(self, vision, text):
        super().__init__()
        self.vision_model, self.text_encoder, self.mlp = BlipVisionModel(vision), BlipTextModel(text, False), None


def imagereward_model(sd, med_config, source="ImageReward checkpoint"):
    """The mapped state dict + BLIP's med_config.json -> a module with vision_model (BlipVisionModel), text_encoder
    (BlipTextModel with cross-attention, no pooler) and mlp. The ViT's shape is read from the weights: width, depth,
    patch and image size are; the head count is not stored, and is width / 64 as in BLIP's ViT-B and ViT-L (16 for
    ImageReward's ViT-L). LayerNorm eps 1e-6 as BLIP's ViT; the text encoder's cross-attention width is the ViT's,
    as BLIP sets encoder_width = vision_width."""
    try:
        width = sd["vision_model.embeddings.class_embedding"].shape[-1]
        patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        n_pos = sd["vision_model.embeddings.position_embedding"].shape[1]
        mlp_width = sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{source}: no key {e.args[0]!r}: not an ImageReward (BLIP) checkpoint") from None
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=mlp_width, num_hidden_layers=depth,
                              num_attention_heads=max(1, width // 64), patch_size=patch,
                              image_size=round((n_pos - 1) ** 0.5) * patch, layer_norm_eps=1e-6, hidden_act="gelu")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    missing = [k for k in keys if k not in med_config]
    if missing:
        raise ValueError(f"med_config.json lacks {', '.join(missing)}")
    text = BlipTextConfig(**{k: med_config[k] for k in keys}, encoder_hidden_size=width, is_decoder=True)
    net = _load(_ImageReward(vision, text), {k: v for k, v in sd.items() if not k.startswith("mlp.")}, source)
    net.mlp = laion_mlp({k[4:]: v for k, v in sd.items() if k.startswith("mlp.")}, source)
    return net
