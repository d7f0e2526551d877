# MaPO (arXiv 2406.06424): reference-free, SFT on the winner plus a margin term on the pair. No reference UNet,
# so a step costs about what SFT's does. Same budget as configs/tiny.py; beta is our choice for the tiny world.
#   python train_sspo.py configs/tiny_mapo.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_mapo"
method = "mapo"
beta = 0.1
mapo_snr = 0.5
