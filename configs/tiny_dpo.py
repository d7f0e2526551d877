# Baseline: Diffusion-DPO on the tiny world's judge-ranked pairs, the frozen base as reference; same budget as
# configs/tiny.py. The only method here that sees the losers.
#   python train_sspo.py configs/tiny_dpo.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_dpo"
method = "dpo"
