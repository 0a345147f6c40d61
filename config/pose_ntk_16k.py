# PoSE + the paper's fixed NTK interpolation (§5.2 / Appendix C): LLaMA-7B 2k -> 16k, rope base
# scaled by alpha^(d/(d-2)) with alpha = factor = 16384 / 2048 = 8; otherwise the pose_16k.py
# recipe. (NTK exports as a plain rope_theta in config.json; see model.py.)
#   torchrun --standalone --nproc_per_node=8 train.py config/pose_ntk_16k.py
exec(open('config/pose_16k.py').read())
out_dir = 'out-pose-ntk-16k'
rope_scaling = {'rope_type': 'ntk'}  # factor (alpha) = target_len / 2048
