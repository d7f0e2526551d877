# DMPO (arXiv 2507.07510) on the tiny world's judge-ranked pairs: a reverse KL from sigmoid(DPO logit) to
# Bernoulli(1 - alpha), frozen base as reference. Same budget as configs/tiny.py; beta scaled as there
# (tiny 1000 for SD1.5's DPO 5000, so DMPO's 2000 becomes 400).
#   python train_sspo.py configs/tiny_dmpo.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_dmpo"
method = "dmpo"
beta = 400.0
dmpo_alpha = 0.01
