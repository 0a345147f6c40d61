# bench.py on one GPU, a Llama-2-7B-shaped model: python bench.py config/bench/gpu_7b.py
# --only=evalmem (eval_len: the 128k-token window of the paper's Table 2)
device = 'cuda'
dim = 4096
n_layers = 32
n_heads = 32
n_kv_heads = 32
hidden_dim = 11008
vocab_size = 32000
eval_len = 131072
dtype = 'bfloat16'
train_len = 2048
