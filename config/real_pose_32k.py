# make demo-real, the paper's regime: L_c = 8192 = SmolLM2-135M's own window, extended 4x to L_t =
# 32768.
#   python train.py config/real_pose_32k.py --init_from=$HOME/.cache/nanopose/smollm2-135m-instruct
# The contiguous control is the same run with --num_chunks=1 (positions 0 .. 8191, the same
# documents, the same draws of the document per step): it differs from PoSE in the position ids
# alone. YaRN x4 (factor = 32768 / 8192): the paper pairs PoSE with linear, NTK or YaRN; YaRN keeps
# local order. Budget: 8 steps x 2 inputs of 8192 tokens per arm (131k tokens), the most a 2-core
# CPU affords here.
init_from = ''  # set by demo/real.sh: the converted model dir (demo/convert_gguf.py)
data_dir = 'data-real'
out_dir = 'out-real/pose32k-s1337'
method = 'pose'
train_len = 8192  # L_c = the model's window, as in the paper
target_len = 32768  # L_t
num_chunks = 2
content = 'uniform'
chunking = 'paper'
# factor = 32768 / 8192 = 4, original_max_position_embeddings = 8192
rope_scaling = {'rope_type': 'yarn'}
batch_size = 1
gradient_accumulation_steps = 2
max_iters = 8
learning_rate = 1e-4
min_lr = 0.0
warmup_iters = 1
lr_schedule = 'linear'
weight_decay = 0.0
grad_clip = 1.0
device = 'cpu'
dtype = 'bfloat16'
compile = False
activation_checkpointing = True  # two 8k runs side by side fit in 24 GB (without: ~17 GB each)
eval_interval = 0
save_interval = 2  # resume granularity: a checkpoint every 2 steps
log_interval = 1
seed = 1337
