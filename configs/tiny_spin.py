# SPIN-Diffusion as a special case of SSPO (SSPO.md 4), as published (Yuan et al. 2024): iterations in which the
# opponent is fixed -- the policy as it was at the iteration's start -- and draws that iteration's losers, every
# one a loser (no SSR). Here 3 iterations of 40 updates within configs/tiny.py's budget: the opponent is the newest
# snapshot, pushed every 40 updates (theta_0 for the first iteration).
#   python train_sspo.py configs/tiny_spin.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_spin"
ref_policy = "last"
ssr = "off"
ckpt_every = 40
