# make demo, step 2: the "Original" model -- a tiny LLaMA pretrained from scratch at a short
# window L_c = 128 on Python stdlib source (512-token pieces) + 40% synthetic passkey prompts of
# exactly L_c + 1 tokens + 20% random-word copy drills, all documents fresh (demo/mini_report.py
# says why that matters). Only pretraining sees the passkey prompts; demo/mini.sh sets out_dir and
# seed per run.
#   python train.py config/demo_pretrain.py
init_from = 'scratch'
# vocab_size from the data
model_args = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=384)
data_dir = 'data-demo/short'
out_dir = 'out-demo/seed-1/original'
method = 'full'  # plain training at the model's own window
train_len = 128  # L_c
target_len = 128
rope_scaling = None  # a plain RoPE base model
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1500
learning_rate = 1e-3  # higher rates (6e-3) learn copying (the copy drills) far more slowly
min_lr = 1e-4
warmup_iters = 50
lr_schedule = 'cosine'
weight_decay = 0.1
beta2 = 0.99
grad_clip = 1.0
device = 'cpu'
dtype = 'float32'
compile = False
activation_checkpointing = False
eval_interval = 0
save_interval = 0
log_interval = 100
seed = 1337
