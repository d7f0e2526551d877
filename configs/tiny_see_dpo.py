# SEE-DPO (arXiv 2411.04712) in our reconstructed form (see see_dpo_loss): Diffusion-DPO with a self-entropy bonus
# gamma on the pairs, frozen base as reference. Same budget and beta as configs/tiny_dpo.py; gamma = beta / 10.
#   python train_sspo.py configs/tiny_see_dpo.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_see_dpo"
method = "see_dpo"
see_gamma = 100.0
