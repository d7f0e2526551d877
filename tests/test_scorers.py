"""scorers.py: preprocessing against values computed by hand, every scorer loaded from tiny random weights saved to
disk, the HPSv2 mapping against an open_clip-style forward written here, the ImageReward mapping through its inverse,
and missing weights reported as Skipped."""
import json
import os

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from transformers import (BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel, CLIPConfig,
                          CLIPModel)

import scorers
from tiny import build

MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right"]
PROMPTS = ["a red circle on the left", "a blue square on the right", "a blue circle"]


def normalise(x):
    """uint8 (H, W, 3) -> (3, H, W) float64 with CLIP's mean and std."""
    return ((np.asarray(x, np.float64) / 255 - MEAN) / STD).transpose(2, 0, 1)


def photo(w, h, seed=0):
    """A smooth random RGB image (so bicubic resizing changes it), w x h."""
    x = np.random.default_rng(seed).integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(x).resize((w, h), Image.BILINEAR)


def images(n=3):
    return [photo(64 + 32 * i, 64, seed=i) for i in range(n)]


# -----------------------------------------------------------------------------------------------------------------
# preprocessing

def test_clip_preprocess_is_shortest_side_bicubic_then_center_crop():
    im = photo(600, 300)  # -> 448 x 224 (shortest side 224, bicubic), then columns 112..335
    px = scorers.clip_preprocess([im])
    assert px.shape == (1, 3, 224, 224) and px.dtype == torch.float32
    want = normalise(im.resize((448, 224), Image.BICUBIC))[:, :, 112:336]
    np.testing.assert_allclose(px[0].numpy(), want, atol=2e-6)


def test_hpsv2_preprocess_is_longest_side_bicubic_then_zero_pad():
    im = photo(600, 300)  # -> 224 x 112 (longest side 224, bicubic), 56 black rows above and below
    px = scorers.hpsv2_preprocess([im])
    assert px.shape == (1, 3, 224, 224)
    black = normalise(np.zeros((1, 1, 3)))[:, 0, 0]  # zero padding is black pixels, normalised: -mean/std
    np.testing.assert_allclose(px[0, :, :56].numpy(), np.broadcast_to(black[:, None, None], (3, 56, 224)), atol=2e-6)
    np.testing.assert_allclose(px[0, :, 168:].numpy(), np.broadcast_to(black[:, None, None], (3, 56, 224)), atol=2e-6)
    np.testing.assert_allclose(px[0, :, 56:168].numpy(), normalise(im.resize((224, 112), Image.BICUBIC)), atol=2e-6)
    # the two differ on the same image: the crop loses the sides, the pad keeps them
    assert not torch.allclose(px, scorers.clip_preprocess([im]))
    # an odd padding puts the extra row at the bottom; an image already 224 long is not resized
    px = scorers.hpsv2_preprocess([photo(224, 113)])
    assert (px[0, :, 54] == px[0, :, 0]).all() and (px[0, :, 168] == px[0, :, 0]).all()  # 55 rows above, 56 below
    np.testing.assert_allclose(px[0, :, 55:168].numpy(), normalise(photo(224, 113)), atol=2e-6)


# -----------------------------------------------------------------------------------------------------------------
# tiny random weights on disk

def tiny_clip(path, seed=0):
    """A random CLIPModel with image_size 224 (the real preprocessing), 2 layers of width 32, and a real
    CLIPTokenizer, saved to `path` with save_pretrained."""
    torch.manual_seed(seed)
    tok = build.build_tokenizer(WORDS, path)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32, hidden_act="gelu"),
        projection_dim=16)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(path)
    return clip, tok


def reference_logits(clip, tok, px, prompts):
    """CLIPModel's own forward: logit_scale.exp() x cosine, per (image, prompt) pair."""
    t = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return clip(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=px).logits_per_image.diag()


