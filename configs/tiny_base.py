# The tiny world's base model: SFT from scratch on the flawed base distribution (data.py), so that it draws the
# prompts' shapes but keeps the base distribution's mistakes -- room for alignment to fix.
#   python train_sspo.py configs/tiny_base.py          # 7 min on 2 CPU cores (judge 0.06 -> 0.42)
# effective batch: 1 process x batch_size 32 x grad_accum 1 = 32; 1500 updates = 48k images, about one pass.
# Under torchrun --nproc_per_node=2 set --batch_size=16 to keep the same global batch (and the same result).
out_dir = "out/tiny_base"
init_from = "scratch"
dataset = "tiny"
tiny_mode = "base"
train_text_encoder = True   # from scratch, a frozen random encoder is a weak condition: +0.04 judge at 800 updates
batch_size = 32
lr = 2e-3
max_steps = 1500
eval_every = 250
save_every = 250
log_every = 50
