"""The training script: strict config, the loss, one-line errors, exact resume, and DDP == one process."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import config
import data
import losses
import model
import train_sspo
from tiny import build
from conftest import FAST, ddp_bound


def test_config_files_and_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("max_steps = 7\nlr = 1  # an int for a float key is fine\nunet_channels = (16, 32)\n")
    cfg = config.get_config([str(f), "--max_steps=9", "--out_dir=out/x", "--guidance=1.5"])
    assert cfg["max_steps"] == 9 and cfg["lr"] == 1.0 and type(cfg["lr"]) is float
    assert cfg["out_dir"] == "out/x" and cfg["unet_channels"] == (16, 32) and cfg["guidance"] == 1.5
    assert set(cfg) == set(config.defaults())


@pytest.mark.parametrize("argv, match", [
    (["--max_stepz=3"], r"unknown key 'max_stepz' in --max_stepz=3 \(did you mean 'max_steps'\?\)"),
    (["--max_steps=3.5"], r"max_steps in --max_steps=3.5 must be int"),
    (["--max_steps=True"], r"max_steps .* must be int"),
    (["--random_flip=1"], r"random_flip .* must be bool"),
    (["--method=ppo"], r"method='ppo' is not one of 'sft'"),
    (["--max_steps"], r"must be --key=value"),
    (["--resume"], r"'--resume' must be --key=value \(to resume a run: --init_from=resume\)"),
    (["configs/nope.py"], r"config file 'configs/nope.py' not found"),
    (["--dataset=imagefolder"], r"needs data_path"),
    (["--dataset=imagefolder", "--data_path=/no/such/folder"], r"data_path '/no/such/folder' does not exist"),
    (["--batch_size=0"], r"batch_size must be >= 1"),
    (["--pool_capacity=1"], r"pool_capacity must be 0 \(keep all\) or >= 2"),
    (["--train_text_encoder=True", "--method=sspo"], r"train_text_encoder is for SFT pretraining"),
    (["--tiny_flaws=('colour', 'smudge')"], r"tiny_flaws has \['smudge'\]"),
    (["--zero_snr=True"], r"zero_snr=True needs prediction_type='v_prediction'"),
    (["--prediction_type=sample"], r"prediction_type='sample' is not one of 'epsilon', 'v_prediction'"),
    # the right type, a value that would train something else than asked
    (["--beta=-5000"], r"beta must be > 0 \(a negative beta prefers the losers\), got -5000.0"),
    (["--grad_clip=-1"], r"grad_clip must be >= 0 \(0: no clipping\)"),
    (["--ema_decay=1.0"], r"ema_decay must be in \[0, 1\)"),
    (["--caption_dropout=1.5"], r"caption_dropout must be in \[0, 1\]"),
    (["--adam_beta2=1.0"], r"adam_beta2 must be in \[0, 1\)"),
    (["--unet_channels=(32, 60)"], r"unet_channels must be two or more positive multiples of 8"),
    (["--unet_channels=(32,)"], r"unet_channels must be two or more"),
    (["--resolution=0"], r"resolution must be >= 1"),
    (["--seed=-1"], r"seed must be >= 0"),
    (["--tiny_p_correct=1.5"], r"tiny_p_correct must be in \[0, 1\]"),
    (["--n_eval_images=0"], r"n_eval_images must be >= 1"),
    (["--num_workers=-1"], r"num_workers must be >= 0"),
    (["--text_dim=30"], r"text_dim must be a positive multiple of 4"),
    (["--self_sample_guidance=-3.0"], r"self_sample_guidance must be >= 0"),
    (["--out_dir="], r"out_dir is empty"),
    (["--lora_rank=4", "--ema_decay=0.9"], r"lora_rank=4 with ema_decay=0.9: an EMA of the adapter"),
    (["--ssr=oracle", "--dataset=imagefolder", "--data_path=."], r"ssr='oracle' flips by the tiny worlds' judge"),
    (["--data_path=data/pickapic"], r"data_path='data/pickapic' is set but dataset='tiny' draws its own images"),
])
def test_config_errors(argv, match):
    """From config.py (names, types, values) or from what the dataset and the model ask of it (data.check_config,
    model.check_config: train_sspo.main calls them before any work)."""
    with pytest.raises(SystemExit, match=match):
        cfg = config.get_config(argv)
        data.check_config(cfg)
        model.check_config(cfg)


def test_string_keys_take_the_text_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("1e-3")
    cfg = config.get_config(["--out_dir=2025", "--init_from='resume'", "--dataset=imagefolder", "--data_path=1e-3"])
    assert (cfg["out_dir"], cfg["init_from"], cfg["data_path"]) == ("2025", "resume", "1e-3")


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("lr = 1e-4\nbatchsize = 4\n")
    with pytest.raises(SystemExit, match=r"unknown key 'batchsize' in .*bad.py \(did you mean 'batch_size'\?\)"):
        config.get_config([str(bad)])
    none = tmp_path / "none.py"  # a value of a type no default has is an error too, not silently ignored
    none.write_text("ema_decay = None\n")
    with pytest.raises(SystemExit, match=r"ema_decay in .*none.py must be float"):
        config.get_config([str(none)])
    broken = tmp_path / "broken.py"
    broken.write_text("lr = (\n")
    with pytest.raises(SystemExit, match=r"broken.py does not run: SyntaxError"):
        config.get_config([str(broken)])


def test_every_config_in_configs_dir_is_valid():
    for name in sorted(os.listdir("configs")):
        if name.endswith(".py"):
            argv = [os.path.join("configs", name)]
            if name.startswith(("sd15", "sd35", "sdxl", "flux", "wan", "animatediff")):  # data path: the user's; check the rest
                argv.append(f"--data_path={os.getcwd()}")
            model.check_config(config.get_config(argv))  # what LoRA refuses too


def test_sft_loss_by_hand():
    err = torch.tensor([0.5, 1.5, 4.0], requires_grad=True)
    loss, stats = losses.sft_loss(err)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert torch.allclose(err.grad, torch.full((3,), 1 / 3))


def test_lr_schedule():
    cfg = dict(config.defaults(), lr=1.0, warmup_steps=10, max_steps=110, lr_schedule="cosine")
    assert train_sspo.lr_at(0, cfg) == pytest.approx(0.1)
    assert train_sspo.lr_at(9, cfg) == pytest.approx(1.0)
    assert train_sspo.lr_at(60, cfg) == pytest.approx(0.55)
    assert train_sspo.lr_at(110, cfg) == pytest.approx(0.1)
    assert train_sspo.lr_at(60, dict(cfg, lr_schedule="constant")) == 1.0


def test_step_randomness_is_dealt_like_the_sampler():
    """Two ranks' draws, interleaved, are the one-process draws of the same global batch (the self-sampler's
    per-step noise included), and drawing that noise last leaves the others as they were."""
    cfg = dict(config.defaults(), caption_dropout=0.5, method="sspo", self_sample_eta=0.5, self_sample_steps=3,
               ssr_draws=2, ssr_t_max=300)
    flat = lambda r: [*r[:6], *r[6]]  # SSR's draws: (eps, t)
    one = flat(data.step_randomness(cfg, 3, 0, 0, 1, (8, 3, 4, 4), 1000))
    r0 = flat(data.step_randomness(cfg, 3, 0, 0, 2, (4, 3, 4, 4), 1000))
    r1 = flat(data.step_randomness(cfg, 3, 0, 1, 2, (4, 3, 4, 4), 1000))
    assert one[5].shape == (3, 8, 3, 4, 4) and one[6].shape == (2, 8, 3, 4, 4) and one[7].shape == (2, 8)
    assert one[7].max() < 300
    for i, (a, b, full) in enumerate(zip(r0, r1, one)):
        k = 1 if i >= 4 else 0  # the examples' axis; vae_noise has (winner, loser) before it, the rest steps or draws
        assert torch.equal(torch.stack([a, b], k + 1).flatten(k, k + 1), full), i
    other = data.step_randomness(cfg, 4, 0, 0, 1, (8, 3, 4, 4), 1000)
    assert not torch.equal(one[0], other[0])
    # drawing the per-step noise and SSR's draws last leaves the others as they were
    plain = data.step_randomness(dict(cfg, self_sample_eta=0.0, ssr_draws=0), 3, 0, 0, 1, (8, 3, 4, 4), 1000)
    assert plain[5] is None and plain[6] is None and all(torch.equal(a, b) for a, b in zip(plain[:5], one[:5]))


def test_fine_tuning_never_replays_the_pretraining_stream():
    """A fine-tune (init_from a model) draws other data order, examples, noise, timesteps, caption dropout and
    self-sampling noise than pretraining (init_from='scratch') -- for any pair of seeds; a resumed run keeps its
    run's stream. Pretraining's draws are what they were before streams existed."""
    assert data.stream_of({"init_from": "scratch"}) == 0
    assert data.stream_of({"init_from": "out/tiny_base"}) == 1
    assert data.stream_of({"init_from": "resume"}, {"config": {"init_from": "scratch"}}) == 0
    assert data.stream_of({"init_from": "resume"}, {"config": {"init_from": "out/tiny_base"}}) == 1
    shape = (16, 3, 4, 4)
    draws, firsts = {}, {}
    for seed in range(4):
        cfg = dict(config.defaults(), seed=seed, method="sspo", self_sample_eta=0.5, self_sample_steps=2,
                   tiny_mode="pairs", tiny_size=256, batch_size=16, caption_dropout=0.5)
        for stream in (0, 1):
            draws[seed, stream] = data.step_randomness(cfg, 0, 0, 0, 1, shape, 1000, stream)
            ds = data.make_dataset(cfg, stream)
            batch, _ = next(data.micro_batches(ds, cfg, 0, 1, 0, 0, stream))
            firsts[seed, stream] = (batch["prompt"], batch["image_w"])
            assert not any(torch.equal(ds[i]["image_w"], data.make_dataset(cfg, 1 - stream)[i]["image_w"])
                           for i in range(8))
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0, 0]).generate_state(1)[0]))
        assert torch.equal(draws[seed, 0][0], torch.randn(shape, generator=g))  # stream 0 as before
    for a in range(4):
        for b in range(4):  # no fine-tune seed replays any pretraining seed's first micro-step
            ft, pt = draws[a, 1], draws[b, 0]
            for i in (0, 3, 5):  # eps, the self-sampler's x_T, its per-step noise
                assert not torch.equal(ft[i], pt[i]), (a, b, i)
            assert not torch.equal(ft[1], pt[1]) and not torch.equal(ft[2], pt[2])  # timesteps, caption dropout
            assert firsts[a, 1][0] != firsts[b, 0][0] and not torch.equal(firsts[a, 1][1], firsts[b, 0][1])


def unet_weights(run_dir):
    return torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=False)["unet"]


def test_run_writes_a_loadable_run_and_refuses_to_overwrite(tmp_path, run):
    out = str(tmp_path / "run")
    p = run(FAST + [f"--out_dir={out}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "eval step 0: eval_loss" in p.stdout and "eval step 4:" in p.stdout and "judge_heldout" in p.stdout
    for f in ("ckpt.pt", "log.txt", "unet/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json",
              "scheduler/scheduler_config.json", "model_index.json", "samples/step000000.png", "samples/step000004.png"):
        assert os.path.exists(os.path.join(out, f)), f
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["config"]["max_steps"] == 4 and "optimizer" in ckpt
    # unet/ holds the same weights as the checkpoint
    import model
    m = model.load_model(out)
    for k, v in m["unet"].state_dict().items():
        assert torch.equal(v, ckpt["unet"][k]), k
    p = run(FAST + [f"--out_dir={out}"])
    assert p.returncode != 0 and "already holds a run" in p.stderr
    assert torch.equal(unet_weights(out)["conv_in.weight"], ckpt["unet"]["conv_in.weight"])  # nothing lost


def test_resume_is_exact(tmp_path, run):
    """Stopped at step 3 of 6 and resumed == 6 straight: the same weights, bit for bit (CPU)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # 40 examples: the epoch turns mid-run; the text encoder trains too, so its state must resume as well
    args = FAST + ["--max_steps=6", "--grad_accum=2", "--tiny_size=40", "--train_text_encoder=True"]
    assert run(args + [f"--out_dir={a}"]).returncode == 0
    p = run(args + [f"--out_dir={b}", "--max_steps=3"])
    assert p.returncode == 0, p.stderr[-3000:]
    p = run(args + [f"--out_dir={b}", "--init_from=resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stdout and "config changed since: {'max_steps': (3, 6)}" in p.stdout
    wa, wb = unet_weights(a), unet_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ta, tb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False)["text_encoder"] for d in (a, b))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    wc = torch.load(os.path.join(b, "ckpt.pt"), weights_only=False)
    assert wc["step"] == 6 and wc["data_pos"] == (2, 2)  # 5 micro-batches an epoch; 12 taken = 5 + 5 + 2


