"""probe.py: which words a model listens to. A UNet that cannot see the prompt moves by nothing, a random one by
something, for every kind of word, images and clips alike."""
import torch

import model
from tiny import build
from tiny import probe
from tiny import video
from tiny import world


def _cut_cross_attention(unet):
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "attn2.to_k" in name or "attn2.to_v" in name:
                p.zero_()


def test_word_effects_see_what_the_unet_reads(tmp_path):
    m = model.load_model(build.build_tiny_model(str(tmp_path / "img"), world.WORDS, seed=0))
    fx = probe.word_effects(m, world, timesteps=(999, 500), n_prompts=8)
    assert list(fx) == [999, 500] and all(set(r) == {"colour", "shape", "place"} for r in fx.values())
    assert all(v > 1e-5 for r in fx.values() for v in r.values())
    _cut_cross_attention(m["unet"])  # the prompt no longer reaches the UNet
    assert all(v == 0 for r in probe.word_effects(m, world, timesteps=(999,), n_prompts=8).values() for v in r.values())


def test_word_effects_of_a_video_model_report_motion_and_frames(tmp_path):
    m = model.load_model(build.build_tiny_model(str(tmp_path / "vid"), video.WORDS, frames=4, seed=0))
    fx = probe.word_effects(m, video, timesteps=(999,), frames=4, n_prompts=4)
    assert set(fx[999]) == {"colour", "shape", "motion", "frames"} and fx[999]["motion"] > 0 and fx[999]["frames"] > 0
