# make demo-real, the short regime: L_c = 2048 (a quarter of SmolLM2-135M's 8192 window) -> L_t =
# 16384.
#   python train.py config/real_pose_16k.py --init_from=$HOME/.cache/nanopose/smollm2-135m-instruct
# The contiguous control is the same run with --num_chunks=1 (positions 0 .. 2047, the same
# documents). With N = 2 chunks a 2k input spans relative distances up to 16k; but the model has
# already seen distances up to 8k in pretraining, so this regime asks less of PoSE than the paper's
# (real_pose_32k.py). YaRN, not linear: it leaves the high-frequency RoPE dimensions (local order)
# untouched. Budget: 30 steps x 4 inputs of 2048 tokens per arm.
init_from = ''  # set by demo/real.sh: the converted model dir (demo/convert_gguf.py)
data_dir = 'data-real'
out_dir = 'out-real/pose16k-s1337'
method = 'pose'
train_len = 2048  # L_c
target_len = 16384  # L_t
num_chunks = 2
content = 'uniform'
chunking = 'paper'
# factor = 16384 / 8192 = 2, original_max_position_embeddings = 8192
rope_scaling = {'rope_type': 'yarn'}
batch_size = 1
gradient_accumulation_steps = 4
max_iters = 30
learning_rate = 1e-4
min_lr = 0.0
warmup_iters = 3
lr_schedule = 'linear'
weight_decay = 0.0
grad_clip = 1.0
device = 'cpu'
dtype = 'bfloat16'
compile = False
activation_checkpointing = False
eval_interval = 0
save_interval = 5  # resume granularity: a checkpoint every 5 steps
log_interval = 1
seed = 1337
