import io
import os
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from data import ImageFolder, PickAPic, load_image, read_prompts

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
TOL = 0.15  # JPEG error, in [-1, 1] units


def encode(img, fmt="JPEG"):
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def solid(color, size=(40, 24)):
    return encode(Image.new("RGB", size, color))


def halves(left, right, size=(40, 24)):
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2], a[:, size[0] // 2:] = left, right
    return encode(Image.fromarray(a))


def gradient(size=(48, 32), inverted=False):
    """Grey ramp, dark on the left: its flip and crop offset can be read off the pixels. The inverted ramp of the
    same size is its complement, so winner + loser == 0 (in [-1, 1]) exactly when both got the same crop and flip."""
    ramp = np.linspace(0, 255, size[0]).round().astype(np.uint8)
    a = np.broadcast_to((255 - ramp if inverted else ramp)[None, :, None], (size[1], size[0], 3))
    return encode(Image.fromarray(np.ascontiguousarray(a)))


def noisy_jpeg(size=(64, 64)):
    return encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8)))


def write_shard(path, rows, row_group_size=None, drop=()):
    """rows: (caption, jpg_0 bytes, jpg_1 bytes, label_0)."""
    cols = {"caption": pa.array([r[0] for r in rows], pa.string()),
            "jpg_0": pa.array([r[1] for r in rows], pa.binary()),
            "jpg_1": pa.array([r[2] for r in rows], pa.binary()),
            "label_0": pa.array([r[3] for r in rows], pa.float64())}
    pq.write_table(pa.table({k: v for k, v in cols.items() if k not in drop}), str(path), row_group_size=row_group_size)
    return str(path)


def mean_rgb(x):
    return x.mean(dim=(1, 2))


def is_color(x, color):
    return bool((mean_rgb(x) - (torch.tensor(color, dtype=torch.float32) / 127.5 - 1)).abs().max() < TOL)


# ---------------------------------------------------------------------------------------------------- Pick-a-Pic

def test_winner_first_and_ties_dropped(tmp_path):
    f = write_shard(tmp_path / "shard.parquet", [("zero wins", solid(RED), solid(BLUE), 1.0),
                                                 ("tie", solid(RED), solid(BLUE), 0.5),
                                                 ("one wins", solid(RED), solid(BLUE), 0.0)])
    ds = PickAPic(f, 16, random_flip=False)
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert (a["prompt"], b["prompt"]) == ("zero wins", "one wins")
    assert is_color(a["image_w"], RED) and is_color(a["image_l"], BLUE)
    assert is_color(b["image_w"], BLUE) and is_color(b["image_l"], RED)
    assert ds[-1]["prompt"] == "one wins"
    with pytest.raises(IndexError):
        ds[2]


def test_output_shape_range_dtype(tmp_path):
    f = write_shard(tmp_path / "shard.parquet", [("p", halves((0, 0, 0), WHITE), noisy_jpeg((30, 50)), 1.0)])
    item = PickAPic(f, 16, random_crop=True)[0]
    for k in ("image_w", "image_l"):
        x = item[k]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
        assert x.min() >= -1 and x.max() <= 1
    x = item["image_w"]  # black | white: really spans [-1, 1], not [0, 1] or [0, 255]
    assert x.min() < -0.9 and x.max() > 0.9


def _stripes():
    """80x40: red left quarter, green right quarter, blue middle with a white band over its top quarter."""
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :20], a[:, 60:], a[:, 20:60] = RED, GREEN, BLUE
    a[:10, 20:60] = WHITE
    return Image.fromarray(a)


@pytest.mark.parametrize("portrait", [False, True])
def test_resize_shortest_side_then_center_crop(tmp_path, portrait):
    # PNG: lossless, so only the bilinear resize blurs edges. Resizing the short side 40 -> 20 gives 40x20 and the
    # center crop is the blue middle with the white band in its top 5 rows. Squashing to 20x20 would show red and
    # green at the sides; cropping without resizing would miss the band; resizing the long side would be too small.
    img = _stripes().transpose(Image.TRANSPOSE) if portrait else _stripes()
    img.save(tmp_path / "x.png")
    x = load_image(str(tmp_path / "x.png"), 20)
    assert x.shape == (3, 20, 20)
    if portrait:
        x = x.transpose(1, 2)
    white, blue = torch.tensor([1.0, 1, 1]), torch.tensor([-1.0, -1, 1])
    assert (x[:, :4, 1:-1] - white[:, None, None]).abs().max() < 0.02
    assert (x[:, 6:, 1:-1] - blue[:, None, None]).abs().max() < 0.02


