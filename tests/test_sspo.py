"""SSPO: the loss functions against hand-computed values and gradient directions, and the reference pool."""
import json
import math
import os

import numpy as np
import pytest
import torch

import checkpoint
import config
import losses
import replay
import train_sspo
from conftest import FAST, ddp_bound


def t(*v):
    return torch.tensor(v, requires_grad=True)


def softplus(x):  # -log sigmoid(z) = log(1 + exp(-z))
    return math.log1p(math.exp(-x))


# ---- losses -----------------------------------------------------------------------------------------------------

def test_dpo_loss_by_hand():
    # D_w = 0.1 - 0.2 = -0.1, D_l = 0.3 - 0.2 = 0.1; z = -(10 / 2)(-0.1 - 0.1) = 1
    err_w, err_l = t(0.1), t(0.3)
    loss, stats = losses.dpo_loss(err_w, err_l, torch.tensor([0.2]), torch.tensor([0.2]), beta=10.0)
    assert loss.item() == pytest.approx(softplus(1.0), rel=1e-6)
    assert stats["implicit_acc"] == 1.0
    assert stats["d_w"].item() == pytest.approx(-0.1) and stats["d_l"].item() == pytest.approx(0.1)  # logged apart
    loss.backward()
    assert err_w.grad.item() > 0 and err_l.grad.item() < 0  # descent lowers the winner's error, raises the loser's
    # the 1/2 convention: d loss / d err_w = (beta / 2) * sigmoid(-z)
    assert err_w.grad.item() == pytest.approx(5.0 / (1 + math.e), rel=1e-6)


def test_dpo_implicit_accuracy_is_strict_and_starts_at_zero():
    e = torch.tensor([0.2, 0.5])
    _, stats = losses.dpo_loss(e, e, e, e, beta=5000.0)  # policy == reference: z = 0
    assert stats["implicit_acc"] == 0.0


@pytest.mark.parametrize("ssr", ["sign", "indicator", "off"])
def test_sspo_is_dpo_when_the_policy_fits_the_winner_better(ssr):
    # err_w 0.1 < ref_err_w 0.2: s = +1, the self-sample is a loser under every variant
    args = (torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2]), 10.0)
    loss, stats = losses.sspo_loss(*args, ssr=ssr)
    assert loss.item() == pytest.approx(losses.dpo_loss(*args)[0].item()) == pytest.approx(softplus(1.0))
    assert stats["flip_rate"] == 0.0 and stats["tie_rate"] == 0.0


@pytest.mark.parametrize("ssr, z", [("sign", -2.0), ("indicator", -0.5), ("off", 1.0)])
def test_sspo_switched_sample_by_hand(ssr, z):
    # err_w 0.3 > ref_err_w 0.2: s = -1. D_w = 0.1, D_s = 0.4 - 0.1 = 0.3, beta / 2 = 5
    #   sign:      z = -5 (D_w + D_s) = -2      indicator: z = -5 D_w = -0.5      off: z = -5 (D_w - D_s) = 1
    err_w, err_s = t(0.3), t(0.4)
    loss, stats = losses.sspo_loss(err_w, err_s, torch.tensor([0.2]), torch.tensor([0.1]), 10.0, ssr=ssr)
    assert loss.item() == pytest.approx(softplus(z), rel=1e-6)
    assert stats["flip_rate"] == 1.0 and stats["tie_rate"] == 0.0  # the criterion's, whatever ssr does with it
    loss.backward()
    assert err_w.grad.item() > 0  # the winner's error is always pushed down
    if ssr == "sign":  # SFT on both: the self-sample's error is pushed down too
        assert err_s.grad.item() > 0
    elif ssr == "indicator":  # winner-only term
        assert err_s.grad.item() == 0
    else:  # every self-sample is a loser: its error is pushed up
        assert err_s.grad.item() < 0


def test_sspo_exact_tie_takes_sign_zero():
    """err_ref == err_theta on the winner (the drawn snapshot is the policy): the winner-only term for sign and
    indicator, plain DPO for off."""
    e = torch.tensor([0.2])
    err_s = t(0.5)
    for ssr, expect in [("sign", softplus(0.0)), ("indicator", softplus(0.0)), ("off", softplus(5 * (0.5 - 0.1)))]:
        loss, stats = losses.sspo_loss(e, err_s, e, torch.tensor([0.1]), 10.0, ssr=ssr)
        assert loss.item() == pytest.approx(expect, rel=1e-6), ssr
        assert stats["flip_rate"] == 0.0 and stats["tie_rate"] == 1.0  # a tie is counted apart from a flip


