# SSPO on FLUX.1-dev (a 12B rectified-flow transformer, guidance-distilled) with rank-32 LoRA and Pick-a-Pic v2's
# preferred images, 8 GPUs of 80 GB. Nothing here is a published SSPO run (the paper trains SD1.5 and AnimateDiff).
#   torchrun --nproc_per_node=8 train_sspo.py configs/flux_lora.py --data_path=/path/to/pickapic_v2/train
# Full fine-tuning does not fit DDP: 11.9B parameters in fp32 with gradients and AdamW's moments are 190 GB a GPU; it
# is sharded in configs/flux_full.py (FSDP2). FLUX.1-schnell (timestep-distilled, no schedule shift) is
# refused: its few-step sampler is not a training target.
# effective batch: 8 GPUs x batch_size 4 x grad_accum 64 = 2048, the paper's (SSPO.md 6).
# GPU memory: an ESTIMATE from byte counts, not measured. The transformer stays in fp32 under the adapters (it is the
# reference too): 47.6 GB; T5-XXL in bf16 9.5 GB, CLIP-L and the VAE 0.4 GB; the prompt cache (text_cache 512 x
# 513 x 4096 x 2 bytes) 2.2 GB; the adapters (52.3M parameters) and their AdamW state 0.8 GB. At 512 px a sample
# is 1024 image + 512 text tokens of width 3072; with checkpointing the 57 blocks keep ~0.54 GB a sample, and
# SSPO's policy pass carries 2 x 4 samples: ~4.3 GB, plus one block recomputed (~1 GB). ~66 GB: an 80 GB GPU.
# (Keeping the frozen weights in bf16 under the adapters, as diffusers' trainers do, would save 24 GB: not done.)
# Pool: a rank-32 adapter is 0.1 GB in bf16: the pool stays in RAM.
# Time: not measured. Self-sampling is 20 transformer forwards per example (one each: the guidance is an input).
# Guidance: FLUX.1-dev takes the guidance scale as an input; training passes `guidance` (3.5, as diffusers' FLUX
# trainers), self-samples and the eval grid are drawn at it. No caption dropout: no unconditional model is used.
# beta: 100, flow_grpo's SD3.5 DPO value (no published DPO beta for FLUX.1); lr 1e-4: LoRA's usual. Neither tuned.
# Baselines: --method=sft, --method=dpo, --ref_policy=last --ssr=off (SPIN-Diffusion).
out_dir = "out/flux_sspo_lora"
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
pool_storage = "memory"
ref_dtype = "bfloat16"              # how the adapter snapshots are stored
t5_max_length = 512                 # the pipeline's and diffusers' FLUX trainers'
self_sample_steps = 20
self_sample_guidance = 3.5
batch_size = 4
grad_accum = 64
max_steps = 210
lr = 1e-4
lr_schedule = "constant"
warmup_steps = 10
grad_checkpointing = True
mixed_precision = "bf16"
guidance = 3.5                      # FLUX.1-dev's embedded guidance, in training and sampling
sample_steps = 28
n_eval_images = 8
eval_every = 30
save_every = 30
log_every = 1
text_cache = 512                    # prompts whose frozen encoders' output stays on the GPU (2.2 GB; the default 4096
                                    # would hold 17 GB)
# LoRA
lora_rank = 32
lora_alpha = 64.0
lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")  # both streams' attention; the single blocks' to_q, to_k, to_v
