# SPIN-Diffusion as a special case of SSPO (SSPO.md 4): the opponent is the newest snapshot, and every self-sample
# is a loser (no SSR). Same budget as configs/tiny.py.
#   python train_sspo.py configs/tiny_spin.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_spin"
ref_policy = "last"
ssr = "off"
