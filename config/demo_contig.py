# make demo, step 3 control: Contiguous -- PoSE with one chunk, i.e. 128-token inputs at positions
# 0..127 (no skip), with the same YaRN x4 scaling; every other setting (data, steps, batch, lr)
# from config/demo_pose.py. What it separates: the skip-wise positions from any fine-tuning with
# the scaling.
#   python train.py config/demo_contig.py
exec(open('config/demo_pose.py').read())
out_dir = 'out-demo/seed-1/contig'
num_chunks = 1  # N = 1: positions 0 .. L_c-1, the document's first L_c tokens (v_0 = 0)
