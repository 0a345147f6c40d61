# Llama-3-8B (window 8k, rope_theta 500k) -> 64k with PoSE, using the Llama-3.1 style 'llama3' RoPE
# scaling (factor 65536 / 8192 = 8; original_max_position_embeddings = 8192 is filled in from the
# checkpoint). Use {'rope_type': 'linear'} or {'rope_type': 'yarn'} to compare. Llama 3's tokenizer
# has 128k tokens, so the data is uint32:
#   python prepare_data.py --input='pile/train/*.jsonl.zst' --tokenizer=checkpoints/llama-3-8b \
#       --min_tokens=8193 --val_fraction=0.001 --num_proc=16 --out_dir=data-pile-llama3
#   torchrun --standalone --nproc_per_node=8 train.py config/pose_llama3_8k_64k.py
exec(open('config/pose_16k.py').read())
# placeholder: an HF-format Meta-Llama-3-8B dir (tokenizer.json)
init_from = 'checkpoints/llama-3-8b'
data_dir = 'data-pile-llama3'
out_dir = 'out-pose-llama3-64k'
train_len = 8192  # Llama 3's own window
target_len = 65536
rope_scaling = {'rope_type': 'llama3', 'low_freq_factor': 1.0, 'high_freq_factor': 4.0}  # factor 8
