# The paper's 32k model (Table 1): LLaMA-7B 2k -> 32k, PoSE + linear interpolation (factor 16),
# otherwise the pose_16k.py recipe.
#   torchrun --standalone --nproc_per_node=8 train.py config/pose_32k.py
exec(open('config/pose_16k.py').read())
out_dir = 'out-pose-32k'
target_len = 32768  # rope_scaling factor = 32768 / 2048 = 16
