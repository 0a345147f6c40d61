# The paper's main recipe (PoSE, §4.1): LLaMA-7B, context 2k -> 16k, PoSE with 2 chunks + linear
# interpolation (factor 16384 / 2048 = 8), 1,000 steps, lr 2e-5 with a linear schedule and 10 warmup
# steps, AdamW with its default hyperparameters, global batch 64, The Pile documents >= 2,048
# tokens. The paper ran fp16 + DeepSpeed ZeRO-3 on 8 V100s; here FSDP2 + bf16 (A100/H100 class
# GPUs).
#   python prepare_data.py --input='pile/train/*.jsonl.zst' --tokenizer=checkpoints/llama-7b \
#       --min_tokens=2049 --val_fraction=0.001 --num_proc=16 --out_dir=data-pile
#   torchrun --standalone --nproc_per_node=8 train.py config/pose_16k.py
_gpus = 8  # global batch = batch_size * gradient_accumulation_steps * number of GPUs
_global_batch = 64
# placeholder: an HF-format LLaMA-7B dir (config.json, weights, tokenizer.model)
init_from = 'checkpoints/llama-7b'
data_dir = 'data-pile'
out_dir = 'out-pose-16k'
method = 'pose'
train_len = 2048  # L_c: LLaMA-7B's own window
target_len = 16384  # L_t
num_chunks = 2
# Eq. 5: v_i over the whole document; the authors' code first cut documents to 5 * L_c
# (--doc_cap=10240)
content = 'uniform'
rope_scaling = {'rope_type': 'linear'}  # factor = target_len / 2048 = 8
batch_size = 1
gradient_accumulation_steps = _global_batch // (_gpus * batch_size)  # 8
max_iters = 1000
learning_rate = 2e-5
warmup_iters = 10
lr_schedule = 'linear'
min_lr = 0.0
weight_decay = 0.0  # AdamW defaults of the HF Trainer the authors used
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
dtype = 'bfloat16'
compile = True
activation_checkpointing = True
eval_interval = 100
eval_iters = 10
save_interval = 200
log_interval = 1