def test_sspo_mixed_batch_is_the_mean_of_per_sample_losses():
    err_w, err_s, ref_w, ref_s = [torch.tensor(v) for v in ([0.1, 0.3], [0.3, 0.4], [0.2, 0.2], [0.2, 0.1])]
    loss, stats = losses.sspo_loss(err_w, err_s, ref_w, ref_s, 10.0, "sign")
    assert loss.item() == pytest.approx((softplus(1.0) + softplus(-2.0)) / 2, rel=1e-6)
    assert stats["flip_rate"] == 0.5 and stats["implicit_acc"] == 0.5
    # D_w = (-0.1, 0.1), D_s = (0.1, 0.3): the policy gained more on the winner than on the sample in both, whatever
    # SSR made of the second (implicit_acc reads SSR's logit, pref_acc does not)
    assert stats["pref_acc"] == 1.0
    assert stats["d_w"].item() == pytest.approx(0.0, abs=1e-7) and stats["d_s"].item() == pytest.approx(0.2)


def test_preference_accuracy_is_one_when_every_winner_is_fitted_better_than_its_self_sample():
    """pref_acc = mean(D_w < D_s) does not depend on SSR: 1 whenever the policy improved on every winner more than
    on its self-sample, under every ssr, also where SSR flipped the sample (the second and third) or tied (fourth)."""
    g = torch.Generator().manual_seed(0)
    ref_w, ref_s = torch.rand(64, generator=g), torch.rand(64, generator=g)
    d_w = torch.randn(64, generator=g) * 0.01  # positive in about half: SSR flips those
    d_w[0] = 0.0  # a tie
    err_w, err_s = ref_w + d_w, ref_s + d_w + torch.rand(64, generator=g) * 0.01 + 1e-4
    for ssr in ("sign", "indicator", "off"):
        _, stats = losses.sspo_loss(err_w, err_s, ref_w, ref_s, 1000.0, ssr)
        assert stats["pref_acc"] == 1.0, ssr
        assert 0.3 < stats["flip_rate"] < 0.7 and stats["tie_rate"] == 1 / 64
    _, stats = losses.sspo_loss(err_s, err_w, ref_s, ref_w, 1000.0)  # roles swapped: never
    assert stats["pref_acc"] == 0.0


def test_ssr_criteria_by_hand():
    """The margin makes small differences ties; the oracle flips by the judge alone and its agreement is 1; the
    agreement of the error criterion with the judge counts a tie as a flip (not a loser under sign or indicator)."""
    ref_w, err_w = torch.tensor([0.10, 0.10, 0.10, 0.10]), torch.tensor([0.099, 0.08, 0.101, 0.12])
    assert losses.ssr_sign(err_w, ref_w).tolist() == [1, 1, -1, -1]
    assert losses.ssr_sign(err_w, ref_w, margin=0.05).tolist() == [0, 1, 0, -1]  # |d| < 0.005: tie
    err_s, ref_s = torch.tensor([0.2] * 4), torch.tensor([0.2] * 4)
    judge_ok = torch.tensor([True, False, False, True])
    loss, stats = losses.sspo_loss(err_w, err_s, ref_w, ref_s, 10.0, "oracle", judge_ok=judge_ok)
    m = torch.tensor([-1.0, 1.0, 1.0, -1.0])  # sign's multiplier with s from the judge
    z = -5 * ((err_w - ref_w) - m * (err_s - ref_s))
    assert loss.item() == pytest.approx(torch.nn.functional.softplus(-z).mean().item(), rel=1e-6)
    assert stats["ssr_agree"] == 1.0 and stats["flip_rate"] == 0.5
    _, stats = losses.sspo_loss(err_w, err_s, ref_w, ref_s, 10.0, "sign", judge_ok=judge_ok)
    assert stats["ssr_agree"] == 0.5  # s = (1, 1, -1, -1): right on the second and fourth
    s = losses.ssr_sign(err_w, ref_w, margin=0.05)
    _, stats = losses.sspo_loss(err_w, err_s, ref_w, ref_s, 10.0, "sign", s=s, judge_ok=judge_ok)
    assert stats["ssr_agree"] == 0.75 and stats["tie_rate"] == 0.5  # the ties at 1 and 3 count as flips


