"""The other objectives of the literature (issue 8): each loss against values worked out by hand with plain math,
the Diffusion-SDPO scale, DDIM inversion on a model whose answer is known, strict config, and a few training steps
of each tiny config on one shared tiny base."""
import math
import os

import pytest
import torch
from diffusers import DDIMScheduler

import config
import diffusion
import losses
import model
import train_sspo
from conftest import FAST


def t(*v):
    return torch.tensor(v, requires_grad=True)


def c(*v):
    return torch.tensor(v)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def softplus(x):  # -log sigmoid(z) = log(1 + exp(-z))
    return math.log1p(math.exp(-x))


# ---- DMPO -------------------------------------------------------------------------------------------------------

def test_dmpo_loss_by_hand():
    # D_w = 0.1 - 0.2 = -0.1, D_l = 0.3 - 0.2 = 0.1; z = -(10 / 2)(-0.2) = 1; p = sigmoid(1), target q = 0.99
    err_w, err_l = t(0.1), t(0.3)
    loss, stats = losses.dmpo_loss(err_w, err_l, c(0.2), c(0.2), beta=10.0, alpha=0.01)
    p = sigmoid(1.0)
    assert loss.item() == pytest.approx(p * math.log(p / 0.99) + (1 - p) * math.log((1 - p) / 0.01), rel=1e-5)
    assert stats["implicit_acc"] == 1.0
    loss.backward()  # p < q: like DPO, descent lowers the winner's error and raises the loser's
    assert err_w.grad.item() > 0 and err_l.grad.item() < 0


def test_dmpo_stops_at_the_target_and_pushes_back_past_it():
    """Reverse KL to Bernoulli(1 - alpha): zero gradient at p = 1 - alpha, i.e. z = log(99), reversed beyond it."""
    for z, sign in [(math.log(99.0), 0), (10.0, -1)]:
        err_w = torch.tensor([-z / 5], requires_grad=True)  # beta 10: z = -5 (err_w - 0) with everything else 0
        loss, _ = losses.dmpo_loss(err_w, c(0.0), c(0.0), c(0.0), beta=10.0, alpha=0.01)
        loss.backward()
        if sign == 0:
            assert abs(err_w.grad.item()) < 1e-5
        else:  # p = sigmoid(10) > 0.99: the winner's error is let rise again (mode-seeking, not DPO's push forever)
            assert err_w.grad.item() < 0


# ---- Diffusion-KTO ----------------------------------------------------------------------------------------------

def test_kto_loss_by_hand_with_a_positive_reference_point():
    # g = ref_err - err = [0.1, 0.05]; ref point = max(mean g, 0) = 0.075
    # desirable:   u0 = 10 (0.1 - 0.075) = 0.25;  undesirable: u1 = -10 (0.05 - 0.075) = 0.25
    err = t(0.1, 0.15)
    loss, stats = losses.kto_loss(err, c(0.2, 0.2), torch.tensor([True, False]), beta=10.0)
    assert loss.item() == pytest.approx(1 - sigmoid(0.25), rel=1e-5)
    assert stats["kto_ref"].item() == pytest.approx(0.075) and stats["implicit_acc"] == 1.0
    loss.backward()
    # the reference point is detached: d loss / d err_0 = (1/2) beta s(u0)(1 - s(u0)), d/d err_1 = minus that
    d = 0.5 * 10 * sigmoid(0.25) * (1 - sigmoid(0.25))
    assert err.grad.tolist() == pytest.approx([d, -d], rel=1e-5)


def test_kto_reference_point_is_clipped_at_zero():
    # g = [-0.1, -0.3]: mean -0.2 < 0, so ref = 0; u0 = 10 (-0.1) = -1 (desirable), u1 = -10 (-0.3) = 3
    loss, stats = losses.kto_loss(c(0.3, 0.5), c(0.2, 0.2), torch.tensor([True, False]), beta=10.0)
    assert stats["kto_ref"].item() == 0.0
    assert loss.item() == pytest.approx(((1 - sigmoid(-1.0)) + (1 - sigmoid(3.0))) / 2, rel=1e-5)
    assert stats["implicit_acc"] == 0.5


