# Llama-2-7B (window 4k) -> 16k with PoSE + linear interpolation (factor 16384 / 4096 = 4), the
# paper's recipe otherwise (§5.2 extends LLaMA2-7B the same way). Tokenize with the Llama-2
# tokenizer and keep documents >= 4,097 tokens:
#   python prepare_data.py --input='pile/train/*.jsonl.zst' --tokenizer=checkpoints/llama-2-7b \
#       --min_tokens=4097 --val_fraction=0.001 --num_proc=16 --out_dir=data-pile-llama2
#   torchrun --standalone --nproc_per_node=8 train.py config/pose_llama2_4k_16k.py
exec(open('config/pose_16k.py').read())
init_from = 'checkpoints/llama-2-7b'  # placeholder: an HF-format Llama-2-7B dir
data_dir = 'data-pile-llama2'
out_dir = 'out-pose-llama2-16k'
train_len = 4096  # Llama 2's own window
target_len = 16384  # factor = 16384 / 4096 = 4