# ---- the reference pool -----------------------------------------------------------------------------------------

def state(v):
    return {"w": torch.full((3,), float(v)), "b": torch.tensor([float(v)])}


def test_uniform_draw_is_uniform_over_an_unbounded_pool():
    pool = replay.ReferencePool(state(0), "uniform", seed=0)
    for s in range(30, 240, 30):
        pool.push(state(s), s)
    assert [e["step"] for e in pool.entries] == list(range(0, 240, 30))  # theta_0 + 7: the paper's K ~ 8
    counts = np.bincount([pool.draw(step) for step in range(8000)], minlength=8)
    assert counts.sum() == 8000 and np.all(np.abs(counts - 1000) < 120), counts  # ~4 sigma


def test_bounded_pool_draws_uniformly_over_the_whole_history():
    """capacity 4, 20 pushes. (1) Reservoir: each pushed snapshot is kept with probability 3/20, theta_0 always.
    (2) Draw: theta_0 with probability 1/21, each reservoir slot (20/21)/3. Together: every one of the 21
    snapshots of the history is the reference with probability 1/21, as in the paper's unbounded pool."""
    kept = np.zeros(21)
    for seed in range(2000):
        pool = replay.ReferencePool(state(0), "uniform", capacity=4, seed=seed)
        for k in range(1, 21):
            pool.push(state(k), k)
        assert len(pool.entries) == 4 and pool.entries[0]["step"] == 0
        for e in pool.entries[1:]:
            kept[e["step"]] += 1
    assert np.all(np.abs(kept[1:] / 2000 / (3 / 20) - 1) < 0.2), np.round(kept[1:] / 2000 / (3 / 20), 2)
    draws = np.bincount([pool.draw(step) for step in range(21000)], minlength=4) / 21000
    assert abs(draws[0] * 21 - 1) < 0.15 and np.all(np.abs(draws[1:] * 21 * 3 / 20 - 1) < 0.05), draws
    # a naive bounded pool (uniform over whatever is kept) would give theta_0 1/4 instead of 1/21


def test_first_and_last_keep_only_what_they_can_draw():
    first = replay.ReferencePool(state(0), "first")
    last = replay.ReferencePool(state(0), "last")
    assert last.entries[last.draw(0)]["step"] == 0  # before any push, the newest is theta_0
    for s in (30, 60, 90, 120):
        first.push(state(s), s)
        last.push(state(s), s)
        assert first.entries[first.draw(s)]["step"] == 0
        assert last.entries[last.draw(s)]["step"] == s
    assert [e["step"] for e in first.entries] == [0] and [e["step"] for e in last.entries] == [0, 120]


def test_load_into_copies_in_place():
    net = torch.nn.Linear(3, 1)
    pool = replay.ReferencePool({"weight": torch.ones(1, 3), "bias": torch.zeros(1)}, "first")
    ptr = net.weight.data_ptr()
    assert pool.load_into(0, net) == 0
    assert net.weight.data_ptr() == ptr and torch.equal(net.weight, torch.ones(1, 3))


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_pool_survives_resume(tmp_path, storage):
    """A pool rebuilt from its state_dict draws and keeps exactly what the original would have."""
    kw = dict(draw="uniform", capacity=3, storage=storage, folder=str(tmp_path / "pool"), seed=5)
    a = replay.ReferencePool(state(0), **kw)
    for s in range(1, 6):
        a.push(state(s), s)
    saved = a.state_dict()
    b = replay.ReferencePool(None, **kw)
    b.load_state_dict(saved)
    for s in range(6, 12):
        a.push(state(s), s)
        b.push(state(s), s)
        assert [e["step"] for e in a.entries] == [e["step"] for e in b.entries]
        assert a.draw(s) == b.draw(s)
    net_a, net_b = torch.nn.Module(), torch.nn.Module()
    for n in (net_a, net_b):
        n.register_buffer("w", torch.zeros(3))
        n.register_buffer("b", torch.zeros(1))
    i = a.draw(11)
    assert a.load_into(i, net_a) == b.load_into(i, net_b) and torch.equal(net_a.w, net_b.w)


