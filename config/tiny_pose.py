# PoSE in miniature on CPU: extend the tiny base model (config/tiny_scratch.py, window 64) to 256
# positions while training on 64-token inputs, 2 chunks, linear interpolation (factor 256 / 64 = 4).
#   python train.py config/tiny_pose.py --init_from=out-tiny-scratch/hf
# With --init_from=scratch it trains a new tiny model (model_args below) the PoSE way (the tests
# do).
init_from = 'out-tiny-scratch/hf'
model_args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172,
                  max_position_embeddings=64)
data_dir = 'data-tiny'
out_dir = 'out-tiny-pose'
method = 'pose'
train_len = 64  # L_c
target_len = 256  # L_t
num_chunks = 2
content = 'uniform'
rope_scaling = {'rope_type': 'linear'}  # factor = target_len / 64
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 100
learning_rate = 1e-3
warmup_iters = 10
lr_schedule = 'linear'
weight_decay = 0.0
grad_clip = 1.0
device = 'cpu'
dtype = 'float32'
compile = False
activation_checkpointing = False
eval_interval = 50
eval_iters = 4
save_interval = 50
log_interval = 10
