# DPO-C&M of the SDPO paper (arXiv 2505.21893), as far as its description determines it: Diffusion-DPO with the
# samples whose timestep lies outside cm_t_range masked out (see dpo_cm_loss for what is left out, and the authors'
# note on their v2). Same budget and beta as configs/tiny_dpo.py.
#   python train_sspo.py configs/tiny_dpo_cm.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_dpo_cm"
method = "dpo_cm"
cm_t_range = (100, 900)
