# SSPO on the tiny world: winners only, losers sampled by a snapshot drawn uniformly from the policy's history
# (Random Checkpoint Replay), Self-Sampling Regularization by sign. Starts from the tiny base, which it trains
# first with configs/tiny_base.py if out/tiny_base is missing.
#   python train_sspo.py configs/tiny.py
# effective batch: 1 process x batch_size 32 x grad_accum 1 = 32; 210 updates; a snapshot every 30 updates,
# so the pool grows to theta_0 + 6, about the paper's 7.
out_dir = "out/tiny_sspo"
init_from = "out/tiny_base"
base_config = "configs/tiny_base.py"
dataset = "tiny"
tiny_mode = "pairs"        # SSPO reads only image_w, the judge's preferred image of each pair
method = "sspo"
ssr = "sign"
ref_policy = "uniform"
ckpt_every = 30
beta = 1000.0
lr = 1e-4
lr_schedule = "constant"
warmup_steps = 10
batch_size = 32
max_steps = 210
self_sample_steps = 10
self_sample_guidance = 3.0
eval_every = 30
save_every = 30
log_every = 10
