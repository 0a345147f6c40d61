# make demo, step 2 baseline: full-length fine-tuning -- 1024-token inputs at positions 0..1023 (8x the tokens
# per step of PoSE); everything else as config/demo_pose.py.
#   python train.py config/demo_full.py
init_from = 'out-demo/original/hf'
data_dir = 'data-demo/long'  # same mix, passkey prompts of L_t + 1 tokens
out_dir = 'out-demo/full'
method = 'full'
train_len = 1024  # = L_t: full-length inputs
target_len = 1024  # L_t
rope_scaling = {'rope_type': 'linear'}  # factor = target_len / 128 = 8
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 60
learning_rate = 1e-3
min_lr = 0.0
warmup_iters = 5
lr_schedule = 'linear'
weight_decay = 0.0
grad_clip = 1.0
device = 'cpu'
dtype = 'float32'
compile = False
activation_checkpointing = False
eval_interval = 0
save_interval = 0
log_interval = 10
seed = 1337