def test_kto_reference_point_is_the_global_batch_mean(monkeypatch):
    """Under DDP the reference point is all-reduced. Here a stand-in all_reduce adds a second rank whose
    g = [0.0, -0.4]: the mean of all four g is -0.25 / 4 < 0, so ref = 0 -- not this rank's own 0.075."""
    def all_reduce(total):  # [sum of g, count] of this rank + the other rank's
        total += torch.tensor([-0.4, 2.0])
    monkeypatch.setattr(losses.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(losses.dist, "all_reduce", all_reduce)
    _, stats = losses.kto_loss(c(0.1, 0.15), c(0.2, 0.2), torch.tensor([True, False]), beta=10.0)
    assert stats["kto_ref"].item() == 0.0
    monkeypatch.setattr(losses.dist, "all_reduce", lambda total: total.add_(torch.tensor([0.2, 2.0])))
    _, stats = losses.kto_loss(c(0.1, 0.15), c(0.2, 0.2), torch.tensor([True, False]), beta=10.0)
    assert stats["kto_ref"].item() == pytest.approx((0.15 + 0.2) / 4)  # a positive global mean is used as is


# ---- MaPO -------------------------------------------------------------------------------------------------------

def test_mapo_loss_by_hand():
    # g(x) = s x / (exp(s x) - 1), s = 0.5: g(0.2) = 0.1 / (e^0.1 - 1), g(0.4) = 0.2 / (e^0.2 - 1); T = 10
    err_w, err_l = t(0.2), t(0.4)
    loss, stats = losses.mapo_loss(err_w, err_l, beta=0.1, snr_value=0.5, num_train_timesteps=10)
    margin = 0.1 / (math.exp(0.1) - 1) - 0.2 / (math.exp(0.2) - 1)
    assert margin > 0  # the smaller error has the larger odds
    assert loss.item() == pytest.approx(0.2 + 0.1 * softplus(10 * margin), rel=1e-5)
    assert stats["margin_loss"].item() == pytest.approx(softplus(10 * margin), rel=1e-5)
    assert stats["implicit_acc"] == 1.0
    loss.backward()
    assert err_w.grad.item() > 0 and err_l.grad.item() < 0


def test_mapo_needs_no_reference_and_uses_T():
    # with T = 1000 the same pair's margin term is saturated: the loss is err_w to float precision
    loss, _ = losses.mapo_loss(c(0.2), c(0.4), beta=0.1)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)


# ---- SEE-DPO (reconstructed form) -------------------------------------------------------------------------------

def test_see_dpo_loss_by_hand():
    # z = -(1/2) [(beta + gamma)(err_w - err_l) - beta (ref_w - ref_l)] = -(1/2) [14 (-0.2) - 10 (0)] = 1.4
    err_w, err_l = t(0.1), t(0.3)
    loss, stats = losses.see_dpo_loss(err_w, err_l, c(0.2), c(0.2), beta=10.0, gamma=4.0)
    assert loss.item() == pytest.approx(softplus(1.4), rel=1e-6)
    loss.backward()  # d loss / d err_w = ((beta + gamma) / 2) sigmoid(-z)
    assert err_w.grad.item() == pytest.approx(7.0 * sigmoid(-1.4), rel=1e-5)
    # gamma = 0 is Diffusion-DPO
    args = (c(0.1, 0.4), c(0.3, 0.2), c(0.2, 0.25), c(0.2, 0.3), 10.0)
    assert losses.see_dpo_loss(*args, gamma=0.0)[0].item() == pytest.approx(losses.dpo_loss(*args)[0].item())


# ---- DPO-C&M ----------------------------------------------------------------------------------------------------