def test_pickscore_and_clip_score_from_a_tiny_clip(tmp_path):
    clip, tok = tiny_clip(str(tmp_path / "clip"))
    w = dict(scorers.WEIGHTS, pickscore=str(tmp_path / "clip"), pickscore_processor=str(tmp_path / "clip"),
             clip=str(tmp_path / "clip"))
    logits = reference_logits(clip, tok, scorers.clip_preprocess(images()), PROMPTS)
    s = scorers.load("pickscore", w)(images(), PROMPTS)
    assert s.shape == (3,)
    torch.testing.assert_close(s, logits, atol=1e-4, rtol=1e-4)
    cos = logits / clip.logit_scale.exp().item()
    torch.testing.assert_close(scorers.load("clip", w)(images(), PROMPTS), 100 * cos.clamp(min=0), atol=1e-3, rtol=1e-4)


class LaionHead(nn.Module):
    def __init__(self, d):  # the layout of LAION's MLP module: its state dict keys are layers.N.*
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def test_aesthetic_from_a_tiny_clip_and_a_random_head(tmp_path):
    clip, _ = tiny_clip(str(tmp_path / "clip"))
    head = LaionHead(16).eval()
    torch.save(head.state_dict(), tmp_path / "head.pth")
    w = dict(scorers.WEIGHTS, aesthetic=str(tmp_path / "head.pth"), aesthetic_clip=str(tmp_path / "clip"))
    with torch.no_grad():
        emb = clip.get_image_features(pixel_values=scorers.clip_preprocess(images())).pooler_output
        want = head.layers(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scorers.load("aesthetic", w)(images(), PROMPTS), want, atol=1e-5, rtol=1e-5)
    # a head file of another kind is a one-line error naming the file
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth: no key 'layers.0.weight'"):
        scorers.load("aesthetic", dict(w, aesthetic=str(tmp_path / "bad.pth")))


# -----------------------------------------------------------------------------------------------------------------
# HPSv2: open_clip names

def clip_to_open_clip(sd):
    """The inverse of the mapping under test, written out name by name: transformers CLIPModel -> open_clip CLIP."""
    out = {"logit_scale": sd["logit_scale"], "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].t(), "text_projection": sd["text_projection.weight"].t(),
           "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"]}
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = sd[f"vision_model.pre_layrnorm.{p}"]
        out[f"visual.ln_post.{p}"] = sd[f"vision_model.post_layernorm.{p}"]
        out[f"ln_final.{p}"] = sd[f"text_model.final_layer_norm.{p}"]
        for oc, hf in (("visual.transformer", "vision_model.encoder"), ("transformer", "text_model.encoder")):
            for i in range(2):
                a, b = f"{oc}.resblocks.{i}.", f"{hf}.layers.{i}."
                out[f"{a}attn.in_proj_{p}"] = torch.cat([sd[f"{b}self_attn.{x}_proj.{p}"] for x in "qkv"])
                for o, h in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{a}{o}.{p}"] = sd[f"{b}{h}.{p}"]
    return {k: v.clone() for k, v in out.items()}


