"""model.py: the SD1.5 folder layout through the real from_pretrained path, the sampler, the tokenizer."""
import os

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

import diffusion
import model
from tiny import build
from tiny import world
from conftest import FAST


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny random model with a VAE, saved in the SD1.5 layout."""
    return build.build_tiny_model(str(tmp_path_factory.mktemp("sd")), world.WORDS, resolution=16, with_vae=True)


def test_tokenizer_is_clip_shaped(tmp_path):
    tok = build.build_tokenizer(world.WORDS, str(tmp_path / "tok"))
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = tok("A red circle on the left", padding="max_length", max_length=77).input_ids
    words = tok.convert_ids_to_tokens(ids[:8])
    assert words == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "on</w>", "the</w>", "left</w>",
                     "<|endoftext|>"]
    assert len(ids) == 77 and set(ids[8:]) == {tok.pad_token_id} and tok.pad_token_id == tok.eos_token_id
    # text outside the vocabulary still tokenizes (bytes), and long prompts are cut to 77
    assert len(tok("a zebra " * 60, padding="max_length", max_length=77, truncation=True).input_ids) == 77


def test_every_word_of_the_grammar_is_one_token(tmp_path):
    """BPE takes the lowest-ranked merge first: a merge learned for one word (r i, from "right") must not split
    another ("triangle" was t ri a n g l e): each word a token of its own, through the saved and reloaded tokenizer."""
    from transformers import CLIPTokenizer
    build.build_tokenizer(world.WORDS, str(tmp_path / "tok"))
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    for w in world.WORDS:
        assert tok.convert_ids_to_tokens(tok(w).input_ids) == ["<|startoftext|>", w + "</w>", "<|endoftext|>"], w
    prompts = [world.prompt_of(c) for c in world.ALL_COMBOS]
    assert all(len(tok(p).input_ids) == len(p.split()) + 2 for p in prompts)


def test_load_and_encode(sd_dir):
    assert sorted(os.listdir(sd_dir)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    m = model.load_model(sd_dir)
    assert m["vae"] is not None and not any(p.requires_grad for p in m["text_encoder"].parameters())
    ctx = model.encode_prompts(m, ["a red circle on the left", ""])
    assert ctx.shape == (2, 77, 32)
    assert not torch.allclose(ctx[0], ctx[1])
    images = torch.stack([world.to_tensor(world.render(c, 16)) for c in world.ALL_COMBOS[:2]])
    z = model.images_to_latents(m["vae"], images, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    back = model.latents_to_images(m["vae"], z)
    assert back.shape == (2, 3, 16, 16) and back.min() >= -1 and back.max() <= 1


def test_prompt_cache_matches_encoding_and_is_bounded(sd_dir):
    m = model.load_model(sd_dir)
    enc = m["text_encoder"]
    rows = []  # how many prompts each forward of the encoder sees
    enc.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    prompts = [world.prompt_of(c) for c in world.ALL_COMBOS[:6]]
    cache = model.PromptCache(m, capacity=4)
    chunk = model.PromptCache.CHUNK  # new prompts are encoded a whole chunk at a time, the rest of it ""
    first = cache(prompts[:3] + [prompts[0], ""])  # duplicates in a batch are encoded once
    assert rows == [chunk] and list(cache.store) == prompts[:3] + [""]
    assert torch.allclose(first, model.encode_prompts(m, prompts[:3] + [prompts[0], ""]), atol=1e-6)
    rows.clear()
    assert torch.equal(cache(["", prompts[2]]), first[[4, 2]]) and rows == []  # all cached: no forward
    again = cache(prompts[3:] + prompts[:1])  # 3 more than fit: the oldest go, the batch is still whole
    assert rows == [chunk] and torch.allclose(again, model.encode_prompts(m, prompts[3:] + prompts[:1]), atol=1e-6)
    assert len(cache.store) == 4 and prompts[1] not in cache.store and prompts[5] in cache.store
    # a prompt's row does not depend on which prompts were new with it: a resumed run meets them in other company
    assert torch.equal(model.PromptCache(m, 4)(prompts[4:5])[0], again[1])
    enc.train().requires_grad_(True)  # an encoder being trained is encoded every time, with gradients
    cache = model.PromptCache(m, 4)
    out = cache(prompts)
    assert out.requires_grad and out.shape == (6, 77, 32) and not cache.store


def test_missing_parts_are_named(tmp_path, sd_dir, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.load_model(str(tmp_path / "nothing"))
    os.makedirs(tmp_path / "half" / "unet")
    with pytest.raises(FileNotFoundError, match=r"lacks text_encoder/, tokenizer/, scheduler/ \("):
        model.load_model(str(tmp_path / "half"))
    # a relative path under a folder that exists here (out/tiny_bsae) is a typo, not a hub id to try to download
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'half/typo' does not exist .*; half/ is a folder here"):
        model.load_model("half/typo")


@pytest.mark.parametrize("with_vae, zero_snr", [(False, False), (True, False), (False, True)])
def test_ddim_sample_matches_diffusers(tmp_path, with_vae, zero_snr):
    """Our plain-torch loop == diffusers' DDIMScheduler.step, for SD1.5's schedule (latent), the pixel-space
    one (x0 clipped), and a zero-terminal-SNR v-prediction one ('trailing' steps from t = 999), with
    classifier-free guidance."""
    kind = "v_prediction" if zero_snr else "epsilon"
    m = model.load_model(build.build_tiny_model(str(tmp_path), world.WORDS, with_vae=with_vae, zero_snr=zero_snr,
                                                prediction_type=kind))
    assert m["scheduler"].config.prediction_type == kind and (m["scheduler"].alphas_cumprod[-1] == 0) == zero_snr
    unet = m["unet"].eval()
    cond = model.encode_prompts(m, ["a red circle on the left", "a blue square at the top"])
    uncond = model.encode_prompts(m, [""])
    c = unet.config.in_channels
    noise = torch.randn(2, c, unet.config.sample_size, unet.config.sample_size, generator=torch.Generator().manual_seed(0))
    ours = diffusion.ddim_sample(model.net(unet), m["scheduler"], cond, uncond, noise, steps=5, guidance=3.0)
    assert not ours.requires_grad  # the UNet's weights require grad: sampling must still build no graph
    s = DDIMScheduler.from_config(m["scheduler"].config)
    s.set_timesteps(5)
    assert torch.equal(diffusion.timesteps(m["scheduler"], 5), s.timesteps) and (s.timesteps[0] == 999) == zero_snr
    x = noise
    with torch.no_grad():
        for t in s.timesteps:
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand(2, -1, -1), cond])).sample.chunk(2)
            x = s.step(e_u + 3.0 * (e_c - e_u), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()
    assert not torch.allclose(ours, noise)
    # guidance 1 is the conditional model alone, in one forward
    one = diffusion.ddim_sample(model.net(unet), m["scheduler"], cond, uncond, noise, steps=5, guidance=1.0)
    assert not torch.allclose(one, ours)
    # eta > 0: each step adds its slice of the caller's step_noise, as diffusers' step(variance_noise=...)
    step_noise = torch.randn(5, *noise.shape, generator=torch.Generator().manual_seed(1))
    ours = diffusion.ddim_sample(model.net(unet), m["scheduler"], cond, uncond, noise, 5, 3.0, 0.5, step_noise)
    x = noise
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand(2, -1, -1), cond])).sample.chunk(2)
            x = s.step(e_u + 3.0 * (e_c - e_u), t, x, eta=0.5, variance_noise=step_noise[i]).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()
    with pytest.raises(ValueError, match=r"eta > 0 needs step_noise of shape \(5, 2, "):
        diffusion.ddim_sample(model.net(unet), m["scheduler"], cond, uncond, noise, 5, 3.0, 0.5)


def test_sd_layout_trains_samples_and_loads_in_stable_diffusion_pipeline(tmp_path, sd_dir, run):
    """The SD path end to end: a latent model with a VAE from an SD-layout folder, trained on the tiny world's
    images through the VAE, sampled at eval, saved, and loaded back by diffusers' own pipeline."""
    out = str(tmp_path / "run")
    p = run(FAST + [f"--out_dir={out}", f"--init_from={sd_dir}", "--max_steps=2"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "eval step 2:" in p.stdout
    before = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet").state_dict()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"))
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())  # it trained
    pipe = StableDiffusionPipeline.from_pretrained(out, unet=unet, safety_checker=None, local_files_only=True)
    img = pipe("a red circle on the left", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and img.min() >= 0 and img.max() <= 1


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_denoising_error_is_on_the_models_own_target(kind):
    """The per-sample error compares the UNet's output with what it predicts: eps, or v = sqrt(abar) eps -
    sqrt(1 - abar) x0 (worked out here by hand); a model that outputs exactly that has error 0, and the sampler
    turns that model's output back into the x0 it was given (at t = 999 of a zero-SNR schedule too)."""
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind,
                          rescale_betas_zero_snr=kind == "v_prediction", clip_sample=False,
                          timestep_spacing="trailing" if kind == "v_prediction" else "leading", steps_offset=1)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    class Oracle(torch.nn.Module):  # outputs the target of the x0 it knows, at any noise level
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, encoder_hidden_states):
            a = sched.alphas_cumprod[t].view(-1, 1, 1, 1) if t.dim() else sched.alphas_cumprod[t]
            e = (x - a.sqrt() * x0) / (1 - a).sqrt()
            out = e if kind == "epsilon" else a.sqrt() * e - (1 - a).sqrt() * x0
            return type("Out", (), {"sample": out + 0 * self.w})

    ctx = torch.zeros(3, 77, 8)
    err, pred, target = diffusion.denoising_error(model.net(Oracle()), sched, x0, eps, t, ctx, return_pred=True)
    assert torch.allclose(target, want) and err.shape == (3,) and err.max() < 1e-8
    zero = Oracle()
    zero.forward = lambda x, t, encoder_hidden_states: type("Out", (), {"sample": torch.zeros_like(x)})
    assert torch.allclose(diffusion.denoising_error(model.net(zero), sched, x0, eps, t, ctx), want.pow(2).mean((1, 2, 3)))
    x = diffusion.ddim_sample(model.net(Oracle()), sched, ctx, ctx[:1], torch.randn(3, 2, 4, 4, generator=g), steps=4,
                              guidance=1.0)
    assert torch.allclose(x, x0, atol=1e-4), (x - x0).abs().max()
