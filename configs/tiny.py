# SSPO on the tiny world: winners only, losers sampled by a snapshot drawn uniformly from the policy's history
# (Random Checkpoint Replay), Self-Sampling Regularization by sign. Starts from the tiny base (configs/tiny_base.py).
#   python train_sspo.py configs/tiny_base.py && python train_sspo.py configs/tiny.py
#   # SSPO: ~20 min on one core of an AVX2-only CPU (an update: ~10 s, most of it drawing the self-samples)
# effective batch: 1 process x batch_size 16 x grad_accum 1 = 16; 120 updates; a snapshot every 15 updates, so the
# pool grows to theta_0 + 7 (the paper shows about 7). Self-samples are drawn as the judge draws (10 DDIM steps at
# guidance 1.1). This is the shared budget of tiny/table.py: every method there runs these steps on this data, at
# its own learning rate and beta, chosen by the table's tuning stage (docs/tiny_world.md); lr and beta here are
# the earlier protocol's (picked on Diffusion-DPO), a grid point, not a tuned one.
out_dir = "out/tiny_sspo"
init_from = "out/tiny_base"
dataset = "tiny"
tiny_mode = "pairs"        # SSPO reads only image_w, the judge's preferred image of each pair
method = "sspo"
ssr = "sign"
ref_policy = "uniform"
ckpt_every = 15
beta = 1000.0
lr = 3e-5
lr_schedule = "constant"
warmup_steps = 10
batch_size = 16
max_steps = 120
self_sample_steps = 10      # at guidance 1.1, 20 UNet forwards a self-sample: as the judge samples
self_sample_guidance = 1.1   # the policy's samples as its evaluation draws them (configs/tiny_base.py: why 1.1)
guidance = 1.1
sample_steps = 10           # as configs/tiny_base.py (why 10): the base and every run are judged alike
mixed_precision = "no"     # float32: SSR compares policy and reference without bf16 rounding (weights rounded to
                           # ~0.4%, what 5-10 updates change), and a CPU without native bf16 runs bf16 30x slower
log_theta0 = True          # SFT rows log their winners' error against theta_0 too (d_w)
eval_every = 40
save_every = 40
log_every = 5
