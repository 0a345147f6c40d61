# make demo-real: extend SmolLM2-135M-Instruct (a real pretrained LLaMA, window 8192) 2x to L_t = 16384 with
# PoSE on a 2-core CPU: 2048-token inputs in 2 chunks whose position ids get random skip offsets up to 16384,
# YaRN x2, long real documents (stdlib packages, demo_real.py).
#   python train.py config/real_pose.py --init_from=$HOME/.cache/nanopose/smollm2-135m-instruct   (demo_real.sh)
# train_len 2048, not the paper's L_c = the original window (8192): on the CPU an 8k input costs several times
# a 2k one (forward, fp32, 2 idle cores, issue 10: 4 s at 2k, 30 s at 8k), and with N = 2 chunks a 2k input
# already spans relative distances up to 16k -- the point of PoSE. YaRN, not linear: it leaves the
# high-frequency RoPE dimensions (local order) untouched, so a short fine-tune has less to repair at 2k.
# Budget: 30 steps x 4 inputs = 120 inputs of 2048 tokens: 1,607 s measured (~50 s a step, bf16 autocast, 2 cores
# shared with other jobs; README).
init_from = ''  # set by demo_real.sh: the converted model dir (convert_gguf.py)
data_dir = 'data-real'
out_dir = 'out-real/pose'
method = 'pose'
train_len = 2048  # PoSE's input length (see above)
target_len = 16384  # L_t
num_chunks = 2
content = 'uniform'
chunking = 'paper'
rope_scaling = {'rope_type': 'yarn'}  # factor = 16384 / 8192 = 2, original_max_position_embeddings = 8192
batch_size = 1
gradient_accumulation_steps = 4
max_iters = 30
learning_rate = 1e-4
min_lr = 0.0
warmup_iters = 3
lr_schedule = 'linear'
weight_decay = 0.0
grad_clip = 1.0
device = 'cpu'
dtype = 'bfloat16'
compile = False
activation_checkpointing = False
eval_interval = 0
save_interval = 5  # resume granularity: a checkpoint (~1.6 GB with AdamW state) every 5 steps
log_interval = 1
seed = 1337
