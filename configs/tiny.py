# SSPO on the tiny world: winners only, losers sampled by a snapshot drawn uniformly from the policy's history
# (Random Checkpoint Replay), Self-Sampling Regularization by sign. Starts from the tiny base, which it trains
# first with configs/tiny_base.py if out/tiny_base is missing.
#   python train_sspo.py configs/tiny.py      # 1.7 min on 2 CPU cores once the base exists
# effective batch: 1 process x batch_size 16 x grad_accum 1 = 16; 120 updates; a snapshot every 20 updates, so
# the pool grows to theta_0 + 5 (the paper shows about 7). This is the shared budget of tiny_table.py: every
# method there runs these steps on this data; batch 16 and 4 guided sampler steps per self-sample keep its 18
# self-sampling runs within the 90 min the table may take.
out_dir = "out/tiny_sspo"
init_from = "out/tiny_base"
base_config = "configs/tiny_base.py"
dataset = "tiny"
tiny_mode = "pairs"        # SSPO reads only image_w, the judge's preferred image of each pair
method = "sspo"
ssr = "sign"
ref_policy = "uniform"
ckpt_every = 20
beta = 1000.0
lr = 3e-5                  # one rate for every method of tiny_table.py (docs/tiny_world.md: why this one)
lr_schedule = "constant"
warmup_steps = 10
batch_size = 16
max_steps = 120
self_sample_steps = 4       # at guidance 1.1, 8 UNet forwards a self-sample
self_sample_guidance = 1.1   # the policy's samples as its evaluation draws them (configs/tiny_base.py: why 1.1)
guidance = 1.1
sample_steps = 10           # as configs/tiny_base.py (why 10): the base and every run are judged alike
mixed_precision = "bf16_cpu"  # bf16 autocast on CPU too: sampling and the reference 2x faster with AMX (Xeon);
                              # the seed-0 judge of SFT, oracle and DPO as in float32 to 3 decimals
eval_every = 40
save_every = 40
log_every = 10
