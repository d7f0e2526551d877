# SSPO on AnimateDiff (SD1.5 + a motion adapter) with time-lapse clips, 8 GPUs: the paper's text-to-video setting as
# far as it is stated -- AnimateDiff trained in MagicTime's setting on ChronoMagic(-Bench-150) time-lapse clips,
# reported with FID, PSNR, SSIM, LPIPS and FVD -- and our choices where it is not (marked "ours").
#   torchrun --nproc_per_node=8 train_sspo.py configs/animatediff.py --data_path=/data/chronomagic/train
# data_path: a folder with metadata.jsonl, one {"file_name": "clip.mp4" or a folder of frames, "text": "..."} a
# line (the winners; SSPO samples its own losers). Video files need PyAV (requirements.txt).
# effective batch: 8 GPUs x batch_size 1 x grad_accum 4 = 32 clips of 16 frames (ours; not stated).
# Trains the motion modules only (AnimateDiff's and MagicTime's practice; trained_modules="all" for the whole
# UNet). A pool snapshot is then the motion modules alone: 453M parameters, 0.9 GB in bf16.
# Memory and time: not measured. Self-sampling draws a 16-frame clip with 2 x 20 UNet forwards of 16 frames each.
# The run folder loads in AnimateDiffPipeline; motion_adapter/ holds the trained adapter alone.
out_dir = "out/animatediff_sspo"
init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"
motion_adapter = "guoyww/animatediff-motion-adapter-v1-5-2"  # AnimateDiff v2's motion modules, in diffusers' layout
trained_modules = "motion"
dataset = "clipfolder"
data_path = "data/chronomagic/train"
resolution = 512                    # MagicTime trains at 512 px
frames = 16                         # AnimateDiff's clip length
frame_stride = 4                    # ours: 64 source frames span a clip (time-lapse clips change slowly)
random_flip = False                 # ours: a flip would turn "moving left" into "moving right"
caption_dropout = 0.1               # ours (AnimateDiff's training keeps an unconditional model for guidance)
num_workers = 8
method = "sspo"
beta = 5000.0                       # SD1.5's (Diffusion-DPO); not stated for video
ssr = "sign"
ref_policy = "uniform"
ckpt_every = 30                     # the paper's snapshot interval
pool_storage = "disk"
ref_dtype = "bfloat16"
self_sample_steps = 20              # ours, as configs/sd15.py
self_sample_guidance = 7.5          # AnimateDiffPipeline's default
batch_size = 1
grad_accum = 4
max_steps = 1000                    # ours
lr = 1e-5                           # ours (AnimateDiff trains its motion modules at 1e-4 from scratch)
lr_schedule = "constant"
warmup_steps = 10
grad_checkpointing = True
mixed_precision = "bf16"
guidance = 7.5
sample_steps = 25
n_eval_images = 4
eval_every = 100
save_every = 100
log_every = 1
