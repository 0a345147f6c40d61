# PoSE + YaRN (§5.2 / Appendix C): LLaMA-7B 2k -> 16k, factor 8; otherwise the pose_16k.py recipe.
# 'yarn_pose' is the official PoSE repo's YaRN variant (blends wavelengths, not frequencies); use
# {'rope_type': 'yarn'} for Hugging Face's YaRN instead. original_max_position_embeddings is filled
# in from the checkpoint (2048).
#   torchrun --standalone --nproc_per_node=8 train.py config/pose_yarn_16k.py
exec(open('config/pose_16k.py').read())
out_dir = 'out-pose-yarn-16k'
rope_scaling = {'rope_type': 'yarn_pose'}  # factor = target_len / 2048 = 8
