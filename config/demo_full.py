# make demo, step 3 baseline: full-length fine-tuning -- 512-token inputs at positions 0..511 (4x
# the tokens per step of PoSE) drawn from PoSE's own documents: full_min_doc = L_c admits every
# document PoSE can draw (>= L_c + 1 tokens), right-padded with unscored targets. Every other
# setting (data, steps, batch, lr) from config/demo_pose.py, so the budget is the same.
#   python train.py config/demo_full.py
exec(open('config/demo_pose.py').read())
out_dir = 'out-demo/seed-1/full'
method = 'full'
train_len = 512  # = L_t: full-length inputs
full_min_doc = 128  # = L_c: the documents PoSE draws
