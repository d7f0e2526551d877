# The tiny world's base model: SFT from scratch on the flawed base distribution (data.py), so that it draws the
# prompts' shapes but keeps the base distribution's mistakes -- room for alignment to fix.
#   python train_sspo.py configs/tiny_base.py          # about 7 minutes on 2 CPU cores
# effective batch: 1 process x batch_size 64 x grad_accum 1 = 64; 800 updates = ~51k images, one pass over the data.
# Under torchrun --nproc_per_node=2 set --batch_size=32 to keep the same global batch (and the same result).
out_dir = "out/tiny_base"
init_from = "scratch"
dataset = "tiny"
tiny_mode = "base"
max_steps = 800
eval_every = 200
save_every = 200
log_every = 50