def test_dpo_cm_masks_timesteps_outside_the_window():
    # sample 0 at t = 50 (masked), sample 1 at t = 500 (kept). Sample 1: z = -5 (-0.1 - 0.1) = 1.
    err_w, err_l = t(0.3, 0.1), t(0.4, 0.3)
    loss, stats = losses.dpo_cm_loss(err_w, err_l, c(0.2, 0.2), c(0.1, 0.2), torch.tensor([50, 500]), 10.0,
                                         (100, 900))
    assert loss.item() == pytest.approx((0 + softplus(1.0)) / 2, rel=1e-6)  # the batch mean, masked samples weigh 0
    assert stats["cm_kept"] == 0.5
    loss.backward()
    assert err_w.grad[0] == 0 and err_l.grad[0] == 0 and err_w.grad[1] > 0
    # the window is [lo, hi): 900 is out, 100 is in
    _, stats = losses.dpo_cm_loss(c(0.1, 0.1), c(0.2, 0.2), c(0.1, 0.1), c(0.2, 0.2), torch.tensor([100, 900]),
                                      10.0, (100, 900))
    assert stats["cm_kept"] == 0.5


# ---- Diffusion-SDPO safeguard -----------------------------------------------------------------------------------

@pytest.mark.parametrize("pred_w, pred_l, mu, lam", [
    ([1.0, 0.0], [1.0, 1.0], 0.9, 0.1),   # |r_w|^2 = 1, <r_l, r_w> = 1: (1 - 0.9) 1 / 1
    ([2.0, 0.0], [1.0, 1.0], 0.9, 0.2),   # |r_w|^2 = 4, <r_l, r_w> = 2: 0.1 x 2
    ([2.0, 0.0], [1.0, 1.0], 0.0, 1.0),   # bound 2, clipped to 1
    ([1.0, 0.0], [-1.0, 1.0], 0.9, 1.0),  # <r_l, r_w> < 0: the loser's push does not hurt the winner: 1
])
def test_sdpo_scale_by_hand(pred_w, pred_l, mu, lam):
    """Gradients of the half-batch mean errors w.r.t. the predictions are 2 r / N with r = pred - target and N the
    same for both halves, so lambda = clip((1 - mu) |r_w|^2 / <r_l, r_w>, 0, 1)."""
    target = torch.zeros(1, 2, 1, 1)
    pw, pl = torch.tensor(pred_w).view(1, 2, 1, 1), torch.tensor(pred_l).view(1, 2, 1, 1)
    assert diffusion.sdpo_scale(pw, pl, target, target, mu).item() == pytest.approx(lam, rel=1e-6)


def test_sdpo_scale_keeps_the_winner_error_from_rising():
    """First-order check of the guarantee: the output-space step -g_w + lambda g_l has <step, g_w> <= -mu |g_w|^2."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 4, 5, 5, generator=g)
    pw = target + torch.randn(target.shape, generator=g)
    pl = pw + 0.3 * torch.randn(target.shape, generator=g)  # a loser close to the winner: gradients aligned
    lam = diffusion.sdpo_scale(pw, pl, target, target, 0.9).item()
    r_w, r_l = (pw - target).flatten(), (pl - target).flatten()
    assert 0 < lam < 1
    assert torch.dot(-r_w + lam * r_l, r_w).item() <= -0.9 * r_w.pow(2).sum().item() + 1e-4


# ---- DDIM inversion ---------------------------------------------------------------------------------------------

class ConstantEps(torch.nn.Module):
    """A 'UNet' predicting the same noise everywhere: context[:, 0, 0] broadcast over the image."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, encoder_hidden_states):
        assert t.shape == (x.shape[0],)  # each sample at its own timestep
        return type("Out", (), {"sample": encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1).expand_as(x) + self.w})


@pytest.mark.parametrize("guidance, eps", [(1.0, 0.3), (2.0, 0.1 + 2.0 * (0.3 - 0.1))])
def test_ddim_invert_of_a_constant_model_is_the_forward_process(guidance, eps):
    """With eps constant the DDIM steps telescope: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at every t, so the
    implied noise is eps itself -- whatever the number of steps, for each sample's own t (0 and 999 included)."""
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SD1.5's schedule
    abar = sched.alphas_cumprod
    x0 = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 500, 999])
    cond, uncond = torch.full((4, 77, 8), 0.3), torch.full((1, 77, 8), 0.1)
    for steps in (1, 7):
        x_t, eps_t = diffusion.ddim_invert(model.net(ConstantEps()), sched, x0, t, cond, uncond, steps, guidance)
        a = abar[t].view(-1, 1, 1, 1)
        assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)
        assert torch.allclose(eps_t, torch.full_like(x0, eps), atol=1e-4)
        assert torch.allclose(diffusion.add_noise(abar, x0, eps_t, t), x_t, atol=1e-5)