def test_disk_pool_writes_safetensors_and_prunes_only_when_asked(tmp_path):
    folder = str(tmp_path / "pool")
    pool = replay.ReferencePool(state(0), "uniform", capacity=2, storage="disk", folder=folder, seed=0)
    for s in range(1, 8):
        pool.push(state(s), s)
    on_disk = sorted(os.listdir(folder))
    assert len(on_disk) > 2 and not any(f.endswith(".tmp") for f in on_disk)  # replaced files wait for prune
    pool.prune()
    assert sorted(os.listdir(folder)) == sorted(e["path"] for e in pool.entries)
    saved = pool.state_dict()
    os.remove(os.path.join(folder, pool.entries[1]["path"]))
    with pytest.raises(FileNotFoundError, match="snapshot .* is missing"):
        replay.ReferencePool(None, storage="disk", folder=folder).load_state_dict(saved)


def test_pool_rejects_bad_settings():
    with pytest.raises(ValueError, match="draw must be one of"):
        replay.ReferencePool(state(0), "newest")
    with pytest.raises(ValueError, match="capacity must be 0"):
        replay.ReferencePool(state(0), capacity=1)


# ---- the methods in the training loop ---------------------------------------------------------------------------

SMALL = FAST + ["--max_steps=4", "--ckpt_every=2", "--self_sample_steps=2", "--tiny_mode=pairs"]


