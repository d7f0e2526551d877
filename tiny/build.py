"""
A tiny random model in the SD1.5 folder layout: the tiny worlds' model (init_from='scratch'), and the Stable Diffusion
path's test model (SDXL's and AnimateDiff's layouts too), with a real CLIPTokenizer that knows the worlds' words whole.
Saved with save_pretrained and loaded back only through model.load_model, as a real checkpoint is.
"""
import json
import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import model
from tiny import world

def _bytes_to_unicode():
    # the byte -> printable-character table of GPT-2/CLIP BPE
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _bpe(toks, ranks):
    """Byte-pair encoding of one word's symbols with the merges learned so far: merge the pair of lowest rank until
    none applies (what CLIPTokenizer does)."""
    while len(toks) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(toks, toks[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        toks = toks[:i] + [toks[i] + toks[i + 1]] + toks[i + 2:]
    return toks


def build_tokenizer(words, out_dir):
    """A real CLIPTokenizer whose BPE knows `words` whole (any other text falls back to single bytes).
    Same special tokens, lower-casing and 77-token padding as SD1.5's; a few hundred ids instead of 49,408.
    Each word gets merges after all earlier ones, applied to what the earlier merges already make of it (BPE
    always takes the lowest-ranked pair: a merge learned for "right", r i, would otherwise split "triangle")."""
    base = _bytes_to_unicode()
    vocab, ranks = base + [c + "</w>" for c in base], {}
    for w in sorted(set(words)):
        toks = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        while len(toks) > 1:  # merge left to right: re d</w> -> red</w>
            ranks.setdefault((toks[0], toks[1]), len(ranks))
            if toks[0] + toks[1] not in vocab:
                vocab.append(toks[0] + toks[1])
            toks = [toks[0] + toks[1]] + toks[2:]
    merges = [f"{a} {b}" for a, b in ranks]  # in rank order: dicts keep insertion order
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    tmp_vocab, tmp_merges = os.path.join(out_dir, "_vocab.json"), os.path.join(out_dir, "_merges.txt")
    with open(tmp_vocab, "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(tmp_merges, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")  # the loader skips the first line
    tok = CLIPTokenizer(tmp_vocab, tmp_merges, pad_token="<|endoftext|>", model_max_length=77)
    os.remove(tmp_vocab), os.remove(tmp_merges)
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(out_dir, words=None, resolution=16, channels=(32, 64), text_dim=32, with_vae=False, seed=0,
                     schedule="scaled_linear", prediction_type="epsilon", zero_snr=False, sdxl=False, frames=0):
    """Save a random SD-layout model to out_dir. Pixel space (no vae/) unless with_vae: then a tiny AutoencoderKL
    with 4 latent channels and a downsampling factor of 2. zero_snr: betas rescaled to a zero terminal SNR, sampled
    from t = T - 1 ('trailing'), which needs prediction_type='v_prediction' (Lin et al. 2023). sdxl: SDXL's layout
    and conditioning (a second text encoder with a projection, a UNet with addition_embed_type='text_time'), for
    tests. frames > 0: an AnimateDiff UNetMotionModel (the UNet + a tiny MotionAdapter with temporal attention over
    up to 32 frames), the tiny video world's model. Loaded back only through `load_model`."""
    torch.manual_seed(seed)
    tok = build_tokenizer(words or world.WORDS, os.path.join(out_dir, "tokenizer"))
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=text_dim)
    text_encoder = CLIPTextModel(text_cfg)
    xl = {}
    if sdxl:  # SDXL's added conditions: 6 time ids of 8 Fourier features each + the pooled text (its 256 x 6 + 1280)
        xl = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=8 * model.N_TIME_IDS + text_dim)
    vae = None
    in_ch, size = 3, resolution
    if with_vae:
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=8, sample_size=resolution)
        in_ch, size = 4, resolution // 2
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=in_ch, out_channels=in_ch, layers_per_block=1,
        block_out_channels=tuple(channels), norm_num_groups=8, cross_attention_dim=text_dim * (1 + sdxl),
        attention_head_dim=8, **xl,
        # attention only below full resolution: at 16x16 a full-resolution attention block costs ~3x the step
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",))
    # SD1.5's schedule by default; a pixel-space model also clips its predicted x0 to the image range
    betas = {"scaled_linear": (0.00085, 0.012), "linear": (1e-4, 0.02), "squaredcos_cap_v2": (1e-4, 0.02)}[schedule]
    sched = DDIMScheduler(beta_start=betas[0], beta_end=betas[1], beta_schedule=schedule, clip_sample=not with_vae,
                          set_alpha_to_one=False, steps_offset=0 if zero_snr else 1, prediction_type=prediction_type,
                          rescale_betas_zero_snr=zero_snr, timestep_spacing="trailing" if zero_snr else "leading")
    model.check_scheduler(sched, out_dir)
    if frames:
        adapter = MotionAdapter(block_out_channels=tuple(channels), motion_layers_per_block=1, motion_norm_num_groups=8,
                                motion_num_attention_heads=4, motion_max_seq_length=32)
        unet = UNetMotionModel.from_unet2d(unet, adapter)
    m = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tok, "scheduler": sched, "vae": vae}
    if sdxl:
        m["text_encoder_2"], m["tokenizer_2"] = CLIPTextModelWithProjection(text_cfg), tok
    if frames:
        unet.save_motion_modules(os.path.join(out_dir, "motion_adapter"))
    unet.save_pretrained(os.path.join(out_dir, "unet"))
    model.save_frozen_parts(m, out_dir)
    return out_dir