# ---- strict config ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["--method=ipo"], r"method='ipo' is not one of .*'dmpo', 'kto', 'mapo', 'see_dpo', 'dpo_cm'"),
    (["--method=kto", "--sdpo_safeguard=True"], r"sdpo_safeguard is for method 'dpo', 'sspo' or 'dmpo', not 'kto'"),
    (["--sdpo_mu=1.5"], r"sdpo_mu must be in \[0, 1\]"),
    (["--dmpo_alpha=0"], r"dmpo_alpha must be in \(0, 1\)"),
    (["--noising=ddim"], r"noising='ddim' is not one of 'forward', 'ddim_inversion'"),
    (["--noising=ddim_inversion"], r"noising='ddim_inversion' is for the preference methods, not sft"),
    (["--cm_t_range=(900, 100)"], r"cm_t_range must be two ints \(lo, hi\) with 0 <= lo < hi"),
    (["--inversion_steps=0"], r"inversion_steps must be >= 1"),
    (["--dmpo_alpa=0.1"], r"unknown key 'dmpo_alpa' .*did you mean 'dmpo_alpha'"),
])
def test_new_config_errors(argv, match):
    with pytest.raises(SystemExit, match=match):
        config.get_config(argv)


def test_kto_says_what_it_needs(tmp_path):
    """The one-line error comes before any work (in-process: main() stops right after building the dataset)."""
    cfg = config.get_config(FAST + [f"--out_dir={tmp_path}/r", "--method=kto", "--tiny_mode=base"])
    with pytest.raises(SystemExit, match=r"method='kto' needs paired data \(image_l\).*tiny_mode='pairs'.*winners are "
                                         r"its desirable, losers its undesirable samples"):
        train_sspo.main(cfg)
    assert not os.path.exists(tmp_path / "r")


# ---- a few training steps of each method on the tiny world ------------------------------------------------------

SHORT = FAST + ["--max_steps=2", "--tiny_mode=pairs", "--self_sample_steps=2", "--ckpt_every=1"]


@pytest.mark.parametrize("config, extra, logged", [
    # DMPO with the safeguard: the combination of Diffusion-SDPO's SD1.5 DMPO script
    ("configs/tiny_dmpo.py", ["--sdpo_safeguard=True"], ["implicit_acc", "sdpo_lambda", "ref = snapshot of step 0"]),
    ("configs/tiny_kto.py", [], ["kto_ref", "implicit_acc"]),
    # reference-free MaPO, inverted by the policy itself
    ("configs/tiny_mapo.py", ["--noising=ddim_inversion", "--inversion_steps=2"], ["margin_loss", "implicit_acc"]),
    ("configs/tiny_see_dpo.py", [], ["implicit_acc"]),
    ("configs/tiny_dpo_cm.py", [], ["cm_kept"]),
    ("configs/tiny_sdpo.py", [], ["sdpo_lambda", "implicit_acc"]),
    # Inversion-DPO's config plus the safeguard
    ("configs/tiny_inversion_dpo.py", ["--inversion_steps=2", "--sdpo_safeguard=True"], ["sdpo_lambda"]),
    # SSPO with the safeguard on its self-sample branch
    ("configs/tiny.py", ["--sdpo_safeguard=True"], ["sdpo_lambda", "flip_rate"]),
])
def test_each_objective_trains(tmp_path, run, base, config, extra, logged):
    """The entry script in a subprocess, as a user runs it."""
    out = str(tmp_path / "run")
    p = run([config] + SHORT + extra + [f"--out_dir={out}", f"--init_from={base}"])
    assert p.returncode == 0, p.stderr[-3000:]
    step = [line for line in p.stdout.splitlines() if line.startswith("step 2:")]
    assert step and all(k in step[0] for k in logged), step
    assert "nan" not in step[0]
    if "mapo" in config:  # reference-free: no reference UNet, no pool
        assert "ref = snapshot" not in step[0]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2
    if "inversion" in config or "--noising=ddim_inversion" in extra:
        assert ckpt["config"]["noising"] == "ddim_inversion"