def test_resume_without_or_from_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    train = lambda *args: train_sspo.main(config.get_config(FAST + list(args)))
    with pytest.raises(SystemExit, match=r"ckpt.pt does not exist$"):
        train(f"--out_dir={tmp_path}/none", "--init_from=resume")
    out = tmp_path / "run"
    train(f"--out_dir={out}", "--save_every=2")
    newest, older = out / "ckpt_00000004.pt", out / "ckpt_00000002.pt"
    whole = newest.read_bytes()
    os.remove(newest)  # (ckpt.pt, its hard link, keeps the whole file)
    newest.write_bytes(whole[:len(whole) // 2])  # as a copy that was cut short
    with pytest.raises(SystemExit, match=rf"^error: {newest} is not a readable checkpoint \(RuntimeError: .*\); "
                                         rf"the one before it is {older}: move ckpt_00000004.pt away"):
        train(f"--out_dir={out}", "--init_from=resume", "--max_steps=6")
    os.rename(newest, out / "broken.pt")
    capsys.readouterr()
    train(f"--out_dir={out}", "--init_from=resume", "--max_steps=6")
    assert f"resuming {older} at step 2" in capsys.readouterr().out
    import evaluate
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=rf"^error: {out / 'ckpt.pt'} is not a readable checkpoint \(.*\)$"):
        evaluate.load_run(str(out))


def test_ddp_two_processes_equal_one(tmp_path, run):
    """torchrun with 2 processes x batch 4 ends with the weights of 1 process x batch 8 (float tolerance)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = FAST + ["--max_steps=3", "--grad_accum=2", "--caption_dropout=0.5", "--train_text_encoder=True"]
    p = run(args + [f"--out_dir={one}", "--batch_size=8"])
    assert p.returncode == 0, p.stderr[-3000:]
    p = run(args + [f"--out_dir={two}", "--batch_size=4"], torchrun=2)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    assert "2 process(es)" in p.stdout
    # the scale of a real difference: same init and data, only some examples' caption-dropout draws differ,
    # as they would if the ranks dealt the randomness wrongly
    three = str(tmp_path / "three")
    assert run(args + [f"--out_dir={three}", "--batch_size=8", "--caption_dropout=0.3"]).returncode == 0
    # the eval draws for the global batch, whatever the processes: the same examples, noise and samples (the loss
    # may differ in the last bits, the UNet seeing batches of 4 instead of 8)
    # and the eval's samples do not depend on the micro-batch either: one process at batch 4 judges step 0 alike
    four = str(tmp_path / "four")
    assert run(FAST + [f"--out_dir={four}", "--max_steps=1", "--batch_size=4"]).returncode == 0
    evals = [dict(kv.rsplit(" ", 1) for kv in line.split(": ", 1)[1].split(", "))
             for d in (one, two, four) for line in open(os.path.join(d, "log.txt")) if line.startswith("eval step 0:")]
    assert len(evals) == 3 and evals[0]["judge_seen"] == evals[1]["judge_seen"] == evals[2]["judge_seen"], evals
    assert evals[0]["judge_heldout"] == evals[1]["judge_heldout"] == evals[2]["judge_heldout"]
    # logged to 4 decimals: last bits apart can round to neighbours, one unit apart (compared in units, as the
    # decimals parsed to binary floats can be a hair more than 1e-4 apart)
    assert abs(round(float(evals[0]["eval_loss"]) * 1e4) - round(float(evals[1]["eval_loss"]) * 1e4)) <= 1
    w1, w2, w3 = unet_weights(one), unet_weights(two), unet_weights(three)
    d12 = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    d13 = max((w1[k] - w3[k]).abs().max().item() for k in w1)
    # gradients summed in another order differ in the last bits, which Adam can turn into part of a step (ddp_bound);
    # the control, a real difference, must be far outside it: above half of all the lr its updates had
    bound = ddp_bound(args)
    assert d12 < bound < d13 / 10, (d12, bound, d13)
    # the text encoder's gradients are averaged by hand (it is not inside DDP): the same check
    t1, t2 = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False)["text_encoder"] for d in (one, two))
    assert max((t1[k] - t2[k]).abs().max().item() for k in t1) < bound


def test_trained_text_encoder_is_saved_in_the_run_folder(tmp_path, run):
    out = str(tmp_path / "run")
    assert run(FAST + [f"--out_dir={out}", "--train_text_encoder=True"]).returncode == 0
    fresh = build.build_tiny_model(str(tmp_path / "fresh"))  # the same seed-0 init, the tiny world's words
    before = model.load_model(fresh)["text_encoder"].state_dict()
    after = model.load_model(out)["text_encoder"].state_dict()
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["text_encoder"]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(after[k], ckpt[k]) for k in after)


def test_too_small_data_and_resume_past_max_steps_are_errors(tmp_path, run):
    p = run(FAST + [f"--out_dir={tmp_path}/small", "--tiny_size=5"])
    assert p.returncode != 0 and "the dataset has 5 examples, fewer than one micro-batch of 8" in p.stderr
    out = str(tmp_path / "r")
    assert run(FAST + [f"--out_dir={out}"]).returncode == 0
    p = run(FAST + [f"--out_dir={out}", "--init_from=resume", "--max_steps=2"])
    assert p.returncode != 0 and "is at step 4, past max_steps=2" in p.stderr
    p = run(FAST + [f"--out_dir={out}", "--init_from=resume"])  # at max_steps: nothing to do, nothing logged twice
    assert p.returncode == 0 and "is at max_steps=4: the run is finished" in p.stdout, p.stderr[-3000:]
    evals = [line for line in open(os.path.join(out, "log.jsonl")) if '"kind": "eval"' in line]
    assert [json.loads(line)["step"] for line in evals] == [0, 4]


def test_resume_repairs_an_interrupted_unet_swap(tmp_path, run):
    """A crash between save_checkpoint's renames leaves unet.old/ and no unet/: resume puts it back."""
    out = str(tmp_path / "r")
    assert run(FAST + [f"--out_dir={out}"]).returncode == 0
    os.replace(os.path.join(out, "unet"), os.path.join(out, "unet.old"))
    p = run(FAST + [f"--out_dir={out}", "--init_from=resume", "--max_steps=5"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.path.isdir(os.path.join(out, "unet")) and not os.path.exists(os.path.join(out, "unet.old"))


@pytest.mark.parametrize("args, match", [
    (["--max_stepz=3"], "unknown key 'max_stepz'"),  # the command line's own output: no traceback, no warning
    (["--init_from=/no/such/model"], "model folder '/no/such/model' does not exist"),
])
def test_errors_are_one_line(tmp_path, run, args, match):
    p = run(FAST + [f"--out_dir={tmp_path}/r"] + args)
    assert p.returncode != 0
    assert len(p.stderr.strip().splitlines()) == 1 and match in p.stderr, p.stderr[-3000:]


def fresh(tmp_path, base, name="r"):
    """A copy of the shared 2-step base run (its checkpoint included) that a test may resume or damage."""
    out = str(tmp_path / name)
    shutil.copytree(base, out)
    return out


def test_what_the_model_cannot_do_or_a_broken_model_is_one_line(tmp_path, base):
    """Checked right after loading, before any step: no traceback, nothing trained."""
    for args, match in ((["--resolution=15"], r"resolution=15 is not a multiple of 2 \(the VAE's and the UNet's"),
                        (["--sample_steps=2000"], r"sample_steps=2000 does not fit the scheduler's 1000 timesteps"),
                        # SD1.5's steps_offset 1: 1000 steps would start at timestep 1000 (an IndexError before)
                        (["--self_sample_steps=1000", "--method=sspo"], r"self_sample_steps=1000 does not fit")):
        with pytest.raises(SystemExit, match=match):
            train_sspo.main(config.get_config(FAST + [f"--out_dir={tmp_path}/{args[0][2:6]}", *args]))
    broken = fresh(tmp_path, base, "broken")
    for f in os.listdir(os.path.join(broken, "unet")):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(broken, "unet", f))
    with pytest.raises(SystemExit, match=r"^error: \S*/broken/unet: UNet2DConditionModel: .*no file named") as e:
        train_sspo.main(config.get_config(FAST + [f"--out_dir={tmp_path}/from_broken", f"--init_from={broken}"]))
    assert "\n" not in str(e.value)


def test_resume_accepts_the_same_global_micro_batch_on_other_process_counts():
    cfg = config.get_config(FAST + ["--batch_size=4"])
    ckpt = {"config": {**cfg, "batch_size": 8}, "world": 1}
    checkpoint.check_resumable(cfg, ckpt, 2, "ckpt.pt")  # 1 x 8 -> 2 x 4
    checkpoint.check_resumable({**cfg, "batch_size": 2}, {**ckpt, "world": 4}, 16, "ckpt.pt")  # 4 x 8 -> 16 x 2
    checkpoint.check_resumable(cfg, {"config": ckpt["config"]}, 2, "ckpt.pt")  # an older checkpoint: not known
    with pytest.raises(SystemExit, match=r"global micro-batch of 8 .* Resume with batch_size=4 \("):
        checkpoint.check_resumable({**cfg, "batch_size": 8}, ckpt, 2, "ckpt.pt")
    with pytest.raises(SystemExit, match=r"Resume with a process count that divides 8"):
        checkpoint.check_resumable({**cfg, "batch_size": 1}, ckpt, 3, "ckpt.pt")


@pytest.mark.parametrize("key, was, now", [("ref_policy", "first", "uniform"), ("ref_policy", "last", "uniform"),
                                           ("pool_capacity", 0, 3), ("pool_storage", "memory", "disk")])
def test_resume_refuses_another_pool(key, was, now):
    """The pool's saved entries hold what its draw policy and size kept (under 'first' only theta_0): resumed
    under another, a uniform draw would crash on an empty range or favour the newest snapshot."""
    cfg = config.get_config(FAST + ["--method=sspo", "--tiny_mode=pairs", f"--{key}={now}"])
    with pytest.raises(SystemExit, match=rf"^error: ckpt.pt is a run with {key}={was!r}; it cannot resume as "
                                         rf"{key}={now!r}"):
        checkpoint.check_resumable(cfg, {"config": {**cfg, key: was}, "world": 1}, 1, "ckpt.pt")


@pytest.mark.parametrize("args, match", [
    (["--batch_size=4"], r"global micro-batch of 8 \(processes x batch_size\); this run has 1 x 4 = 4. Resume with "
                         r"batch_size=8"),
    (["--method=sspo", "--tiny_mode=pairs"], r"is a run with method='sft'; it cannot resume as method='sspo'"),
])
def test_resume_refuses_another_global_batch_or_method(tmp_path, base, args, match):
    out = fresh(tmp_path, base)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["world"] == 1 and ckpt["config"]["batch_size"] == 8
    with pytest.raises(SystemExit, match=match):
        train_sspo.main(config.get_config(FAST + [f"--out_dir={out}", "--init_from=resume", *args]))
    assert [s for s, _ in checkpoint.checkpoints(out)] == [s for s, _ in checkpoint.checkpoints(base)]  # nothing new


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        config.get_config(["configs/tiny.py", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{k}={v!r}" in out for k, v in config.defaults().items()), out


def test_bf16_cpu_autocasts_policy_and_reference_alike(tmp_path, run, base):
    """mixed_precision='bf16_cpu' trains under CPU autocast with every model in fp32: the first DPO update sees the
    policy equal to its reference (loss exactly log 2, as in fp32; with a bf16 reference it is not), and it trains
    other weights than fp32 does."""
    weights = {}
    for mp, ref_dtype in (("bf16_cpu", "float32"), ("no", "float32"), ("bf16_cpu", "bfloat16")):
        out = str(tmp_path / f"{mp}_{ref_dtype}")
        p = run(FAST + [f"--out_dir={out}", f"--init_from={base}", "--method=dpo", "--tiny_mode=pairs",
                        "--max_steps=2", f"--mixed_precision={mp}", f"--ref_dtype={ref_dtype}"])
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"bf16 autocast: {mp == 'bf16_cpu'};" in p.stdout
        first = next(e for e in map(json.loads, open(os.path.join(out, "log.jsonl"))) if e["kind"] == "train")
        assert first["step"] == 1
        assert (abs(first["loss"] - np.log(2)) < 1e-6) == (ref_dtype == "float32"), (mp, ref_dtype, first["loss"])
        weights[mp, ref_dtype] = unet_weights(out)
    a, b = weights["bf16_cpu", "float32"], weights["no", "float32"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
