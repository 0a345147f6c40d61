# The Full-length baseline (§4.1): LLaMA-7B fine-tuned on 16,384-token inputs with linear
# interpolation (factor 8), the same 1,000 steps / lr / batch as pose_16k.py. Needs documents >=
# 16,385 tokens (prepare with --min_tokens=16385) and far more memory and time than PoSE: that is
# the paper's point.
#   torchrun --standalone --nproc_per_node=8 train.py config/full_16k.py
# The authors' code trained this baseline on PoSE's own documents, truncated to 16k and
# right-padded: add --full_min_doc=2048 --data_dir=data-pile (documents >= 2,049 tokens, padded
# targets unscored) for that.
exec(open('config/pose_16k.py').read())
out_dir = 'out-full-16k'
data_dir = 'data-pile-16k'
method = 'full'
train_len = 16384  # full-length: train_len = target_len
target_len = 16384  # factor = 16384 / 2048 (the checkpoint's window) = 8