def _flip_and_offset(x):
    """For the (possibly flipped) grey ramp: whether it was flipped, and its value at the left edge."""
    row = x[0].mean(0)
    return bool(row[0] > row[-1]), round(float(row[-1] if row[0] > row[-1] else row[0]), 3)


def test_pair_shares_crop_and_flip(tmp_path):
    rows = [(f"p{i}", gradient(), gradient(inverted=True), 1.0) for i in range(8)]
    rows += [(f"q{i}", gradient(inverted=True), gradient(), 0.0) for i in range(8)]  # winner is jpg_1 here
    ds = PickAPic(write_shard(tmp_path / "shard.parquet", rows), 16, random_crop=True, random_flip=True)
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            w, l = item["image_w"], item["image_l"]
            assert (w + l).abs().max() < 0.1, (epoch, i)  # complement <=> same crop and same flip
            seen.add(_flip_and_offset(w))
    assert {flip for flip, _ in seen} == {False, True}  # flips happen, both ways
    assert len({off for _, off in seen}) >= 3  # and crops move


def test_deterministic_per_seed_epoch_index(tmp_path):
    f = write_shard(tmp_path / "shard.parquet", [(f"p{i}", gradient(), gradient(inverted=True), 1.0) for i in range(6)])
    a, b = PickAPic(f, 16, random_crop=True, seed=3), PickAPic(f, 16, random_crop=True, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    ref = {i: a[i]["image_w"] for i in range(6)}
    got = {i: b[i]["image_w"] for i in [5, 3, 1, 4, 2, 0]}  # access order must not matter (workers, shuffling)
    assert all(torch.equal(ref[i], got[i]) for i in range(6))
    assert all(torch.equal(ref[i], a[i]["image_w"]) for i in range(6))  # nor does asking twice
    changed = []
    for e in (0, 1, 3):
        a.set_epoch(e)
        changed += [not torch.equal(ref[i], a[i]["image_w"]) for i in range(6)]
    assert any(changed)  # a new epoch, a new draw
    other_seed = PickAPic(f, 16, random_crop=True, seed=4)
    other_seed.set_epoch(2)
    assert any(not torch.equal(other_seed[i]["image_w"], ref[i]) for i in range(6))


def test_folder_of_shards_and_row_groups(tmp_path):
    write_shard(tmp_path / "b.parquet", [("b0", solid(GREEN), solid(RED), 1.0), ("b1", solid(RED), solid(GREEN), 0.0)])
    write_shard(tmp_path / "a.parquet", [("a0", solid(BLUE), solid(RED), 1.0), ("tie", solid(RED), solid(RED), 0.5),
                                         ("a2", solid(RED), solid(WHITE), 0.0), ("a3", solid(WHITE), solid(RED), 1.0),
                                         ("a4", solid(RED), solid(BLUE), 0.0)], row_group_size=2)
    (tmp_path / "notes.txt").write_text("not a shard")
    ds = PickAPic(str(tmp_path), 8, random_flip=False)
    assert len(ds) == 6
    want = [("a0", BLUE), ("a2", WHITE), ("a3", WHITE), ("a4", BLUE), ("b0", GREEN), ("b1", GREEN)]
    for i in [5, 0, 3, 1, 4, 2, 0]:  # jump between files and row groups, in and out of the cache
        item = ds[i]
        assert item["prompt"] == want[i][0] and is_color(item["image_w"], want[i][1])
        assert is_color(item["image_l"], RED)
    listed = PickAPic([tmp_path / "b.parquet"], 8)
    assert [listed[i]["prompt"] for i in range(len(listed))] == ["b0", "b1"]


def test_read_prompts_dedupes_in_order(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"caption": ["a dog", "a cat", "a dog", "a fox", "a cat"], "other": [1, 2, 3, 4, 5]}), path)
    assert read_prompts(str(path)) == ["a dog", "a cat", "a fox"]  # first-seen order


