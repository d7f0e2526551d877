# Baseline: SFT on the preferred images of the tiny world's pairs (the paper's "SFT on winners"), same data, budget
# and learning rate as configs/tiny.py.
#   python train_sspo.py configs/tiny_sft.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_sft"
method = "sft"
