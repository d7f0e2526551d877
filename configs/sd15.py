# Stable Diffusion 1.5 on Pick-a-Pic v2, 8 GPUs: the reference run. For now SFT on the preferred images (the
# paper's "SFT on winners" baseline); SSPO's settings (ckpt_every 30, uniform draw, beta 5000) land with the
# checkpoint ring.
#   torchrun --nproc_per_node=8 train_sspo.py configs/sd15.py --data_path=/path/to/pickapic_v2/train
# effective batch: 8 GPUs x batch_size 1 x grad_accum 256 = 2048 (SSPO.md 6; Diffusion-DPO: 16 x 1 x 128)
# lr: 1e-8 per sample x 2048 = 2.048e-5, constant after warmup, as Diffusion-DPO's launcher
# time: not measured yet (no GPU run so far); 2000 updates x 2048 = 4.1M images.
out_dir = "out/sd15"
init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, or a local folder in the same layout
dataset = "pickapic"
data_path = "data/pickapic_v2/train"  # a folder of parquet shards (caption, jpg_0, jpg_1, label_0, label_1)
resolution = 512
random_flip = True
caption_dropout = 0.2               # Diffusion-DPO's proportion_empty_prompts (diffusers' example uses 0)
num_workers = 4
batch_size = 1
grad_accum = 256
max_steps = 2000
lr = 2.048e-5
lr_schedule = "constant"
warmup_steps = 500
grad_checkpointing = True
mixed_precision = "bf16"            # autocast; the optimizer keeps fp32 master weights
guidance = 7.5
sample_steps = 50
n_eval_images = 8
eval_every = 100
save_every = 100
log_every = 1
