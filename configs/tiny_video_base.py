# The tiny video world's base model: SFT from scratch on the flawed base distribution of clips (video.py), an
# AnimateDiff-shaped UNetMotionModel (the tiny image UNet + temporal attention), so that it draws the prompts' moving
# shapes with the base distribution's mistakes -- room for alignment to fix.
#   python train_sspo.py configs/tiny_video_base.py      # 28 min on 2 CPU cores: judge 0.04 -> 0.43 (data: 0.69)
# effective batch: 1 process x batch_size 16 x grad_accum 1 = 16 clips of 8 frames; 1200 updates (19k clips).
# After 300 updates (7 min) it draws blobs (judge 0.04), after 600 shapes of the right colour (0.19), moving, but
# mostly not where the prompt says: see docs/video.md.
# Settings as configs/tiny_base.py (v-prediction with a zero terminal SNR, so that only the prompt tells the
# place and the direction at t = 999; guidance 1; an EMA).
out_dir = "out/tiny_video_base"
init_from = "scratch"
dataset = "tiny_video"
tiny_mode = "base"
frames = 8
tiny_flaws = ("static", "direction", "jitter", "colour")  # the video world's flaws, one per flawed draw
train_text_encoder = True
prediction_type = "v_prediction"
zero_snr = True
guidance = 1.0
ema_decay = 0.99            # time constant 100 updates (0.995 would keep a random init's trace longer)
batch_size = 16
lr = 2e-3
max_steps = 1200
eval_every = 300
sample_steps = 10          # eval sampling: 72 prompts x 8 frames; 10 DDIM steps keep an eval under 30 s
save_every = 300
log_every = 50
