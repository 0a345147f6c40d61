# make demo, step 2 baseline: RandPos (Ruoss et al.) -- 128 distinct random positions out of [0, 1024), sorted,
# contiguous text; everything else as config/demo_pose.py.
#   python train.py config/demo_randpos.py
init_from = 'out-demo/original/hf'
data_dir = 'data-demo/short'
out_dir = 'out-demo/randpos'
method = 'randpos'
train_len = 128  # L_c
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
