"""
The objectives: pure functions of per-sample denoising errors (shape (B,), float32 means over C,H,W, model.py's
denoising_error), each returning (loss, stats). No I/O, no globals, one collective (Diffusion-KTO's reference point):
what a fork changes for an ablation, and what tests/test_train.py, test_sspo.py and test_objectives.py pin down
against hand-computed values. train_sspo.py's loop computes the errors (policy and reference, winners first, shared
noise and timestep) and calls the method's entry of OBJECTIVES at the end of this file.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def sft_loss(err_w, ref_err_w=None):
    """Supervised fine-tuning: plain eps-MSE on the (winning) images. Also how a base model is pretrained.
    ref_err_w (measurement only, log_theta0): theta_0's errors on the same draws, logged as d_w = err_w - ref_err_w,
    how far SFT has lowered the winners' error below the base's (the number SSPO's d_w is read against)."""
    stats = {} if ref_err_w is None else {"d_w": (err_w - ref_err_w).mean().detach(), "ref_err_w": ref_err_w.mean()}
    return err_w.mean(), stats


def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta):
    """Diffusion-DPO (Wallace et al. 2023) in the convention of its reference code: the 1/2 explicit, T*omega(t)
    folded into beta (SD1.5: 5000). z > 0 when the policy improved on the winner more than on the loser."""
    d_w, d_l = err_w - ref_err_w, err_l - ref_err_l  # policy minus reference: both rise when the winners are displaced
    z = -0.5 * beta * (d_w - d_l)
    stats = {"implicit_acc": (z > 0).float().mean(), "d_w": d_w.mean(), "d_l": d_l.mean(), "err_w": err_w.mean(),
             "err_l": err_l.mean(), "ref_err_w": ref_err_w.mean(), "ref_err_l": ref_err_l.mean()}
    return -F.logsigmoid(z).mean(), {k: v.detach() for k, v in stats.items()}


def ssr_sign(err_w, ref_err_w, margin=0.0):
    """SSR's criterion (SSPO.md 4): s = sign(ref_err_w - err_w) per sample, detached: +1 when the policy fits the
    winner better than the reference does. margin > 0 (not in the paper): |ref_err_w - err_w| below margin x ref_err_w
    counts as a tie (s = 0), so a difference within the noise of one (eps, t) draw decides nothing."""
    d = (ref_err_w - err_w).detach()
    s = torch.sign(d)
    return torch.where(d.abs() < margin * ref_err_w.detach(), torch.zeros_like(s), s) if margin > 0 else s


def sspo_loss(err_w, err_s, ref_err_w, ref_err_s, beta, ssr="sign", s=None, judge_ok=None):
    """SSPO (SSPO.md 4): Diffusion-DPO between the winner and the reference's own sample, with Self-Sampling
    Regularization. s = sign(ref_err_w - err_w), per sample, detached: +1 when the policy already fits the winner
    better than the reference does, so the reference's sample is judged a loser (plain DPO); otherwise the sample
    is likely as good as the winner and the update turns SFT-like. The multiplier m on the sample's term:
      ssr="sign" (v1):      m = s: at -1 both errors are pushed down; a tie (s = 0) keeps the winner term only
      ssr="indicator" (v2): m = 1 if s = +1 else 0: the winner term alone
      ssr="off" (ablation): m = 1: every self-sample is a loser (SPIN-Diffusion with ref = last)
      ssr="oracle":         m = s as for "sign", but s = -1 where the judge finds the self-sample at least as good as
                            the winner (judge_ok), else +1: the upper bound of the SSR idea (tiny worlds only)
    s: the criterion computed elsewhere (ssr_sign on other (eps, t) draws); None: ssr_sign of these errors.
    The loss's form is reconstructed from the paper's reviews (SSPO.md 4), not quoted from an equation.
    Stats: flip_rate (s = -1) and tie_rate (s = 0) apart; pref_acc, whether the policy gained more on the winner
    than on the sample (D_w < D_s), which does not depend on SSR, unlike implicit_acc (z > 0 on SSR's logit);
    ssr_agree, the share of samples where SSR's choice (s <= 0: not a loser) is the judge's, given judge_ok."""
    if ssr == "oracle":
        s = torch.where(judge_ok, -1.0, 1.0).to(err_w.dtype)
    elif s is None:
        s = ssr_sign(err_w, ref_err_w)
    m = {"sign": s, "oracle": s, "indicator": (s > 0).float(), "off": torch.ones_like(s)}[ssr]
    d_w, d_s = err_w - ref_err_w, err_s - ref_err_s
    z = -0.5 * beta * (d_w - m * d_s)
    stats = {"implicit_acc": (z > 0).float().mean(), "pref_acc": (d_w < d_s).float().mean(),
             "flip_rate": (s < 0).float().mean(), "tie_rate": (s == 0).float().mean(), "d_w": d_w.mean(),
             "d_s": d_s.mean(), "err_w": err_w.mean(), "err_s": err_s.mean(), "ref_err_w": ref_err_w.mean(),
             "ref_err_s": ref_err_s.mean()}
    if judge_ok is not None:
        stats["ssr_agree"] = ((s <= 0) == judge_ok).float().mean()
    return -F.logsigmoid(z).mean(), {k: v.detach() for k, v in stats.items()}


def dmpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta, alpha):
    """DMPO (Li, Xu, Dang, Ermon 2025, arXiv 2507.07510): minimise the reverse KL from the model's preference
    probability p = sigmoid(z), z the Diffusion-DPO logit in the 1/2 convention, to a target Bernoulli(1 - alpha):
    KL(p || q) = p log(p / q) + (1 - p) log((1 - p) / (1 - q)), q = 1 - alpha. As in the Diffusion-SDPO authors' code
    (SD1.5: alpha 0.01, beta 2000). Unlike DPO it stops pushing once p reaches 1 - alpha: mode-seeking."""
    z = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    p, q = torch.sigmoid(z), 1.0 - alpha
    log_p, log_1mp = -F.softplus(-z), -F.softplus(z)  # log sigmoid(z), log sigmoid(-z): stable for large |z|
    kl = p * (log_p - math.log(q)) + (1 - p) * (log_1mp - math.log(alpha))
    stats = {"implicit_acc": (z > 0).float().mean(), "err_w": err_w.mean(), "err_l": err_l.mean(),
             "ref_err_w": ref_err_w.mean(), "ref_err_l": ref_err_l.mean()}
    return kl.mean(), {k: v.detach() for k, v in stats.items()}


def kto_loss(err, ref_err, desirable, beta):
    """Diffusion-KTO (Li et al. 2024, arXiv 2404.04465) on unpaired samples. The implicit reward of a sample is how
    much better the policy denoises it than the reference, g = ref_err - err; the reference point is
    max(mean g, 0) over the global batch, detached (all-reduced across ranks: the one collective in a loss here).
    loss = mean(1 - sigmoid(beta (g - ref))) on desirable samples, mean(1 - sigmoid(beta (ref - g))) on the others.
    No 1/2 in this logit. Pick-a-Pic pairs are fed as winners desirable, losers undesirable (Diffusion-KTO's setup)."""
    g = ref_err - err
    total = torch.stack([g.detach().sum(), torch.tensor(float(g.numel()), device=g.device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    ref = (total[0] / total[1]).clamp(min=0)
    sign = desirable.float() * 2 - 1  # +1 desirable, -1 undesirable
    u = sign * beta * (g - ref)
    stats = {"implicit_acc": (u > 0).float().mean(), "kto_ref": ref, "err": err.mean(), "ref_err": ref_err.mean()}
    return (1 - torch.sigmoid(u)).mean(), {k: v.detach() for k, v in stats.items()}


def mapo_loss(err_w, err_l, beta, snr_value=0.5, num_train_timesteps=1000):
    """MaPO (Hong et al. 2024, arXiv 2406.06424), reference-free: SFT on the winner plus a margin term on the odds
    g(x) = s x / (exp(s x) - 1), a decreasing function of the error standing in for the likelihood:
    loss = mean(err_w) - beta mean(log sigmoid(T (g(err_w) - g(err_l)))), as its reference code computes it."""
    def g(x):
        return snr_value * x / torch.expm1(snr_value * x)
    margin = g(err_w) - g(err_l)
    ratio = F.logsigmoid(num_train_timesteps * margin)
    stats = {"implicit_acc": (margin > 0).float().mean(), "margin_loss": -ratio.mean(), "err_w": err_w.mean(),
             "err_l": err_l.mean()}
    return err_w.mean() - beta * ratio.mean(), {k: v.detach() for k, v in stats.items()}


def see_dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta, gamma):
    """SEE-DPO (Shekhar, Singh, Zhang 2024/TMLR 2025, arXiv 2411.04712), **reconstructed**: we did not read its
    diffusion loss verbatim. Adding a self-entropy bonus gamma H(p_theta) to the KL-regularised objective
    max E[r] - beta KL(p_theta || p_ref) + gamma H(p_theta) gives the optimum p* ~ p_ref^(beta / (beta + gamma))
    exp(r / (beta + gamma)) -- the reference flattened, as the paper describes -- so the implicit reward is
    (beta + gamma) log p_theta - beta log p_ref. With log p ~ -err (the Diffusion-DPO bound, 1/2 convention):
    z = -(1/2) [(beta + gamma)(err_w - err_l) - beta (ref_err_w - ref_err_l)]; gamma = 0 is Diffusion-DPO."""
    z = -0.5 * ((beta + gamma) * (err_w - err_l) - beta * (ref_err_w - ref_err_l))
    stats = {"implicit_acc": (z > 0).float().mean(), "err_w": err_w.mean(), "err_l": err_l.mean(),
             "ref_err_w": ref_err_w.mean(), "ref_err_l": ref_err_l.mean()}
    return -F.logsigmoid(z).mean(), {k: v.detach() for k, v in stats.items()}


def dpo_cm_loss(err_w, err_l, ref_err_w, ref_err_l, t, beta, t_range):
    """DPO-C&M of the SDPO paper (Yang et al. 2025, arXiv 2505.21893; v2 carries the authors' note of a critical
    error in its main theorem; v3 is renamed SIPO), **only as far as its public description determines it**:
    Diffusion-DPO with the uninformative timesteps masked out. Here a sample counts iff lo <= t < hi, and the
    per-sample loss is multiplied by that 0/1 weight before the batch mean (a masked sample weighs 0, like an
    importance weight clipped to 0). Not determined by what we could read, so not implemented: the estimator of
    the step-wise importance weight p_theta(x_t-1 | x_t) / q(x_t-1 | x_t, x0), its clip value and masking threshold;
    the window (lo, hi) stands in for them and is our choice."""
    z = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    keep = ((t >= t_range[0]) & (t < t_range[1])).float()
    stats = {"implicit_acc": (z > 0).float().mean(), "cm_kept": keep.mean(), "err_w": err_w.mean(),
             "err_l": err_l.mean(), "ref_err_w": ref_err_w.mean(), "ref_err_l": ref_err_l.mean()}
    return (keep * -F.logsigmoid(z)).mean(), {k: v.detach() for k, v in stats.items()}


# -----------------------------------------------------------------------------------------------------------------
# method -> its loss, all called alike: e holds the policy's per-sample errors on the winners ("w") and on the
# losers or self-samples ("l"), the reference's ("ref_w", "ref_l"), the timesteps ("t") and the schedule's length
# ("T"); c is the config. Adding an objective is one pure function above and one line here.
OBJECTIVES = {
    "sft": lambda e, c: sft_loss(e["w"], e.get("ref_w")),
    "dpo": lambda e, c: dpo_loss(e["w"], e["l"], e["ref_w"], e["ref_l"], c["beta"]),
    "sspo": lambda e, c: sspo_loss(e["w"], e["l"], e["ref_w"], e["ref_l"], c["beta"], c["ssr"],  # SSR's criterion on
                                   ssr_sign(e.get("crit_w", e["w"]), e.get("crit_ref_w", e["ref_w"]), c["ssr_margin"]),
                                   e.get("judge_ok")),  # its own (eps, t) draws if ssr_draws, the judge if oracle
    "dmpo": lambda e, c: dmpo_loss(e["w"], e["l"], e["ref_w"], e["ref_l"], c["beta"], c["dmpo_alpha"]),
    "kto": lambda e, c: kto_loss(torch.cat([e["w"], e["l"]]), torch.cat([e["ref_w"], e["ref_l"]]),  # unpaired:
                                 torch.arange(2 * len(e["w"]), device=e["w"].device) < len(e["w"]), c["beta"]),
    "mapo": lambda e, c: mapo_loss(e["w"], e["l"], c["beta"], c["mapo_snr"], e["T"]),
    "see_dpo": lambda e, c: see_dpo_loss(e["w"], e["l"], e["ref_w"], e["ref_l"], c["beta"], c["see_gamma"]),
    "dpo_cm": lambda e, c: dpo_cm_loss(e["w"], e["l"], e["ref_w"], e["ref_l"], e["t"], c["beta"], c["cm_t_range"]),
}
PAIR_METHODS = ("dpo", "dmpo", "kto", "mapo", "see_dpo", "dpo_cm")  # read image_l from the data
REF_METHODS = ("dpo", "sspo", "dmpo", "kto", "see_dpo", "dpo_cm")    # compare with a frozen reference UNet


def needs_reference(cfg):
    """Whether a run keeps a reference UNet and its pool: the methods that compare with one, and SFT logging theta_0."""
    return cfg["method"] in REF_METHODS or cfg["log_theta0"] and cfg["method"] == "sft"
