"""latents.py: the VAE latent cache. A run from it is the run that encodes; what it cannot serve is refused."""
import glob
import json
import os
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

import config
import data
import latents
import model
import train_sspo
from tiny import build
from tiny import world
from conftest import FAST
from test_faults import bad_shard

N = 20  # pairs in the test folder


def write_pairs(root, n=N, paired=True):
    """An imagefolder of n judge-world pairs at 24 px (a correct render wins over one with the wrong colour)."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng, rows = np.random.default_rng(0), []
    for i, c in enumerate(world.ALL_COMBOS[:n]):
        for k, flaw in (("w", None), ("l", "colour")):
            Image.fromarray(world.render(c, 24, rng, flaw=flaw)).save(os.path.join(root, "img", f"{i}{k}.png"))
        rows.append({"file_name": f"img/{i}w.png", "text": world.prompt_of(c),
                     **({"loser_file_name": f"img/{i}l.png"} if paired else {})})
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def sd_world(tmp_path_factory):
    """-> (a tiny SD-layout model with a VAE, an imagefolder of pairs)."""
    root = tmp_path_factory.mktemp("latents")
    sd = build.build_tiny_model(str(root / "sd"), world.WORDS, resolution=16, with_vae=True)
    return sd, write_pairs(str(root / "pairs"))


def cfg_args(sd_world, *more):
    return ["--dataset=imagefolder", f"--data_path={sd_world[1]}", f"--init_from={sd_world[0]}", "--random_flip=True", *more]


def unet_weights(out):
    return load_file(glob.glob(os.path.join(out, "unet", "*.safetensors"))[0])


def test_a_run_from_the_cache_is_the_run_that_encodes(sd_world, tmp_path, run):
    cache = str(tmp_path / "cache")
    # batch 1 in the build and the run: the VAE encodes the same single images, so even its rounding agrees
    latents.main(cfg_args(sd_world, f"--latent_cache={cache}", "--batch_size=1", "--method=dpo"))  # losers are stored
    assert sorted(os.listdir(cache)) == ["meta.json", "shard_000000.json", "shard_000000.npy"]
    assert np.load(os.path.join(cache, "shard_000000.npy")).shape[:3] == (N, 2, 2)  # examples, winner/loser, flips
    # 8 updates of 4 = 32 examples: into the second epoch, whose flips are other draws
    common = FAST + cfg_args(sd_world, "--method=dpo", "--batch_size=1", "--grad_accum=4", "--max_steps=8", "--n_eval_images=2")
    for name, more in (("encoded", []), ("cached", [f"--latent_cache={cache}"])):
        p = run(common + [f"--out_dir={tmp_path / name}", *more])
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = unet_weights(tmp_path / "encoded"), unet_weights(tmp_path / "cached")
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(glob.glob(os.path.join(sd_world[0], "unet", "*.safetensors"))[0])
    assert any(not torch.equal(before[k], a[k]) for k in a)  # it trained


def test_unreadable_rows_are_replaced_and_counted_as_without_the_cache(sd_world, tmp_path, run):
    """5 of 12 Pick-a-Pic rows are unreadable: data.SkipBad gives example i the images of the readable i + k, whose
    flip is drawn for i + k, and the epoch's data line counts what was passed over. The cache keeps both."""
    shard, cache = bad_shard(tmp_path / "s.parquet"), str(tmp_path / "cache")
    argv = ["--dataset=pickapic", f"--data_path={shard}", f"--init_from={sd_world[0]}", "--random_flip=True"]
    latents.main(argv + [f"--latent_cache={cache}", "--batch_size=1", "--method=dpo"])
    # 5 updates of 4 = 20 examples: all of epoch 0 and part of epoch 1
    common = FAST + argv + ["--method=dpo", "--batch_size=1", "--grad_accum=4", "--max_steps=5", "--n_eval_images=2"]
    text = {}
    for name, more in (("encoded", []), ("cached", [f"--latent_cache={cache}"])):
        p = run(common + [f"--out_dir={tmp_path / name}", *more])
        assert p.returncode == 0, p.stderr[-3000:]
        text[name] = [re.sub(r"0x[0-9a-f]+", "0x", line)  # PIL's message names an object's address
                      for line in p.stdout.splitlines() if line.startswith(("data of epoch", "skipped unreadable"))]
    assert "data of epoch 0: skipped 6, converted 9, upscaled 2, empty_caption 1, long_caption 1" in text["encoded"]
    assert text["cached"] == text["encoded"]
    a, b = unet_weights(tmp_path / "encoded"), unet_weights(tmp_path / "cached")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_moments_keep_their_bits(sd_world, tmp_path):
    vae = AutoencoderKL.from_pretrained(sd_world[0], subfolder="vae").to(torch.bfloat16)
    ds = data.ImageFolder(sd_world[1], 16, random_flip=False)
    moments = model.encode_moments(vae, torch.stack([ds[i]["image_w"] for i in range(4)]))  # (4, 2C, h, w)
    folder = str(tmp_path / "bf16")
    data.write_meta(folder, {"examples": 4, "images": 1, "vae_dtype": "bfloat16"})
    data.write_shard(folder, 0, moments[:, None, None], {"prompt": ["p"] * 4})  # (4, 1 image, 1 flip, 2C, h, w)
    cached = data.CachedLatents(folder)
    assert all(cached[i]["latent_w"].dtype == torch.bfloat16 and torch.equal(cached[i]["latent_w"], moments[i])
               for i in range(4))
    mean, logvar = moments[:1].float().chunk(2, 1)
    z = model.sample_latents(vae, cached[0]["latent_w"][None], torch.full_like(mean, 0.5))
    assert torch.allclose(z, (mean + logvar.mul(0.5).exp() * 0.5) * vae.config.scaling_factor, rtol=2e-2, atol=1e-3)