@pytest.mark.parametrize("config, extra", [
    ("configs/tiny.py", []), ("configs/tiny_sft.py", []), ("configs/tiny_dpo.py", []), ("configs/tiny_spin.py", []),
    # the table's other ablations, per-step redraws, and the options no config sets: EMA, stochastic samplers
    ("configs/tiny.py", ["--ref_policy=first", "--ssr=indicator", "--ref_redraw=step", "--ema_decay=0.9",
                         "--eta=0.5", "--self_sample_eta=0.5"]),
])
def test_each_tiny_config_trains(tmp_path, run, base, config, extra):
    """The entry script in a subprocess, as a user runs it."""
    p = run([config] + SMALL + extra + [f"--out_dir={tmp_path}/run", f"--init_from={base}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "eval step 4:" in p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith("judge on seen / held-out prompts: step 0 ")  # the last line
    if "sft" not in config:
        assert "implicit_acc" in p.stdout and "ref = snapshot of step" in p.stdout
    if config in ("configs/tiny.py", "configs/tiny_spin.py"):
        assert "flip_rate" in p.stdout and "t_sample" in p.stdout and "ssr_agree" in p.stdout
    if extra:
        ckpt = torch.load(f"{tmp_path}/run/ckpt.pt", map_location="cpu", weights_only=False)
        assert ckpt["ema"] is not None and ckpt["config"]["ref_policy"] == "first"
        assert "ref = snapshot of step 0" in p.stdout and "ref = snapshot of step 2" not in p.stdout  # always theta_0


def test_sspo_resume_is_exact_with_a_disk_pool(tmp_path, run, base):
    """Stopped and resumed mid-stretch, with pushes and draws on both sides of the stop: the same weights."""
    args = SMALL + ["--method=sspo", f"--init_from={base}", "--max_steps=7", "--pool_storage=disk",
                    "--pool_capacity=3", "--ckpt_every=2", "--ref_policy=uniform"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(args + [f"--out_dir={a}"]).returncode == 0
    assert run(args + [f"--out_dir={b}", "--max_steps=3"]).returncode == 0
    p = run(args + [f"--out_dir={b}", "--init_from=resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False) for d in (a, b))
    assert all(torch.equal(ca["unet"][k], cb["unet"][k]) for k in ca["unet"])
    assert [e["step"] for e in ca["pool"]["entries"]] == [e["step"] for e in cb["pool"]["entries"]]
    # the pool folder holds exactly the snapshots that the kept checkpoints (keep_checkpoints=2) name
    named = {e["path"] for _, p in checkpoint.checkpoints(b) for e in torch.load(p, weights_only=False)["pool"]["entries"]}
    assert sorted(os.listdir(os.path.join(b, "pool"))) == sorted(named) and len(checkpoint.checkpoints(b)) == 2
    # a snapshot the checkpoint names, deleted: resuming stops in one line naming both
    gone = os.path.join(b, "pool", cb["pool"]["entries"][1]["path"])
    os.remove(gone)
    p = run(args + [f"--out_dir={b}", "--init_from=resume", "--max_steps=9"])
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"error: {checkpoint.latest_checkpoint(b)}: reference snapshot {gone} (named in the checkpoint) is missing")


def test_sspo_ddp_ranks_agree_on_the_reference(tmp_path, run, base):
    """2 processes x batch 4 == 1 process x batch 8 for SSPO with a uniform redraw every step and a stochastic
    sampler: a rank that drew another snapshot, or other sampler noise, would sample other losers and end elsewhere."""
    args = SMALL + ["--method=sspo", f"--init_from={base}", "--ckpt_every=1", "--ref_redraw=step",
                    "--self_sample_eta=0.5"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert run(args + [f"--out_dir={one}", "--batch_size=8"]).returncode == 0
    p = run(args + [f"--out_dir={two}", "--batch_size=4"], torchrun=2)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    # the control, a real difference: one process drawing another reference (the newest snapshot instead of a uniform
    # draw), as a rank that drew its own would. (A sampler without its per-step noise ends only 3% of the sum of lr
    # away, below the bound: how the sampler's noise is dealt is pinned exactly by test_train.py's
    # test_step_randomness_is_dealt_like_the_sampler.)
    three = str(tmp_path / "three")
    assert run(args + [f"--out_dir={three}", "--batch_size=8", "--ref_policy=last"]).returncode == 0
    w1, w2, w3 = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False)["unet"] for d in (one, two, three))
    d12 = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    d13 = max((w1[k] - w3[k]).abs().max().item() for k in w1)
    assert d12 < ddp_bound(args) < d13, (d12, ddp_bound(args), d13)  # float tolerance from the lr (conftest.ddp_bound)


def test_dpo_needs_pairs(tmp_path):
    with pytest.raises(SystemExit, match=r"method='dpo' needs paired data.*tiny_mode='pairs'"):
        train_sspo.main(config.get_config(FAST + [f"--out_dir={tmp_path}/r", "--method=dpo", "--tiny_mode=base"]))


def test_the_quick_starts_two_commands_on_a_v_prediction_base(tmp_path, run):
    """The base first (its own command: a zero-terminal-SNR v-prediction model, as configs/tiny_base.py's), then SSPO
    and the methods that read the prediction itself (the Diffusion-SDPO safeguard, DDIM inversion) from it. A
    missing base is one line naming it and how to make it, before any work."""
    base = tmp_path / "base"
    p = run(FAST + [f"--out_dir={base}", "--max_steps=2", "--prediction_type=v_prediction", "--zero_snr=True",
                    "--ema_decay=0.9"])
    assert p.returncode == 0, p.stderr[-3000:]
    p = run(["configs/tiny.py"] + SMALL + [f"--out_dir={tmp_path}/run", f"--init_from={base}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["config"]["method"] == "sspo"
    sched = json.load(open(tmp_path / "run" / "scheduler" / "scheduler_config.json"))
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"]
    assert sched["timestep_spacing"] == "trailing"
    for extra in (["--sdpo_safeguard=True"], ["--noising=ddim_inversion", "--inversion_steps=2"]):
        p = run(["configs/tiny_dpo.py"] + SMALL + [f"--out_dir={tmp_path}/dpo{len(extra)}", f"--init_from={base}"]
                + extra)
        assert p.returncode == 0 and "eval step 4:" in p.stdout, p.stderr[-3000:]
    p = run(["configs/tiny.py"] + SMALL + [f"--out_dir={tmp_path}/typo", f"--init_from={base}_typo"])
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"error: model folder '{base}_typo' does not exist (expected an SD-layout folder or a hub id; a run folder of "
        "train_sspo.py is one: train it first, e.g. the tiny base with python train_sspo.py configs/tiny_base.py)")
    assert not os.path.exists(f"{base}_typo") and not os.path.exists(tmp_path / "typo" / "ckpt.pt")