# ---------------------------------------------------------------------------------------------------- ImageFolder

def write_folder(root, lines, images=()):
    os.makedirs(root / "img", exist_ok=True)
    for name, color in images:
        (root / name).write_bytes(solid(color))
    (root / "metadata.jsonl").write_text("".join(l if isinstance(l, str) else json.dumps(l) + "\n" for l in lines))
    return str(root)


def test_imagefolder_unpaired(tmp_path):
    root = write_folder(tmp_path, [{"file_name": "img/r.jpg", "text": "red"}, "\n",
                                   {"file_name": "img/b.jpg", "text": "blue"}],
                        [("img/r.jpg", RED), ("img/b.jpg", BLUE)])
    ds = ImageFolder(root, 12)
    assert len(ds) == 2
    item = ds[1]
    assert set(item) == {"prompt", "image_w"} and item["prompt"] == "blue"
    assert item["image_w"].shape == (3, 12, 12) and is_color(item["image_w"], BLUE)


def test_imagefolder_paired(tmp_path):
    root = write_folder(tmp_path, [{"file_name": "img/r.jpg", "loser_file_name": "img/b.jpg", "text": "x"},
                                   {"file_name": "img/g.jpg", "loser_file_name": "img/r.jpg", "text": "y"}],
                        [("img/r.jpg", RED), ("img/b.jpg", BLUE), ("img/g.jpg", GREEN)])
    ds = ImageFolder(root, 12)
    a, b = ds[0], ds[1]
    assert is_color(a["image_w"], RED) and is_color(a["image_l"], BLUE)
    assert b["prompt"] == "y" and is_color(b["image_w"], GREEN) and is_color(b["image_l"], RED)


def test_imagefolder_pair_shares_crop_and_flip(tmp_path):
    (tmp_path / "up.jpg").write_bytes(gradient())
    (tmp_path / "down.jpg").write_bytes(gradient(inverted=True))
    root = write_folder(tmp_path, [{"file_name": "up.jpg", "loser_file_name": "down.jpg", "text": str(i)}
                                   for i in range(16)])
    ds = ImageFolder(root, 16, random_crop=True, seed=1)
    seen = set()
    for i in range(len(ds)):
        w, l = ds[i]["image_w"], ds[i]["image_l"]
        assert (w + l).abs().max() < 0.1, i
        seen.add(_flip_and_offset(w))
    assert {flip for flip, _ in seen} == {False, True} and len({off for _, off in seen}) >= 3


# ---------------------------------------------------------------------------------------------------- errors

def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        PickAPic(str(tmp_path / "nope.parquet"), 8)
    with pytest.raises(FileNotFoundError, match=r"no \*\.parquet"):
        PickAPic(str(tmp_path), 8)
    with pytest.raises(FileNotFoundError, match="nodir"):
        PickAPic(str(tmp_path / "nodir"), 8)
    with pytest.raises(FileNotFoundError, match="gone.parquet"):
        read_prompts(str(tmp_path / "gone.parquet"))


def test_missing_column(tmp_path):
    f = write_shard(tmp_path / "shard.parquet", [("p", solid(RED), solid(BLUE), 1.0)], drop=("label_0",))
    with pytest.raises(ValueError, match=r"shard\.parquet: missing column 'label_0' \(has: caption, jpg_0, jpg_1\)"):
        PickAPic(f, 8)
    with pytest.raises(ValueError, match=r"p\.parquet: missing column 'caption'"):
        pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "p.parquet")
        read_prompts(str(tmp_path / "p.parquet"))


