"""bench.py end to end on a tiny model, every CPU section in seconds: it runs, writes its JSON and
plot, and what it measures agrees with the independent references it carries (transformers' NLL on
the same checkpoint) and with what the paper's Fig. 3 says of PoSE (a training step's shapes, so its
memory, do not depend on L_t, while full-length fine-tuning's grow with it)."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hf_checkpoint import save_pretrained  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

TINY = ['--dim=32', '--n_layers=1', '--n_heads=2', '--n_kv_heads=2', '--hidden_dim=64',
        '--vocab_size=64']


def test_bench_every_cpu_section(tmp_path):
    torch.manual_seed(0)
    net = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                vocab_size=96, max_position_embeddings=128))
    net.init_weights()
    save_pretrained(net, str(tmp_path / 'tiny'), tokenizer_dir=None)
    out, png = tmp_path / 'r' / 'bench.json', tmp_path / 'r' / 'fig3.png'
    cmd = [sys.executable, 'bench.py', '--only=fig3,train,eval,sampler,prepare,evalcpu,lora', *TINY,
           '--threads=1', '--train_len=16', '--factors=[1,2,4]', '--warmup=0', '--iters=2',
           '--pose_rounds=1', '--batch_size=1', '--seq_len=16', '--eval_len=32', '--eval_tokens=96',
           '--sampler_seconds=0.02', '--prepare_mb=0.05', f"--evalcpu_model={tmp_path / 'tiny'}",
           '--evalcpu_lengths=[32,64]', '--evalcpu_hf_max=32', f"--lora_model={tmp_path / 'tiny'}",
           '--lora_rank=4', "--lora_targets=['q','v','down']", '--lora_seq_len=16',
           f'--out={out}', f'--plot={png}']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(out))
    assert {'fig3', 'train', 'eval', 'sampler', 'prepare', 'evalcpu', 'lora'} <= set(r)
    assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    rows = r['fig3']['rows']
    pose = [x for x in rows if x['method'] == 'pose']
    full = [x for x in rows if x['method'] == 'full']
    assert [x['target_len'] for x in pose] == [x['target_len'] for x in full] == [16, 32, 64]
    assert all(x['tokens'] == 16 for x in pose) and [x['tokens'] for x in full] == [16, 32, 64]
    assert len({x['memory_bytes'] for x in pose}) == 1  # the same shapes at every L_t
    assert full[0]['memory_bytes'] == pose[0]['memory_bytes']  # L_t = L_c: the same step
    assert full[0]['memory_bytes'] < full[1]['memory_bytes'] < full[2]['memory_bytes']
    assert abs(r['eval']['nll_ours'] - r['eval']['nll_hf']) < 1e-4  # transformers, the same windows
    for row in r['evalcpu']['rows']:
        if 'nll_hf' in row:
            assert abs(row['nll_ours'] - row['nll_hf']) / row['T'] < 1e-4
    assert r['train']['tokens_per_s'] > 0 and all(x['draws_per_s'] > 0 for x in r['sampler'])
    assert r['prepare']['tokens'] > 0 and r['prepare']['prepare_s_proc2'] > 0
    assert not [f for f in os.listdir(out.parent) if f.endswith('.tmp') or '.tmp.' in f]
    # lora: LoRA+ by its definition on the tiny model (2 layers, dim 32, 2 heads of 16, 1 KV head,
    # hidden 64, vocab 96 untied): rank 4 x (d_in + d_out) per adapted projection, plus the
    # embeddings, lm_head and 5 norms; AdamW's two fp32 moments (+ its 4-byte step) and one fp32
    # grad for exactly those; B = 0, so both start at the same loss
    full, lora = r['lora']['rows']['full'], r['lora']['rows']['lora']
    adapters = 2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32))
    trainable = adapters + 2 * 96 * 32 + 5 * 32
    assert lora['trainable'] == trainable and full['trainable'] == full['params']
    assert lora['params'] == full['params'] + adapters
    n_tensors = 2 * 3 * 2 + 2 + 5  # q, v, down: A and B per layer; embeddings, lm_head; norms
    assert lora['optimizer_bytes'] == 8 * trainable + 4 * n_tensors
    assert lora['grad_bytes'] == 4 * trainable and full['grad_bytes'] == 4 * full['params']
    assert lora['memory_bytes'] < full['memory_bytes']
    assert lora['first_loss'] == full['first_loss']
