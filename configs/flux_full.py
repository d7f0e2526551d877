# SSPO on FLUX.1-dev (11.9B parameters), full fine-tuning sharded over 8 GPUs of 80 GB with FSDP2 (parallel="fsdp").
# Nothing here is a published SSPO run (the paper trains SD1.5 and AnimateDiff); the LoRA run is configs/flux_lora.py.
#   torchrun --nproc_per_node=8 train_sspo.py configs/flux_full.py --data_path=/path/to/pickapic_v2/train
#   (several nodes: torchrun --nnodes=N --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT ...)
# effective batch: 8 GPUs x batch_size 2 x grad_accum 128 = 2048, the paper's (SSPO.md 6).
# GPU memory: an ESTIMATE from byte counts (docs/memory.md), not measured. Sharded over 8: the policy's fp32 weights,
# gradients and AdamW moments 190 / 8 = 23.8 GB, the reference in bf16 23.8 / 8 = 3.0 GB; replicated: T5-XXL, CLIP-L
# and the VAE in bf16 9.9 GB, the prompt cache (text_cache 512) 2.2 GB; one double-stream block gathered in bf16 (0.7
# GB, twice with prefetching); activations with checkpointing ~0.54 GB a sample x 2 x 2 (winner and self-sample) plus
# one block recomputed: ~3 GB. ~43 GB: an 80 GB GPU with room, a 48 GB one only at batch_size 1.
# Host memory: each checkpoint gathers the full fp32 weights on rank 0's CPU (48 GB) to write transformer/.
# Disk: the pool holds every snapshot (the paper's ~7) in bf16, each rank writing its shard: 24 GB a snapshot, ~170 GB;
# a checkpoint (weights + AdamW moments, fp32, sharded) 190 GB, two kept. pool_capacity bounds the pool if needed.
# Time: not measured. lr 1e-5 and beta 100 (flow_grpo's SD3.5 DPO value): neither tuned.
out_dir = "out/flux_sspo_full"
init_from = "black-forest-labs/FLUX.1-dev"  # hub id, or a local folder in the FLUX.1 layout
dataset = "pickapic"
data_path = "data/pickapic_v2/train"
resolution = 512
random_flip = True
caption_dropout = 0.0
num_workers = 4
method = "sspo"
beta = 100.0
ssr = "sign"
ref_policy = "uniform"
ckpt_every = 30
parallel = "fsdp"
pool_storage = "disk"               # FSDP's: each rank writes its shard of a snapshot to out_dir/pool
ref_dtype = "bfloat16"
t5_max_length = 512
self_sample_steps = 20
self_sample_guidance = 3.5
batch_size = 2
grad_accum = 128
max_steps = 210
lr = 1e-5
lr_schedule = "constant"
warmup_steps = 10
grad_checkpointing = True
mixed_precision = "bf16"            # FSDP gathers and computes in bf16, keeps fp32 shards, reduces gradients in fp32
guidance = 3.5
sample_steps = 28
n_eval_images = 8
eval_every = 30
save_every = 30
log_every = 1
text_cache = 512
