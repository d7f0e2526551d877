"""The tiny world: deterministic data, held-out prompts really held out, and a judge that ranks correctly."""
import numpy as np
import pytest
import torch
from PIL import Image

import data
from tiny import world


def test_judge_ranks_correct_renders_above_each_flaw():
    rng = np.random.default_rng(0)
    goods = []
    for combo in world.ALL_COMBOS:
        p = world.prompt_of(combo)
        good = world.judge(world.render(combo, 16, rng), p)[0]
        goods.append(good)
        assert 0.85 <= good <= 1.0, (p, good)  # jitter of place and size costs a little, rarely
        for flaw in world.ALL_FLAWS:
            bad, parts = world.judge(world.render(combo, 16, rng, flaw), p)
            assert bad < good - 0.05, (p, flaw, good, bad, parts)
    assert np.mean(goods) > 0.97
    # each flaw is caught by the part of the judge that is about it
    combo, p = ("red", "circle", "left"), "a red circle on the left"
    for flaw, part in [("colour", "colour"), ("position", "position"), ("shape", "shape"), ("extra", "clean"),
                       ("noise", "clean")]:
        assert world.judge(world.render(combo, 16, rng, flaw), p)[1][part] < 0.3, flaw


def test_judge_of_noise_and_blank_images_is_low():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    assert world.judge(noise, "a red circle on the left")[0] < 0.2
    assert world.judge(np.zeros((16, 16, 3), np.uint8), "a red circle on the left")[0] == 0.0


def test_judge_takes_tensors_in_minus_one_one():
    x = world.render(("blue", "square", "top"), 16)
    p = "a blue square at the top"
    # float32: the [-1, 1] round trip moves a pixel by an ulp, a score in [0, 1] by ~1e-7 (eps32); 1e-6 is 8 of those
    assert world.judge(world.to_tensor(x), p)[0] == pytest.approx(world.judge(x, p)[0], abs=1e-6)


def test_parse_prompt():
    assert world.parse_prompt("a yellow triangle at the bottom") == ("yellow", "triangle", "bottom")
    with pytest.raises(ValueError, match="not a tiny-world prompt"):
        world.parse_prompt("a purple circle on the left")


def test_held_out_prompts_are_never_trained_on_but_their_parts_are():
    assert len(world.HELD_OUT) == 8 and not set(world.HELD_OUT) & set(world.TRAIN_COMBOS)
    for i in range(3):  # every colour, shape and position is still seen in training
        assert {c[i] for c in world.TRAIN_COMBOS} == {c[i] for c in world.ALL_COMBOS}
    held = {world.prompt_of(c) for c in world.HELD_OUT}
    for mode in ("base", "pairs"):
        ds = world.TinyWorld(mode, size=600)
        assert not {ds[i]["prompt"] for i in range(len(ds))} & held


def test_items_are_a_pure_function_of_seed_and_index():
    a, b, c = world.TinyWorld("pairs", seed=3), world.TinyWorld("pairs", seed=3), world.TinyWorld("pairs", seed=4)
    for i in (0, 17, 999):
        assert a[i]["prompt"] == b[i]["prompt"] and torch.equal(a[i]["image_w"], b[i]["image_w"])
    assert any(not torch.equal(a[i]["image_w"], c[i]["image_w"]) for i in range(5))
    x = a[5]["image_w"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1


def test_base_distribution_mixes_correct_and_flawed():
    ds = world.TinyWorld("base", size=400, p_correct=0.4)
    scores = np.array([world.judge(world.to_uint8(ds[i]["image_w"]), ds[i]["prompt"])[0] for i in range(400)])
    correct = (scores > 0.9).mean()
    assert 0.3 < correct < 0.6 and scores.mean() < 0.9  # room to align


def test_pairs_put_the_judges_choice_first():
    ds = world.TinyWorld("pairs", size=200)
    for i in range(200):
        it = ds[i]
        w = world.judge(world.to_uint8(it["image_w"]), it["prompt"])[0]
        l = world.judge(world.to_uint8(it["image_l"]), it["prompt"])[0]
        assert w >= l + ds.tie_margin


def test_save_grid(tmp_path):
    imgs = torch.stack([world.to_tensor(world.render(c, 16)) for c in world.ALL_COMBOS[:10]])
    path = tmp_path / "g.png"
    data.save_grid(imgs, str(path), labels=[str(i) for i in range(10)], cols=8)
    g = Image.open(path)
    assert g.size == (8 * 66, 2 * (64 + 12 + 2))
    # the first tile is the first image, upscaled 4x
    tile = np.asarray(g)[1:65, 1:65]
    assert np.array_equal(tile[::4, ::4], world.render(world.ALL_COMBOS[0], 16))


def test_each_flaw_is_its_own_kind_and_shapes_land_where_asked():
    """evaluate.py's breakdown: a render with one flaw is classed as that flaw, a correct one as correct, and the
    foreground's centroid is the named place (a triangle's centroid sits a little below its centre)."""
    rng = np.random.default_rng(0)
    want = {None: "correct", "colour": "wrong colour", "position": "wrong place", "blur": "unclean",
            "shape": "wrong shape"}
    for combo in world.ALL_COMBOS:
        for flaw, kind in want.items():
            assert world.kind_of(world.judge(world.render(combo, 16, rng, flaw), world.prompt_of(combo))[1]) == kind
        c = np.array(world.foreground_centroid(world.render(combo, 16, rng)))
        assert np.abs(c - world.POSITIONS[combo[2]]).max() < 0.1, (combo, c)
    assert world.kind_of(world.judge(np.zeros((16, 16, 3), np.uint8), "a red circle on the left")[1]) == "empty"
    assert world.foreground_centroid(np.zeros((16, 16, 3), np.uint8)) is None
