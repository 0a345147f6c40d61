# make demo, step 2 baseline: full-length fine-tuning -- 512-token inputs at positions 0..511 (4x the tokens
# per step of PoSE); every other setting (steps, batch, lr) from config/demo_pose.py, so the budget is the same.
#   python train.py config/demo_full.py
exec(open('config/demo_pose.py').read())
data_dir = 'data-demo/long'  # same mix, passkey prompts of L_t + 1 tokens
out_dir = 'out-demo/seed-1/full'
method = 'full'
train_len = 512  # = L_t: full-length inputs