def test_a_stopped_build_goes_on_where_it_was_and_ranks_share_the_shards(sd_world, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD", 8)  # 20 examples: shards of 8, 8, 4
    cache = str(tmp_path / "cache")
    argv = cfg_args(sd_world, f"--latent_cache={cache}", "--batch_size=4")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    latents.main(argv)  # rank 1 of 2 builds shard 1 only; rank 0 writes meta.json
    assert sorted(f for f in os.listdir(cache) if f.endswith(".json")) == ["shard_000001.json"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(latents, "build_shard", lambda *a: 1 / 0)  # rank 0 stopped before its first shard
    with pytest.raises(ZeroDivisionError):
        latents.main(argv)
    with pytest.raises(ValueError, match="2 of 3 shards are not built"):
        data.CachedLatents(cache)
    monkeypatch.undo()
    monkeypatch.setattr(data, "SHARD", 8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    latents.main(argv)  # rank 0: shards 0 and 2
    first = {f: np.load(os.path.join(cache, f)) for f in os.listdir(cache) if f.endswith(".npy")}
    assert len(first) == 3
    # stopped mid-way: shard 1 lost its done-mark, shard 2 left a temporary file
    os.remove(os.path.join(cache, "shard_000001.json"))
    open(os.path.join(cache, "shard_000002.npy.tmp"), "wb").write(b"half")
    times = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)}
    monkeypatch.setenv("WORLD_SIZE", "1")
    latents.main(argv)
    assert not os.path.exists(os.path.join(cache, "shard_000002.npy.tmp"))
    assert all(os.stat(os.path.join(cache, f)).st_mtime_ns == times[f]
               for f in ("shard_000000.npy", "shard_000002.npy", "shard_000002.json"))  # not rebuilt
    assert os.stat(os.path.join(cache, "shard_000001.npy")).st_mtime_ns != times["shard_000001.npy"]
    assert all(np.array_equal(np.load(os.path.join(cache, f)), x) for f, x in first.items())
    ds = data.CachedLatents(cache, seed=0, random_flip=True)
    assert [ds[i]["prompt"] for i in range(N)] == [data.ImageFolder(sd_world[1], 16)[i]["prompt"] for i in range(N)]


def test_a_cache_is_used_only_for_what_it_was_built_for(sd_world, tmp_path):
    cache = str(tmp_path / "cache")
    latents.main(cfg_args(sd_world, f"--latent_cache={cache}", "--batch_size=8"))
    cfg = lambda *more: config.get_config(cfg_args(sd_world, f"--latent_cache={cache}", *more))
    with pytest.raises(ValueError, match=r"resolution: cache 16, config 32"):
        data.make_dataset(cfg("--resolution=32"))
    with pytest.raises(ValueError, match=r"flips: cache \[False, True\], config \[False\]"):
        data.make_dataset(cfg("--random_flip=False"))
    with open(os.path.join(sd_world[1], "metadata.jsonl"), "a") as f:  # the data changed since the build
        f.write("\n")
    try:
        with pytest.raises(ValueError, match=r"data_files: cache"):
            data.make_dataset(cfg())
    finally:
        with open(os.path.join(sd_world[1], "metadata.jsonl"), "rb+") as f:
            f.truncate(os.path.getsize(f.name) - 1)
    other = build.build_tiny_model(str(tmp_path / "other"), world.WORDS, resolution=16, with_vae=True, seed=1)
    ds = data.make_dataset(cfg())
    with pytest.raises(ValueError, match="built with another VAE"):
        ds.check_vae(model.load_model(other)["vae"])
    ds.check_vae(model.load_model(sd_world[0])["vae"])
    with pytest.raises(SystemExit, match="random_crop=False"):
        data.check_config(cfg("--random_crop=True"))
    with pytest.raises(SystemExit, match="for real data"):
        data.check_config(config.get_config([f"--latent_cache={cache}"]))
    with pytest.raises(FileNotFoundError, match="meta.json: no such file; build the cache first"):
        data.CachedLatents(str(tmp_path / "none"))
    # building into a folder that holds another cache changes nothing there
    before = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)}
    with pytest.raises(SystemExit, match=r"holds a cache built for something else \(.*resolution: 16 there, 32 here"):
        latents.main(cfg_args(sd_world, f"--latent_cache={cache}", "--resolution=32"))
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)} == before
    with pytest.raises(SystemExit, match=r"is not empty and not a latent cache \(it has 'img'\)"):
        latents.main(cfg_args(sd_world, f"--latent_cache={sd_world[1]}"))  # the data folder itself
    with pytest.raises(SystemExit, match="has no VAE"):
        latents.main(cfg_args(sd_world, f"--latent_cache={tmp_path}/px", "--init_from=scratch"))
    # a shard damaged on disk: the error names it and how to rebuild it
    npy = os.path.join(cache, "shard_000000.npy")
    with open(npy, "rb+") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"shard_000000.npy: unreadable latent cache shard .* delete it and its .json"):
        ds[0]


def test_pair_methods_need_a_cache_with_losers(sd_world, tmp_path):
    """A folder without losers, and pairs cached for SSPO (which never reads the losers): DPO on either is refused."""
    single = write_pairs(str(tmp_path / "single"), n=8, paired=False)
    for name, folder, method in (("single", single, "dpo"), ("winners", sd_world[1], "sspo")):
        cache = str(tmp_path / f"cache_{name}")
        argv = ["--dataset=imagefolder", f"--data_path={folder}", f"--init_from={sd_world[0]}", f"--latent_cache={cache}"]
        latents.main(argv + ["--batch_size=8", f"--method={method}"])
        assert "latent_l" not in data.CachedLatents(cache)[0]
        with pytest.raises(SystemExit, match="method='dpo' needs paired data"):
            train_sspo.main(config.get_config(FAST + argv + ["--method=dpo", f"--out_dir={tmp_path}/run"]))
        assert not os.path.exists(tmp_path / "run")
