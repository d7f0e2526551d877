# Diffusion-SDPO (arXiv 2511.03317): Diffusion-DPO with the winner-preserving safeguard, which scales the loser
# branch's gradient by lambda in [0, 1] each micro-batch (logged as sdpo_lambda). Same budget and beta as
# configs/tiny_dpo.py; mu as the authors' SD1.5 scripts. The safeguard also applies to sspo and dmpo.
#   python train_sspo.py configs/tiny_sdpo.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_sdpo"
method = "dpo"
sdpo_safeguard = True
sdpo_mu = 0.9