def open_clip_forward(sd, px, ids, heads=2):
    """open_clip's encode_image / encode_text on open_clip-named weights: nn.MultiheadAttention for the packed
    in_proj, x @ proj for the projections, a causal text mask and pooling at the highest token id (the EOT)."""
    def block(x, p, mask=None):
        ln = lambda x, n: F.layer_norm(x, x.shape[-1:], sd[f"{p}{n}.weight"], sd[f"{p}{n}.bias"])
        mha = nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
        mha.load_state_dict({k: sd[f"{p}attn.{k}"] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                              "out_proj.bias")})
        h = ln(x, "ln_1")
        x = x + mha(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = F.gelu(F.linear(ln(x, "ln_2"), sd[f"{p}mlp.c_fc.weight"], sd[f"{p}mlp.c_fc.bias"]))
        return x + F.linear(h, sd[f"{p}mlp.c_proj.weight"], sd[f"{p}mlp.c_proj.bias"])

    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], sd[f"{n}.weight"], sd[f"{n}.bias"])
    x = F.conv2d(px, sd["visual.conv1.weight"], stride=32).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = ln(x, "visual.ln_pre")
    for i in range(2):
        x = block(x, f"visual.transformer.resblocks.{i}.")
    img = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:ids.shape[1]]
    causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)
    for i in range(2):
        x = block(x, f"transformer.resblocks.{i}.", causal)
    txt = ln(x, "ln_final")[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_hpsv2_maps_an_open_clip_checkpoint(tmp_path):
    clip, tok = tiny_clip(str(tmp_path / "clip"))
    oc = clip_to_open_clip(clip.state_dict())
    torch.save({"state_dict": oc}, tmp_path / "hps.pt")
    mapped = scorers.hpsv2_state_dict_to_clip(oc)
    assert mapped.keys() == clip.state_dict().keys()
    assert all(torch.equal(mapped[k], v) for k, v in clip.state_dict().items())
    px = scorers.hpsv2_preprocess(images())
    t = tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")  # open_clip pads to 77
    with torch.no_grad():
        img, txt = open_clip_forward(oc, px, t.input_ids)
    w = dict(scorers.WEIGHTS, hpsv2=str(tmp_path / "hps.pt"), hpsv2_clip=str(tmp_path / "clip"))
    torch.testing.assert_close(scorers.load("hpsv2", w)(images(), PROMPTS), 100 * (img * txt).sum(-1),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"unexpected key 'visual.head.weight'"):
        scorers.hpsv2_state_dict_to_clip({**oc, "visual.head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"^hps.pt: weights do not fit: size mismatch for logit_scale"):
        scorers._load(clip, {**clip.state_dict(), "logit_scale": torch.zeros(2)}, "hps.pt")
    with pytest.raises(ValueError, match=r"^hps.pt: weights do not fit: missing \['logit_scale'\], unexpected \[\]"):
        scorers._load(clip, {k: v for k, v in clip.state_dict().items() if k != "logit_scale"}, "hps.pt")


# -----------------------------------------------------------------------------------------------------------------
# ImageReward: BLIP names

def blip_to_imagereward(vision_sd, text_sd, mlp_sd):
    """The inverse of the mapping under test: transformers BLIP names -> ImageReward.pt's BLIP (timm ViT, med.py BERT)."""
    out = {}
    for k, v in vision_sd.items():
        for hf, blip in (("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                         ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
                         ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.qkv", "attn.qkv"),
                         ("self_attn.projection", "attn.proj"), ("post_layernorm", "norm")):
            k = k.replace(hf, blip)
        out["blip.visual_encoder." + k] = v
    out.update({"blip.text_encoder." + k: v for k, v in text_sd.items()})
    out.update({"mlp." + k: v for k, v in mlp_sd.items()})
    return out


def tiny_imagereward(path, seed=0):
    """path/ImageReward.pt + med_config.json in ImageReward's layout (from tiny random transformers BLIP parts and a
    LAION-style head, through the inverse mapping) and path/bert, a BERT tokenizer without [DEC]/[ENC]."""
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(os.path.join(path, "vocab.txt")).save_pretrained(os.path.join(path, "bert"))
    med = dict(vocab_size=len(WORDS) + 7, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu",
               pad_token_id=0, type_vocab_size=2, encoder_width=64, add_cross_attention=True)
    with open(os.path.join(path, "med_config.json"), "w") as f:
        json.dump(med, f)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=1, image_size=224, patch_size=32,
                                              layer_norm_eps=1e-6)).eval()
    text = BlipTextModel(BlipTextConfig(**{k: med[k] for k in list(med)[:9]}, encoder_hidden_size=64),
                         add_pooling_layer=False).eval()
    head = LaionHead(32).eval()
    sd = blip_to_imagereward(vision.state_dict(), text.state_dict(), head.state_dict())
    sd["blip.vision_proj.weight"], sd["blip.text_proj.weight"] = torch.zeros(8, 64), torch.zeros(8, 32)  # dropped
    torch.save(sd, os.path.join(path, "ImageReward.pt"))
    return vision, text, head


def save_tiny_scorers(path):
    """Tiny random weights for every scorer under `path` -> the WEIGHTS overrides that point at them."""
    tiny_clip(os.path.join(path, "clip"))
    clip, _ = tiny_clip(os.path.join(path, "clip_h"), seed=1)  # PickScore's / HPSv2's stand-in
    torch.save({"state_dict": clip_to_open_clip(clip.state_dict())}, os.path.join(path, "hps.pt"))
    torch.save(LaionHead(16).state_dict(), os.path.join(path, "head.pth"))
    tiny_imagereward(os.path.join(path, "ir"))
    p = lambda *a: os.path.join(path, *a)
    return {"pickscore": p("clip_h"), "pickscore_processor": p("clip_h"), "hpsv2": p("hps.pt"), "hpsv2_clip": p("clip_h"),
            "aesthetic": p("head.pth"), "aesthetic_clip": p("clip"), "clip": p("clip"), "imagereward": p("ir"),
            "imagereward_tokenizer": p("ir", "bert")}


def test_imagereward_from_an_original_style_checkpoint(tmp_path):
    vision, text, head = tiny_imagereward(str(tmp_path / "ir"))
    tok = BertTokenizer.from_pretrained(str(tmp_path / "ir" / "bert"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    t = tok(PROMPTS, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = vision(pixel_values=scorers.clip_preprocess(images())).last_hidden_state
        h = text(input_ids=t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=img).last_hidden_state
        want = (head.layers(h[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    w = dict(scorers.WEIGHTS, imagereward=str(tmp_path / "ir"), imagereward_tokenizer=str(tmp_path / "ir" / "bert"))
    torch.testing.assert_close(scorers.load("imagereward", w)(images(), PROMPTS), want, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------------------------------------------
# missing weights

def test_missing_weights_are_skipped_with_the_path_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a hub id fails now, without retries
    clip, _ = tiny_clip(str(tmp_path / "clip"))
    missing = str(tmp_path / "nowhere" / "head.pth")
    s = scorers.load("aesthetic", dict(scorers.WEIGHTS, aesthetic=missing, aesthetic_clip=str(tmp_path / "clip")))
    assert s == scorers.Skipped("no such file", missing)
    s = scorers.load("pickscore", dict(scorers.WEIGHTS, pickscore=str(tmp_path / "no_model")))
    assert s == scorers.Skipped("no such folder", str(tmp_path / "no_model"))
    s = scorers.load("clip", dict(scorers.WEIGHTS, clip="nobody-here/no-such-model"))
    assert isinstance(s, scorers.Skipped) and s.path == "nobody-here/no-such-model" and "hub id" in s.reason
    s = scorers.load("hpsv2", dict(scorers.WEIGHTS, hpsv2="nobody-here/no-such-repo/HPS_v2_compressed.pt"))
    assert isinstance(s, scorers.Skipped) and s.path == "nobody-here/no-such-repo/HPS_v2_compressed.pt"
    s = scorers.load("imagereward", dict(scorers.WEIGHTS, imagereward=str(tmp_path / "ir")))
    assert s == scorers.Skipped("no such file", str(tmp_path / "ir" / "ImageReward.pt"))


# -----------------------------------------------------------------------------------------------------------------
# clips against references: PSNR, SSIM, the Frechet distance, the TorchScript detectors

def test_psnr_and_ssim_against_hand_values():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, (2, 3, 16, 16, 3)).astype(np.uint8)  # 2 clips of 3 frames
    assert torch.allclose(scorers.psnr(x, x), torch.full((2,), 100.0, dtype=torch.float64))
    assert torch.allclose(scorers.psnr(x, x + 10), torch.full((2,), 10 * np.log10(255 ** 2 / 100), dtype=torch.float64))
    assert torch.allclose(scorers.ssim(x, x), torch.ones(2, dtype=torch.float64))
    # one 11 x 11 window: SSIM written out with the Gaussian weights, per channel, then averaged
    a, b = rng.integers(0, 256, (1, 1, 11, 11, 3)), rng.integers(0, 256, (1, 1, 11, 11, 3))
    g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / g.sum() ** 2
    want = []
    for c in range(3):
        p, q = a[0, 0, :, :, c].astype(float), b[0, 0, :, :, c].astype(float)
        mp, mq = (w * p).sum(), (w * q).sum()
        vp, vq, cpq = (w * p * p).sum() - mp ** 2, (w * q * q).sum() - mq ** 2, (w * p * q).sum() - mp * mq
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        want.append((2 * mp * mq + c1) * (2 * cpq + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
    assert abs(scorers.ssim(a, b).item() - np.mean(want)) < 1e-12
    noisy = np.clip(x + rng.normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    assert (scorers.ssim(x, noisy) < 0.95).all() and (scorers.psnr(x, noisy) < 30).all()


def test_frechet_distance_against_the_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (500, 1)), rng.normal(2, 3, (400, 1))
    want = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2  # 1-D: |mu|^2 + (s_a - s_b)^2
    assert abs(scorers.frechet_distance(a, b) - want) < 1e-9
    a, b = rng.normal(0, 1, (300, 5)) @ rng.normal(0, 1, (5, 5)), rng.normal(1, 1, (200, 5)) @ rng.normal(0, 1, (5, 5))
    s_a, s_b = np.cov(a.T), np.cov(b.T)
    cross = np.sqrt(np.linalg.eigvals(s_a @ s_b).real).sum()  # tr sqrtm(S_a S_b), from the non-symmetric product
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    assert abs(scorers.frechet_distance(a, b) - want) < 1e-8 * want
    assert abs(scorers.frechet_distance(a, a)) < 1e-8
    with pytest.raises(ValueError, match="2 or more"):
        scorers.frechet_distance(a[:1], b)


class _Inception(nn.Module):  # inception-2015-12-05.pt's call: uint8 (n, 3, H, W), return_features
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


class _I3D(nn.Module):  # i3d_torchscript.pt's call: (N, 3, F, 224, 224) in [-1, 1], rescale, resize, return_features
    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert x.shape[-1] == 224 and x.shape[-2] == 224 and x.min() >= -1 and x.max() <= 1
        return x.mean(dim=(3, 4)).flatten(1)


def fake_detectors(root):
    """TorchScript stand-ins for the FID and FVD detectors, saved as the real ones are shipped."""
    paths = {"fid": os.path.join(root, "inception.pt"), "fvd": os.path.join(root, "i3d.pt")}
    torch.jit.script(_Inception()).save(paths["fid"])
    torch.jit.script(_I3D()).save(paths["fvd"])
    return paths


def test_detectors_load_torchscript_or_say_what_is_missing(tmp_path):
    paths = fake_detectors(str(tmp_path))
    clips = np.random.default_rng(0).integers(0, 256, (2, 4, 16, 16, 3)).astype(np.uint8)
    fid = scorers.detector("fid", {"fid": paths["fid"]})(clips)
    assert fid.shape == (8, 3) and torch.allclose(fid[0], torch.as_tensor(clips[0, 0], dtype=torch.float64).mean((0, 1)))
    assert scorers.detector("fvd", {"fvd": paths["fvd"]})(clips).shape == (2, 12)
    missing = scorers.detector("fvd", {"fvd": "i3d_torchscript.pt"})
    assert isinstance(missing, scorers.Skipped) and missing.path == os.path.abspath("i3d_torchscript.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt: not a TorchScript file"):
        scorers.detector("fid", {"fid": str(tmp_path / "junk.pt")})
