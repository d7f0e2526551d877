# Diffusion-KTO (arXiv 2404.04465): unpaired utility maximisation, the judge's preferred image of each pair as a
# desirable sample and the other as an undesirable one; frozen base as reference. Same budget as configs/tiny.py;
# beta scaled like tiny.py's (SD1.5 1000 / 5).
#   python train_sspo.py configs/tiny_kto.py
exec(open("configs/tiny.py").read())
out_dir = "out/tiny_kto"
method = "kto"
beta = 200.0
