# SSPO on Stable Diffusion XL 1.0 (base) with Pick-a-Pic v2's preferred images, 8 GPUs of 80 GB: configs/sd15.py's
# method (SSPO.md 4 and 6) at SDXL's 1024 px, with Diffusion-DPO's published SDXL settings where they exist
# (SalesforceAIResearch/DiffusionDPO, launchers/sdxl.sh: beta 5000, lr 1e-8 x effective batch, constant after 200
# warmup steps, the fp16-safe VAE). The SSPO paper trains SD1.5 and AnimateDiff only: nothing here is its SDXL run.
#   torchrun --nproc_per_node=8 train_sspo.py configs/sdxl.py --data_path=/path/to/pickapic_v2/train
#   --lora_rank=8 --lr=1e-4: rank-8 adapters instead of the whole UNet (a 24-48 GB GPU; lr as configs/sd15_lora.py)
# effective batch: 8 GPUs x batch_size 1 x grad_accum 256 = 2048 (Diffusion-DPO: 16 x 1 x 128).
# GPU memory, full fine-tuning (an ESTIMATE from byte counts, not measured): the UNet's 2.57B parameters in fp32
# with fp32 gradients and AdamW's two moments are 41.1 GB, the bf16 reference UNet 5.1 GB, the two text encoders
# in bf16 1.6 GB: 48 GB before activations (batch 1 at 128x128 latents, checkpointing on). So an 80 GB GPU, with
# plain DDP; not a 48 GB one (shard with PyTorch's FSDP there: not implemented). Diffusion-DPO trains SDXL with
# Adafactor (no second moment per weight); we keep AdamW for every model and method.
# Pool: 5.1 GB a snapshot in bf16, on disk; 210 updates push 7 (36 GB).
# Time: not measured. Self-sampling is 2 x 20 SDXL forwards at 1024 px per example, the dominant cost.
# Time ids: (1024, 1024, 0, 0, 1024, 1024) for every image, as Diffusion-DPO's train.py passes them (diffusers'
# SDXL DPO example passes each image's original size and crop instead; not done here).
# Baselines: --method=sft, --method=dpo (Diffusion-DPO's SDXL run: --max_steps=2000 --warmup_steps=200),
# --ref_policy=last --ssr=off (SPIN-Diffusion).
out_dir = "out/sdxl_sspo"
init_from = "stabilityai/stable-diffusion-xl-base-1.0"  # hub id, or a local folder in SDXL's layout
vae = "madebyollin/sdxl-vae-fp16-fix"  # Diffusion-DPO's VAE for SDXL (SDXL's own is fine in bf16, overflows in fp16)
dataset = "pickapic"
data_path = "data/pickapic_v2/train"
resolution = 1024
random_flip = True
caption_dropout = 0.2               # Diffusion-DPO's proportion_empty_prompts
num_workers = 8
method = "sspo"
beta = 5000.0                       # Diffusion-DPO's SDXL value (--beta_dpo 5000), in the 1/2 convention
ssr = "sign"
ref_policy = "uniform"
ckpt_every = 30                     # SSPO's snapshot interval
pool_storage = "disk"
ref_dtype = "bfloat16"
self_sample_steps = 20              # our choice, as configs/sd15.py
self_sample_guidance = 5.0          # StableDiffusionXLPipeline's default guidance (SD1.5's is 7.5)
batch_size = 1
grad_accum = 256
max_steps = 210                     # ~7 snapshots, as configs/sd15.py
lr = 2.048e-5                       # 1e-8 x 2048 (Diffusion-DPO's --learning_rate=1e-8 --scale_lr)
lr_schedule = "constant"
warmup_steps = 10                   # Diffusion-DPO warms up 200 of its 2000 steps; ours as configs/sd15.py
grad_checkpointing = True
mixed_precision = "bf16"
guidance = 5.0
sample_steps = 50
n_eval_images = 8
eval_every = 30
save_every = 30
log_every = 1
