# The RandPos baseline (Ruoss et al. 2023; the paper's §4.1): 2,048 tokens at 2,048 random sorted
# positions in [0, 16384), linear interpolation (factor 8); otherwise the pose_16k.py recipe.
#   torchrun --standalone --nproc_per_node=8 train.py config/randpos_16k.py
exec(open('config/pose_16k.py').read())
out_dir = 'out-randpos-16k'
method = 'randpos'
