# The tiny video base's first stage: the frames as images. The same AnimateDiff-shaped UNetMotionModel as the base,
# trained from scratch on one-frame clips (each a base-distribution clip's first frame, video.render_clip: where the
# motion starts, so the motion word sets a place the per-frame layers learn to draw; a random moment smears it along
# the track and the word is not read in 600 updates, docs/video.md), as AnimateDiff's motion modules are trained on
# an image model. Then configs/tiny_video_base.py trains the motion.
#   python train_sspo.py configs/tiny_video_frames.py     # 7-11 min on 2 CPU cores: picture's judge 0.08 -> 0.60-0.62
# effective batch: 1 process x batch_size 64 x grad_accum 1 = 64 frames; 600 updates (38k frames): 64 independent
# frames teach the picture more than 8 clips of 8 alike, at the same cost.
# The eval judges a one-frame clip by its picture alone (video.judge_clip; a translation's first frame is a shape
# entering cut by the border, which the shape part marks down, the data's too). Settings as configs/tiny_video_base.py.
out_dir = "out/tiny_video_frames"
init_from = "scratch"
dataset = "tiny_video"
tiny_mode = "base"
frames = 1
tiny_flaws = ("static", "direction", "jitter", "colour")
train_text_encoder = True
prediction_type = "v_prediction"
zero_snr = True
guidance = 1.0
ema_decay = 0.99
batch_size = 64
lr = 2e-3
max_steps = 600
eval_every = 200
sample_steps = 10
save_every = 200
log_every = 50
