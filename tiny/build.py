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


# ---------------------------------------------------------------------------------------------------------------
# tiny random flow-matching models in the Stable Diffusion 3 and FLUX.1 layouts (tests; the tiny flow world)

def build_t5_tokenizer(words):
    """T5's tokenizer, offline: a Unigram model over the words whole ('▁word') with single characters to fall back
    on; transformers builds the Metaspace pre-tokenizer and the '</s>' post-processor from it, as for T5's own.
    ids: <pad> 0, </s> 1, <unk> 2."""
    from transformers import T5TokenizerFast
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in sorted(set(words))]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_flow(out_dir, family="sd3", words=None, resolution=16, seed=0, width=16, layers=2, text_dim=32,
                    guidance_embeds=True):
    """Save a random model in the StableDiffusion3Pipeline (family 'sd3') or FluxPipeline ('flux') layout: a
    transformer of `layers` blocks and width `width` (SD3: 2 heads of width/2; FLUX: one double and layers - 1 single
    blocks), a 2-level AutoencoderKL with 16 latent channels and its family's shift and scaling factors (SD3 1.5305 /
    0.0609, FLUX.1 0.3611 / 0.1159), tiny CLIP text encoders (SD3: two with projections; FLUX: one) and a tiny T5.
    The schedulers are the families':
    SD3's shift 3; FLUX.1-dev's dynamic shift, with the guidance embedding (guidance_embeds). Loaded back through
    model.load_model or the diffusers pipelines, as a real checkpoint is."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    words = words or world.WORDS
    tok, t5tok = build_tokenizer(words, os.path.join(out_dir, "tokenizer")), build_t5_tokenizer(words)
    t5_dim = 2 * text_dim  # >= the two CLIPs' widths side by side: SD3 pads them to T5's width

    def clip(cls):
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=text_dim, intermediate_size=2 * text_dim,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, projection_dim=text_dim))
    t5_encoder = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=t5_dim, d_kv=16, d_ff=2 * t5_dim, num_layers=1,
                                         num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                         feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                         decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False))
    factors = {"sd3": dict(scaling_factor=1.5305, shift_factor=0.0609), "flux": dict(scaling_factor=0.3611,
                                                                                      shift_factor=0.1159)}[family]
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=resolution, use_quant_conv=False,
                        use_post_quant_conv=False, **factors)
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=resolution // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
            attention_head_dim=width // 2, num_attention_heads=2, joint_attention_dim=t5_dim,
            caption_projection_dim=width, pooled_projection_dim=2 * text_dim, pos_embed_max_size=resolution)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=vae, text_encoder=clip(CLIPTextModelWithProjection), tokenizer=tok,
            text_encoder_2=clip(CLIPTextModelWithProjection), tokenizer_2=tok,
            text_encoder_3=t5_encoder, tokenizer_3=t5tok)
    else:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=layers - 1, attention_head_dim=width,
            num_attention_heads=2, joint_attention_dim=t5_dim, pooled_projection_dim=text_dim,
            guidance_embeds=guidance_embeds, axes_dims_rope=(width // 4, 3 * width // 8, 3 * width // 8))
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)  # FLUX.1-dev's
        pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip(CLIPTextModel), tokenizer=tok,
                            text_encoder_2=t5_encoder, tokenizer_2=t5tok, transformer=transformer)
    pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_wan(out_dir, words=None, seed=0, width=16, layers=2, text_dim=32, scheduler="unipc"):
    """Save a random model in the WanPipeline (Wan2.1 text-to-video) layout: a WanTransformer3DModel of `layers`
    blocks and width `width` (2 heads, 1x2x2 patches), an AutoencoderKLWan with 16 latent channels that halves the
    side and the time once (a clip of 1 + 2k frames -> 1 + k latent frames; Wan2.1's: 8x and 4x) and Wan's per-channel
    latent statistics, a tiny UMT5 encoder and the T5 tokenizer of build_t5_tokenizer; the scheduler Wan2.1's
    published UniPC multistep on flow sigmas (shift 3; scheduler='euler': the flow Euler one). Loaded back through
    model.load_model or WanPipeline, as a real checkpoint is."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    tok = build_t5_tokenizer(words or world.WORDS)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=text_dim, d_kv=8, d_ff=2 * text_dim,
                                          num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                                          dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0,
                                          eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False,
                                          use_cache=False))
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           scale_factor_temporal=2, scale_factor_spatial=2)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=width // 2,
                                        in_channels=16, out_channels=16, text_dim=text_dim, freq_dim=16,
                                        ffn_dim=2 * width, num_layers=layers, rope_max_seq_len=64)
    sched = (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                     num_train_timesteps=1000) if scheduler == "unipc"
             else FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    WanPipeline(tokenizer=tok, text_encoder=encoder, vae=vae, transformer=transformer,
                scheduler=sched).save_pretrained(out_dir)
    return out_dir
