# bench.py on one GPU, a TinyLlama-1.1B-shaped model: python bench.py config/bench/gpu_1b.py
# --only=train
device = 'cuda'
dim = 2048
n_layers = 22
n_heads = 32
n_kv_heads = 4
hidden_dim = 5632
vocab_size = 32000
batch_size = 4
seq_len = 2048
train_len = 2048
dtype = 'bfloat16'
compile = True
