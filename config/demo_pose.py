# make demo, step 2: extend the Original 8x, L_c = 128 -> L_t = 1024, with PoSE: 128-token inputs in 2 chunks
# whose position ids get random skip offsets up to L_t, linear interpolation (factor 1024 / 128 = 8).
# Same data mix as pretraining (data-demo/short). The baselines (demo_randpos.py, demo_full.py) exec this file:
# every setting below except method / train_len / data: same steps, batch and learning rate.
#   python train.py config/demo_pose.py
init_from = 'out-demo/original/hf'
data_dir = 'data-demo/short'
out_dir = 'out-demo/pose'
method = 'pose'
train_len = 128  # L_c
target_len = 1024  # L_t
num_chunks = 2
content = 'uniform'
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
