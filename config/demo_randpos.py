# make demo, step 3 baseline: RandPos (Ruoss et al.) -- 128 distinct random positions out of [0,
# 512), sorted, contiguous text; every other setting (data, steps, batch, lr) from
# config/demo_pose.py, so the budget is the same.
#   python train.py config/demo_randpos.py
exec(open('config/demo_pose.py').read())
out_dir = 'out-demo/seed-1/randpos'
method = 'randpos'
