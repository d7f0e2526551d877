# SSPO on Stable Diffusion 3.5 Medium (a rectified-flow MMDiT) with Pick-a-Pic v2's preferred images, 8 GPUs of 80 GB:
# configs/sd15.py's method (SSPO.md 4 and 6) on a flow model. The SSPO paper trains SD1.5 and AnimateDiff only:
# nothing here is a published SSPO run; where a peer trains SD3.5 (flow_grpo's train_sd3_dpo.py) we follow it.
#   torchrun --nproc_per_node=8 train_sspo.py configs/sd35_medium.py --data_path=/path/to/pickapic_v2/train
#   LoRA instead (one GPU of 40 GB, or 8): add --lora_rank=32 --lora_alpha=64 --lr=3e-4 --pool_storage=memory
#   (flow_grpo's SD3.5 DPO adapters: rank 32, alpha 64, lr 3e-4, the eight attention projections below)
# effective batch: 8 GPUs x batch_size 8 x grad_accum 32 = 2048, the paper's (SSPO.md 6).
# GPU memory, full fine-tuning: an ESTIMATE from byte counts, not measured. The transformer's 2.24B parameters in
# fp32 with fp32 gradients and AdamW's two moments: 35.9 GB; the bf16 reference transformer 4.5 GB; the frozen text
# encoders in bf16 (T5-XXL 4.76B: 9.5 GB, CLIP-L + CLIP-G 0.82B: 1.6 GB) and the VAE: 11.3 GB; the prompt cache
# (text_cache 512 x 205 x 4096 x 2 bytes) 0.9 GB; 52.6 GB before activations. At 512 px a sample is 1024 image + 205
# text tokens of width 1536; with checkpointing the 24 blocks keep ~90 MB a sample, and SSPO's policy pass carries
# 2 x 8 samples: ~1.5 GB, plus one block recomputed at a time (~1 GB). ~55 GB: an 80 GB GPU with plain DDP. LoRA: the
# fp32 transformer 9.0 GB (it is the reference too), the encoders and cache 12.2 GB, activations ~2.5 GB: ~24 GB.
# Pool: a full snapshot is 4.5 GB in bf16, on disk (210 updates push 7: 31 GB); a rank-32 adapter is ~37 MB.
# Time: not measured. Self-sampling is 2 x 20 transformer forwards (guidance) per example, the dominant cost.
# beta: 100 (flow_grpo's SD3.5 DPO, the same 0.5 x beta convention as ours; flow errors are velocity errors, on
# another scale than SD1.5's noise errors, so Diffusion-DPO's 5000 does not carry over). Not tuned here.
# lr: Diffusion-DPO's rule, 1e-8 per sample x 2048; not tuned for SD3.5.
# Baselines: --method=sft, --method=dpo, --ref_policy=last --ssr=off (SPIN-Diffusion).
out_dir = "out/sd35m_sspo"
init_from = "stabilityai/stable-diffusion-3.5-medium"  # hub id, or a local folder in the SD3 layout
dataset = "pickapic"
data_path = "data/pickapic_v2/train"
resolution = 512                    # flow_grpo trains SD3.5 Medium at 512; its native 1024 is ~4x the tokens
random_flip = True
caption_dropout = 0.2               # keeps an unconditional model for guidance, as configs/sd15.py
num_workers = 4
method = "sspo"
beta = 100.0
ssr = "sign"
ref_policy = "uniform"
ckpt_every = 30
pool_storage = "disk"
ref_dtype = "bfloat16"
timestep_density = "logit_normal"   # SD3's training density (Esser et al. 2024; flow_grpo's DPO draws it too)
t5_max_length = 128                 # flow_grpo's (the pipeline's 256 doubles the text tokens)
self_sample_steps = 20              # ours, as configs/sd15.py
self_sample_guidance = 4.5          # SD3.5 Medium's recommended guidance (flow_grpo samples at 4.5)
batch_size = 8
grad_accum = 32
max_steps = 210
lr = 2.048e-5
lr_schedule = "constant"
warmup_steps = 10
grad_checkpointing = True
mixed_precision = "bf16"
guidance = 4.5
sample_steps = 40
n_eval_images = 8
eval_every = 30
save_every = 30
log_every = 1
text_cache = 512                    # prompts whose frozen encoders' output stays on the GPU (0.9 GB; the default 4096
                                    # would hold 6.9 GB)
# LoRA (used with --lora_rank > 0): the SD3 trainers' targets, both streams' attention projections
lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")  # attn., not attn2. (SD3.5's second attention): flow_grpo's
