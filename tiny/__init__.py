"""The tiny worlds: synthetic text-to-image (world.py) and text-to-video (video.py) tasks with a judge, on which every
method really trains and is really judged on a CPU; the random model they start from (build.py); the paper's table in
miniature (table.py: python -m tiny.table) and which words a model listens to (probe.py: python -m tiny.probe)."""
