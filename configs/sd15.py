# SSPO on Stable Diffusion 1.5 with Pick-a-Pic v2's preferred images (the losers are never read), 8 GPUs:
# the paper's run as far as it states it (SSPO.md 4 and 6), and our choices where it does not.
#   torchrun --nproc_per_node=8 train_sspo.py configs/sd15.py --data_path=/path/to/pickapic_v2/train
# effective batch: 8 GPUs x batch_size 16 x grad_accum 16 = 2048 (SSPO.md 6; Diffusion-DPO used 16 x 1 x 128).
# Per-GPU batch 16, not 1: on an H100 an SSPO micro-batch of 1 takes 1.28 s and one of 16 takes 3.07 s (the UNet
# is launch-bound at small batches); the real loop at 16 peaked at 24.8 GiB on one GPU (README, Performance;
# dev/bench.py's SSPO step then freed its gradients after each update: 21.6 GiB; it now holds them, as training does).
# A smaller GPU: lower batch_size and raise grad_accum by the same factor (the update is the same mean).
# lr: 1e-8 per sample x 2048 = 2.048e-5, constant after warmup, as Diffusion-DPO's launcher
# time: not measured end to end. Self-sampling costs 2 x self_sample_steps UNet forwards per example on top of
# Diffusion-DPO's step; 210 updates show the paper's ~7 snapshots (7 x 30). See the README for the H100 figures.
# Baselines: --method=sft (SFT on winners), --method=dpo (pairs, frozen base), --ref_policy=last --ssr=off (SPIN).
out_dir = "out/sd15_sspo"
init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, or a local folder in the same layout
dataset = "pickapic"
data_path = "data/pickapic_v2/train"  # a folder of parquet shards (caption, jpg_0, jpg_1, label_0, label_1)
resolution = 512
random_flip = True
caption_dropout = 0.2               # Diffusion-DPO's proportion_empty_prompts (diffusers' example uses 0)
num_workers = 4
method = "sspo"
beta = 5000.0                       # Diffusion-DPO's SD1.5 value in the 1/2 convention; SSPO's is not stated
ssr = "sign"                        # the paper's v1 default; 'indicator' is its v2 wording (21.57 vs 21.56 PickScore)
ref_policy = "uniform"              # Random Checkpoint Replay over all snapshots, theta_0 included
ckpt_every = 30                     # the paper's snapshot interval
pool_storage = "disk"               # 1.7 GB a snapshot in bf16: out_dir/pool/, not 8 ranks' RAM
ref_dtype = "bfloat16"              # reference and snapshots in bf16; the policy keeps fp32 master weights
self_sample_steps = 20              # not stated in the paper: our choice (its evaluation pipeline uses 50)
self_sample_guidance = 7.5          # the evaluation pipeline's guidance; not stated for training
batch_size = 16
grad_accum = 16
max_steps = 210
lr = 2.048e-5
lr_schedule = "constant"
warmup_steps = 10                   # Diffusion-DPO warms up its constant lr; the length is ours (210 updates here)
grad_checkpointing = True           # H100, batch 16 (dev/bench.py): off, the policy fwd+bwd is x1.54 (SFT) and x1.27
                                    # (DPO) faster but saves 3% of an SSPO step, and its peak goes 21.6 -> 52.7 GiB
mixed_precision = "bf16"            # autocast; the optimizer keeps fp32 master weights
guidance = 7.5
sample_steps = 50
n_eval_images = 8
eval_every = 30
save_every = 30
log_every = 1
