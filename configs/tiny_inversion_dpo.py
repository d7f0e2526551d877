# Inversion-DPO (arXiv 2507.11554), as noising='ddim_inversion' on Diffusion-DPO: x_t is the frozen base's
# deterministic DDIM inversion of each image (winner and loser) to its timestep, instead of random forward noise.
# Cost: inversion_steps extra UNet forwards per image, no gradients -- with 10 steps a training step takes several
# times as long as configs/tiny_dpo.py's. Same budget and beta as configs/tiny_dpo.py.
#   python train_sspo.py configs/tiny_inversion_dpo.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_inversion_dpo"
method = "dpo"
noising = "ddim_inversion"
inversion_steps = 10
inversion_guidance = 1.0