def test_not_a_parquet(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(ValueError, match=r"junk\.parquet"):
        PickAPic(str(tmp_path / "junk.parquet"), 8)


@pytest.mark.parametrize("bad", [0.7, None])
def test_bad_label(tmp_path, bad):
    rows = [(p, solid(RED), solid(BLUE), label) for p, label in (("p", 1.0), ("q", bad), ("r", 0.0))]
    f = write_shard(tmp_path / "shard.parquet", rows, row_group_size=1)
    with pytest.raises(ValueError, match=r"shard\.parquet row 1: label_0"):
        PickAPic(f, 8)


def test_null_caption(tmp_path):
    rows = [("p", solid(RED), solid(BLUE), 1.0), (None, solid(RED), solid(BLUE), 0.0)]
    f = write_shard(tmp_path / "shard.parquet", rows)
    with pytest.raises(ValueError, match=r"shard\.parquet row 1: caption is null"):
        PickAPic(f, 8)


def test_all_ties(tmp_path):
    f = write_shard(tmp_path / "shard.parquet", [("p", solid(RED), solid(BLUE), 0.5)] * 3)
    with pytest.raises(ValueError, match=r"shard\.parquet: no usable rows"):
        PickAPic(f, 8)


def test_corrupt_image_in_parquet(tmp_path):
    f = write_shard(tmp_path / "shard.parquet", [("p", solid(RED), solid(BLUE), 1.0),
                                                 ("q", solid(RED), b"\xff\xd8 definitely not a jpeg", 1.0)])
    ds = PickAPic(f, 8)
    ds[0]  # the good row still loads
    with pytest.raises(ValueError, match=r"shard\.parquet row 1 jpg_1: cannot decode image"):
        ds[1]


@pytest.mark.parametrize("allow_truncated_globally", [False, True])
def test_truncated_jpeg_in_parquet(tmp_path, monkeypatch, allow_truncated_globally):
    good = noisy_jpeg()
    cut = good[: len(good) // 2]
    Image.open(io.BytesIO(cut))  # opens fine: PIL decodes lazily, so only a full load can catch this
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", allow_truncated_globally)
    f = write_shard(tmp_path / "shard.parquet", [("p", good, cut, 0.0)])
    with pytest.raises(ValueError, match=r"shard\.parquet row 0 jpg_1: cannot decode image"):
        PickAPic(f, 8)[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is allow_truncated_globally  # the user's setting is left as it was


def test_truncated_file_in_imagefolder(tmp_path):
    good = noisy_jpeg()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    root = write_folder(tmp_path, [{"file_name": "cut.jpg", "text": "t"}])
    with pytest.raises(ValueError, match=r"cut\.jpg: cannot decode image"):
        ImageFolder(root, 8)[0]


def test_metadata_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl"):
        ImageFolder(str(tmp_path), 8)


@pytest.mark.parametrize("line, match", [
    ("{not json", r"metadata\.jsonl line 2: not valid JSON"),
    ('["a list"]', r"metadata\.jsonl line 2: expected a JSON object"),
    ({"text": "no file"}, r"metadata\.jsonl line 2: missing key 'file_name'"),
    ({"file_name": "img/r.jpg"}, r"metadata\.jsonl line 2: missing key 'text'"),
    ({"file_name": "img/r.jpg", "text": 7}, r"metadata\.jsonl line 2: 'text' must be a string"),
    ({"file_name": "img/r.jpg", "loser_file_name": "img/r.jpg", "text": "t"},
     r"metadata\.jsonl line 2: has loser_file_name"),
])
def test_metadata_bad_line(tmp_path, line, match):
    line = line + "\n" if isinstance(line, str) else line
    root = write_folder(tmp_path, [{"file_name": "img/r.jpg", "text": "ok"}, line], [("img/r.jpg", RED)])
    with pytest.raises(ValueError, match=match):
        ImageFolder(root, 8)


def test_metadata_pairs_then_single(tmp_path):
    root = write_folder(tmp_path, [{"file_name": "img/r.jpg", "loser_file_name": "img/r.jpg", "text": "a"},
                                   {"file_name": "img/r.jpg", "text": "b"}], [("img/r.jpg", RED)])
    with pytest.raises(ValueError, match=r"metadata\.jsonl line 2: lacks loser_file_name"):
        ImageFolder(root, 8)


@pytest.mark.parametrize("key", ["file_name", "loser_file_name"])
def test_metadata_missing_image(tmp_path, key):
    row = {"file_name": "img/r.jpg", "loser_file_name": "img/r.jpg", "text": "a"}
    row[key] = "img/missing.jpg"
    root = write_folder(tmp_path, [row], [("img/r.jpg", RED)])
    with pytest.raises(FileNotFoundError, match=rf"metadata\.jsonl line 1: {key} .*missing\.jpg"):
        ImageFolder(root, 8)
