# The paper's extreme-length model (§5.3, Table 2): LLaMA-7B 2k -> 128k with PoSE + YaRN (factor
# 64), still training on 2,048-token inputs; otherwise the pose_16k.py recipe.
#   torchrun --standalone --nproc_per_node=8 train.py config/pose_yarn_128k.py
exec(open('config/pose_16k.py').read())
out_dir = 'out-pose-yarn-128k'
target_len = 131072
rope_scaling = {'rope_type': 'yarn_pose'}  # factor = 131072 / 2048 = 64
