# SSPO on Stable Diffusion 1.5 with LoRA (rank-8 adapters on the attention projections), 8 GPUs of 24 GiB:
# configs/sd15.py's run (data, objective, reference pool, effective batch) with only the adapters trained; the keys
# below are sd15.py's, but for the LoRA block at the end.
#   torchrun --nproc_per_node=8 train_sspo.py configs/sd15_lora.py --data_path=/path/to/pickapic_v2/train
# effective batch: 8 GPUs x batch_size 16 x grad_accum 16 = 2048, as configs/sd15.py. Fewer GPUs: raise grad_accum
# (1 GPU: 16 x 128 = 2048); a smaller GPU: lower batch_size and raise grad_accum by the same factor.
# GPU memory: ~13.6 GiB a GPU at batch_size 16 with grad_checkpointing. An ESTIMATE, not measured (docs/lora.md):
# the measured 24.78 GiB of the full SSPO step less the bf16 reference UNet, the UNet's fp32 gradients and AdamW's
# two moments. So a 24 GiB GPU; without grad_checkpointing ~43.0 GiB (estimate): a 48 GiB one.
# Trains 1.59M parameters (0.19% of the UNet's 859.5M); a pool snapshot is 3.2 MB in bf16, so the pool stays in RAM.
# The reference is the policy's own UNet with its adapter off (theta_0) or swapped for a snapshot: no second UNet.
# lr: not from the paper (it fine-tunes the whole UNet) and not tuned here. diffusers' SD1.5 Diffusion-DPO LoRA
# example uses rank 8 and 1e-5 at an effective batch of 32; LoRA usually wants a larger lr than full fine-tuning,
# whose lr in configs/sd15.py is 2.048e-5: 1e-4 is our starting point.
# The run folder: unet/ (the base, written once), lora/pytorch_lora_weights.safetensors (the adapter, which
# StableDiffusionPipeline.load_lora_weights reads; evaluate.py fuses it), ckpt.pt (adapter + optimizer + pool).
# time: not measured.
out_dir = "out/sd15_sspo_lora"
init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, or a local folder in the same layout
dataset = "pickapic"
data_path = "data/pickapic_v2/train"  # a folder of parquet shards (caption, jpg_0, jpg_1, label_0, label_1)
resolution = 512
random_flip = True
caption_dropout = 0.2
num_workers = 4
method = "sspo"
beta = 5000.0
ssr = "sign"
ref_policy = "uniform"
ckpt_every = 30
pool_storage = "memory"             # 3.2 MB a snapshot (sd15.py's full snapshots, 1.7 GB, go to disk)
ref_dtype = "bfloat16"              # with LoRA: how the snapshots are stored; the reference computes with the base
self_sample_steps = 20
self_sample_guidance = 7.5
batch_size = 16
grad_accum = 16
max_steps = 210
lr = 1e-4
lr_schedule = "constant"
warmup_steps = 10
grad_checkpointing = True           # off: ~+29.5 GiB at batch 16 (dev/bench.py's policy fwd+bwd at 2B=32: 51.0 vs 21.5)
mixed_precision = "bf16"
guidance = 7.5
sample_steps = 50
n_eval_images = 8
eval_every = 30
save_every = 30
log_every = 1
# LoRA
lora_rank = 8                       # diffusers' SD1.5 Diffusion-DPO LoRA example
lora_alpha = 8.0                    # scale alpha / rank = 1, as diffusers' LoRA trainers
