# A tiny LLaMA trained from scratch on CPU at a short window (train_len = target_len = 64): the base
# model that config/tiny_pose.py extends (the demo's is config/demo_pretrain.py). ~0.1M parameters +
# embeddings.
#   python train.py config/tiny_scratch.py --data_dir=data-tiny
init_from = 'scratch'
# vocab_size: from data meta.json
model_args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172)
data_dir = 'data-tiny'
out_dir = 'out-tiny-scratch'
method = 'full'  # plain training at the model's own window
train_len = 64
target_len = 64
rope_scaling = None  # no scaling: this is the base model
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 200
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 20
lr_schedule = 'cosine'
weight_decay = 0.1
beta2 = 0.99
grad_clip = 1.0
device = 'cpu'
dtype = 'float32'
compile = False
activation_checkpointing = False
eval_interval = 50
eval_iters = 4
save_interval = 100
log_interval = 10
