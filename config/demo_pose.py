# make demo, step 3: extend the Original 4x, L_c = 128 -> L_t = 512, with PoSE: 128-token inputs
# in 2 chunks whose position ids get random skip offsets up to L_t, YaRN scaling (factor 512 / 128
# = 4). The baselines (demo_contig.py, demo_randpos.py, demo_full.py) exec this file: every
# setting below but method / train_len / num_chunks: the same data, steps, batch and learning
# rate. Why YaRN and not linear, why 4x and not 8x: docs/miniature-notes.md.
# demo/mini.sh sets init_from (the base model), out_dir and seed per run.
#   python train.py config/demo_pose.py
init_from = 'out-demo/seed-1/original/hf'
data_dir = 'data-demo/ext'  # the stdlib pieces alone: no passkey prompt (pretraining has them)
out_dir = 'out-demo/seed-1/pose'
method = 'pose'
train_len = 128  # L_c
target_len = 512  # L_t
num_chunks = 2
content = 'uniform'
rope_scaling = {'rope_type': 'yarn'}  # factor = target_len / 128 = 4, original window 128
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 400
learning_rate = 3e-3  # 1e-3 extends too slowly for 400 steps; 6e-3 breaks the base's retrieval
min_lr = 0.0
warmup_iters = 20
lr_schedule = 'linear'
weight_decay = 0.0
grad_clip = 1.0
device = 'cpu'
dtype = 'float32'
compile = False
activation_checkpointing = False
eval_interval = 0
save_interval = 0
log_interval = 50
seed = 1337
