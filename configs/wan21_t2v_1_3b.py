# SSPO on Wan2.1 text-to-video 1.3B (a flow-matching video transformer) with text-clip pairs, 8 GPUs of 80 GB:
# configs/animatediff.py's setting (the winners of a clip folder; SSPO samples its own losers) on a flow model.
# Nothing here is a published SSPO run: the paper's video model is AnimateDiff.
#   torchrun --nproc_per_node=8 train_sspo.py configs/wan21_t2v_1_3b.py --data_path=/data/chronomagic/train
#   LoRA instead: add --lora_rank=32 --lora_alpha=32 --lr=1e-4 --pool_storage=memory (the attention projections)
# data_path: a folder with metadata.jsonl, one {"file_name": "clip.mp4" or a folder of frames, "text": "..."} a line.
# A clip: 33 frames (Wan's VAE keeps the first frame and compresses 4 into one after it: 1 + 4 k frames, 9 latent
# frames) at 480 x 480 (square: the loaders crop square), 8100 tokens of width 1536 after 1x2x2 patches.
# effective batch: 8 GPUs x batch_size 2 x grad_accum 4 = 64 clips (ours, as small as configs/animatediff.py's 32
# in spirit: a video update is costly).
# GPU memory: an ESTIMATE from byte counts, not measured. The transformer's ~1.42B parameters in fp32 with fp32
# gradients and AdamW's two moments: 22.7 GB; the bf16 reference 2.8 GB; the frozen UMT5-XXL encoder in bf16
# (~5.7B parameters, its 256k-token embedding included) 11.4 GB and the VAE 0.25 GB: 37 GB before activations. With
# checkpointing the 30 blocks keep 8100 x 1536 x 2 bytes each, 0.75 GB a clip, and SSPO's policy pass carries 2 x 2
# clips: 3 GB, plus one block recomputed (~2 GB), the VAE's encoding of 2 clips (the VAE in float32, as WanPipeline's
# documentation loads it) and the prompt cache (text_cache 512 x 512 x 4096 x 2 bytes: 2.1 GB). ~48 GB: an 80 GB GPU.
# Wan2.1 14B: 14.3B x 16 bytes = 229 GB of weights, gradients and moments under DDP: it needs sharding (FSDP2).
# Pool: a full snapshot is 2.8 GB in bf16, on disk (max_steps 210 pushes 7: 20 GB).
# Time: not measured. Self-sampling draws a clip with 2 x 20 transformer forwards (guidance).
# beta: 100, flow_grpo's SD3.5 DPO value (no published DPO beta for Wan); lr 1e-5, as configs/animatediff.py. Not
# tuned. Sampler: the folder's own (Wan2.1's published UniPC multistep on flow sigmas, shift 3 at 480p), as
# WanPipeline samples; timesteps for training: uniform on the same shifted table.
out_dir = "out/wan21_1_3b_sspo"
init_from = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # hub id, or a local folder in WanPipeline's layout
dataset = "clipfolder"
data_path = "data/chronomagic/train"
resolution = 480
frames = 33
frame_stride = 2                    # ours: 65 source frames span a clip
random_flip = False                 # a flip would turn "moving left" into "moving right"
caption_dropout = 0.1               # keeps an unconditional model for guidance
num_workers = 8
method = "sspo"
beta = 100.0
ssr = "sign"
ref_policy = "uniform"
ckpt_every = 30
pool_storage = "disk"
ref_dtype = "bfloat16"
t5_max_length = 512                 # WanPipeline's
self_sample_steps = 20              # ours, as configs/sd15.py
self_sample_guidance = 5.0          # WanPipeline's default
batch_size = 2
grad_accum = 4
max_steps = 210
lr = 1e-5
lr_schedule = "constant"
warmup_steps = 10
grad_checkpointing = True
mixed_precision = "bf16"
guidance = 5.0
sample_steps = 30
n_eval_images = 4
eval_every = 30
save_every = 30
log_every = 1
text_cache = 512                    # prompts whose frozen encoder's output stays on the GPU (2.1 GB; the default 4096
                                    # would hold 17 GB)
