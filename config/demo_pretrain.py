# make demo, step 1: the "Original" model -- a tiny LLaMA pretrained from scratch at a short window
# L_c = 128 on Python stdlib source + 50% synthetic passkey prompts of exactly L_c + 1 tokens (demo_report.py).
#   python train.py config/demo_pretrain.py
init_from = 'scratch'
model_args = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=384)  # vocab_size from the data
data_dir = 'data-demo/short'
out_dir = 'out-demo/original'
method = 'full'  # plain training at the model's own window
train_len = 128  # L_c
target_len = 128
rope_scaling = None  # a plain RoPE base model
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1000
learning_rate = 6e-3  # high for a tiny model: in probes, passkey retrieval emerged sooner at 6e-3 than at 3e-3 or 1e-2
min_lr = 6e-4
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
