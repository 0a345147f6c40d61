"""train.py end to end on CPU: torchrun (2 processes, gloo, FSDP2) == one process for the same
global batch; kill + resume == uninterrupted, bitwise; the training loss and the HF export agree
with transformers on the documented batches; PoSE lowers the loss; bad configs stop with one
line."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import (DATA_VOCAB, ENV, TINY, TOL, make_data, make_hf,  # noqa: E402
                      max_logit_diff, positions, start_train as start)
from errors import UserError  # noqa: E402


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp('data')))


def finish(proc, check=True):
    proc.stdout, proc.stderr = proc.communicate(timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def train(*args, nproc=1, check=True):
    return finish(start(*args, nproc=nproc), check)


def read_log(out_dir):
    """{('loss' | 'val_loss', iter): value}, the last record per key winning."""
    out = {}
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        for rec in map(json.loads, f):
            for k in ('loss', 'val_loss'):
                if k in rec:
                    out[(k, rec['iter'])] = rec[k]
    return out


def test_two_processes_give_the_one_process_losses(tmp_path, data):
    """FSDP2 over 2 gloo processes (batch 2 each, grad accumulation 2, activation checkpointing)
    trains on the same global batch as 1 process with batch 4: the same losses and weights up to
    float rounding."""
    common = TINY + [f'--data_dir={data}', '--max_iters=4', '--eval_interval=2',
                     '--gradient_accumulation_steps=2']
    one = start(*common, '--batch_size=4', f'--out_dir={tmp_path / "one"}')  # both at once: 2 cores
    two = start(*common, '--batch_size=2', '--activation_checkpointing=True',
                f'--out_dir={tmp_path / "two"}', nproc=2)
    finish(one), finish(two)
    one, two = read_log(tmp_path / 'one'), read_log(tmp_path / 'two')
    assert sorted(one) == sorted(two) and len(one) == 4 + 3
    for k in one:
        assert abs(one[k] - two[k]) < 1e-5, (k, one[k], two[k])
    assert one[('loss', 4)] < one[('loss', 1)]  # it trained
    w1 = load_file(tmp_path / 'one/hf/model.safetensors')
    w2 = load_file(tmp_path / 'two/hf/model.safetensors')
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5)


# LoRA+ on every projection, frozen weights in bf16: the adapters, the trained embeddings and
# norms, their AdamW state and the frozen weights all go through the checkpoint
LORA_BF16 = ['--lora_rank=4', "--lora_targets=['q','k','v','o','gate','up','down']",
             '--dtype=bfloat16']


@pytest.mark.parametrize('extra', [[], LORA_BF16], ids=['full', 'lora_bf16'])
def test_kill_and_resume_is_bitwise(tmp_path, data, extra):
    """SIGKILL a run as soon as its first checkpoint exists (possibly mid-save of the next),
    resume it: the losses, the log and the exported weights are exactly those of the uninterrupted
    run; so are checkpoint selection's checks (perplexity at target_len) and its best export."""
    common = TINY + [f'--data_dir={data}', '--max_iters=8', '--save_interval=2',
                     '--eval_interval=4', '--select_by=loss', '--select_keys=0', *extra]
    a, b = tmp_path / 'a', tmp_path / 'b'
    uninterrupted = start(*common, f'--out_dir={a}')  # runs beside the one we kill
    with open(tmp_path / 'b.err', 'w') as err:
        proc = subprocess.Popen([sys.executable, 'train.py', *common, f'--out_dir={b}'], cwd=ROOT,
                                env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while not (b / 'latest').exists():
            assert proc.poll() is None, open(tmp_path / 'b.err').read()[-2000:]
            assert time.time() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = (b / 'latest').read_text().strip()
    assert killed_at in ('ckpt-2', 'ckpt-4', 'ckpt-6'), killed_at  # killed before the end
    (b / 'ckpt-99.tmp').mkdir(exist_ok=True)  # the debris of a crashed save must not matter
    (b / 'ckpt-99.tmp' / '__0_0.distcp').write_bytes(b'garbage')
    train(*common, f'--out_dir={b}', '--init_from=resume')
    finish(uninterrupted)
    assert read_log(a) == read_log(b)  # every train and val loss, bit for bit
    wa, wb = load_file(a / 'hf/model.safetensors'), load_file(b / 'hf/model.safetensors')
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and wa.keys() == wb.keys()
    wa, wb = load_file(a / 'hf-best/model.safetensors'), load_file(b / 'hf-best/model.safetensors')
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and wa.keys() == wb.keys()
    checks = [[{k: v for k, v in json.loads(l).items() if k != 'select_s'} for l in
               (d / 'log.jsonl').read_text().splitlines() if 'select_by' in l] for d in (a, b)]
    assert checks[0] == checks[1] and [r['iter'] for r in checks[0]] == [0, 4, 8]
    assert json.load(open(b / 'hf-best/selected.json')) \
        == json.load(open(a / 'hf-best/selected.json'))
    # layout: one complete checkpoint named by `latest`, no temp dirs left
    assert sorted(os.listdir(b)) == ['ckpt-8', 'hf', 'hf-best', 'latest', 'log.jsonl']
    assert (b / 'latest').read_text().strip() == 'ckpt-8'
    assert json.load(open(b / 'ckpt-8/train_state.json'))['iter'] == 8
    lines = (b / 'log.jsonl').read_text().splitlines()
    assert [json.loads(l)['iter'] for l in lines] \
        == [json.loads(l)['iter'] for l in (a / 'log.jsonl').read_text().splitlines()]


def paper_pose(doc_len, train_len, target_len, rng, num_chunks):
    """PoSE (§3.2, Eq. 3-5) written out token by token, independent of sample_positions.py; it draws
    from rng in the documented order: the N - 1 chunk cuts (uniform in 1 .. L_c - 1, all redrawn on
    a collision), then the skip offsets u_1 .. u_{N-1}, then the content offsets v_1 .. v_{N-1},
    each u_i ~ U{u_{i-1} .. L_t - L_c} and v_i ~ U{v_{i-1} .. L_x - L_c}. Token j of the example, in
    chunk i (the number of cuts <= j), is x[v_i + j] at position u_i + j."""
    L = train_len
    while len(set(cuts := [int(rng.integers(1, L)) for _ in range(num_chunks - 1)])) \
        < num_chunks - 1:
        pass
    u, v = [0], [0]
    for _ in range(num_chunks - 1):
        u.append(int(rng.integers(u[-1], target_len - L + 1)))
    for _ in range(num_chunks - 1):
        v.append(int(rng.integers(v[-1], doc_len - L + 1)))
    chunk = [sum(j >= c for c in cuts) for j in range(L)]
    tokens = np.array([v[chunk[j]] + j for j in range(L)])
    return tokens, np.array([u[chunk[j]] + j for j in range(L)])


def hf_val_loss(model_dir, data_dir, seed, eval_iters, batch_size, train_len, target_len,
                num_chunks, plain=False, **cfg_overrides):
    """The val loss by transformers on the documented draws: example g of val batch k comes from
    rng = default_rng([seed, 1, k, 0, g]): a document with >= train_len + 1 tokens, then PoSE
    (paper_pose) on its first len - 1 tokens; the target of each input is the next token of the
    document. plain: the same tokens at positions 0 .. L_c - 1."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(model_dir)
    for k, v in cfg_overrides.items():
        setattr(cfg, k, v)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32).eval()
    tokens = np.fromfile(os.path.join(data_dir, 'val.bin'), dtype=np.uint16).astype(np.int64)
    offsets = np.fromfile(os.path.join(data_dir, 'val.idx'), dtype=np.int64)
    eligible = np.flatnonzero(np.diff(offsets) >= train_len + 1)
    losses = []
    for k in range(eval_iters):
        xs, ys, ps = [], [], []
        for g in range(batch_size):
            rng = np.random.default_rng([seed, 1, k, 0, g])
            d = eligible[rng.integers(len(eligible))]
            doc = tokens[offsets[d]:offsets[d + 1]]
            ti, pi = paper_pose(len(doc) - 1, train_len, target_len, rng, num_chunks)
            pi = np.arange(train_len) if plain else pi
            xs.append(doc[ti]), ys.append(doc[ti + 1]), ps.append(pi)
        x, y, p = (torch.from_numpy(np.stack(a)) for a in (xs, ys, ps))
        with torch.no_grad():
            logits = hf(x, position_ids=p).logits
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    return float(np.mean(losses))


def test_fine_tune_hf_model_matches_transformers(tmp_path, data):
    """init_from an HF dir: PoSE with the default linear scaling (factor = target_len / the
    checkpoint's window). The first val loss equals transformers' on the base weights with that
    scaling, the last one equals transformers' on the export; the export records the scaling and
    max_position_embeddings = target_len and carries the tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM
    base = str(tmp_path / 'base')
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=DATA_VOCAB, max_position_embeddings=32))
    with torch.no_grad():  # large weights: sharp attention, so the RoPE scaling shows in the loss
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    hf.save_pretrained(base)
    with open(os.path.join(base, 'tokenizer.json'), 'w') as f:
        f.write('{"a stand-in": "copied byte for byte"}')
    out = tmp_path / 'out'
    run = dict(seed=7, eval_iters=2, batch_size=2, train_len=32, target_len=256, num_chunks=3)
    train(f'--init_from={base}', f'--data_dir={data}', f'--out_dir={out}', '--method=pose',
          '--max_iters=3', '--eval_interval=3', '--learning_rate=1e-2', '--warmup_iters=0',
          '--device=cpu', '--dtype=float32', '--compile=False', '--activation_checkpointing=False',
          '--gradient_accumulation_steps=1', *[f'--{k}={v}' for k, v in run.items()])
    log = read_log(out)
    # under torchrun only rank 0 reads the weights and scatters them after fully_shard: same run,
    # same numbers
    two = tmp_path / 'two'
    train(f'--init_from={base}', f'--data_dir={data}', f'--out_dir={two}', '--method=pose',
          '--max_iters=3', '--eval_interval=3', '--learning_rate=1e-2', '--warmup_iters=0',
          '--device=cpu', '--dtype=float32', '--compile=False', '--activation_checkpointing=False',
          '--gradient_accumulation_steps=1',
          *[f'--{k}={v}' for k, v in dict(run, batch_size=1).items()], nproc=2)
    log2 = read_log(two)
    assert log.keys() == log2.keys() and all(abs(log[k] - log2[k]) < 1e-5 for k in log), (log, log2)
    w1, w2 = load_file(out / 'hf/model.safetensors'), load_file(two / 'hf/model.safetensors')
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5)
    scaled = dict(rope_parameters={'rope_type': 'linear', 'factor': 8.0, 'rope_theta': 10000.0},
                  max_position_embeddings=256)
    before, plain = hf_val_loss(base, data, **run, **scaled), hf_val_loss(base, data, **run)
    # the scaling matters on these positions: the check below can fail
    assert abs(plain - before) > 1e-3
    assert abs(log[('val_loss', 0)] - before) < 1e-4, (log[('val_loss', 0)], before)
    assert abs(log[('val_loss', 3)] - log[('val_loss', 0)]) > 1e-3  # trained
    assert abs(log[('val_loss', 3)] - hf_val_loss(str(out / 'hf'), data, **run)) < 1e-4
    cfg = json.load(open(out / 'hf/config.json'))
    assert cfg['max_position_embeddings'] == 256
    # 256 / 32
    assert cfg['rope_scaling']['rope_type'] == 'linear' and cfg['rope_scaling']['factor'] == 8.0
    assert open(out / 'hf/tokenizer.json').read() \
        == open(os.path.join(base, 'tokenizer.json')).read()
    # extending the export further: the factor stays relative to the base window (512 / 32), not to
    # 256
    train(f'--init_from={out / "hf"}', f'--data_dir={data}', f'--out_dir={tmp_path / "again"}',
          '--max_iters=0', '--eval_interval=0', '--train_len=32', '--target_len=512',
          '--device=cpu', '--dtype=float32')
    cfg = json.load(open(tmp_path / 'again/hf/config.json'))
    assert cfg['max_position_embeddings'] == 512 and cfg['rope_scaling']['factor'] == 16.0


def test_pose_lowers_the_loss(tmp_path, data):
    """config/tiny_pose.py (from scratch) on the learnable corpus: val loss well below its start (ln
    64 = 4.16), and that val loss is the loss on PoSE's skip-wise positions: transformers on the
    export, on draws made by paper_pose (not by sample_positions.py), gives the same number; plain
    positions give another."""
    out = tmp_path / 'pose'
    train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=40', '--eval_interval=40')
    log = read_log(out)
    assert log[('val_loss', 0)] > 4.0
    assert log[('val_loss', 40)] < log[('val_loss', 0)] - 1.0, log
    # config/tiny_pose.py + TINY
    run = dict(seed=1337, eval_iters=2, batch_size=8, train_len=64, target_len=256)
    pose_loss = hf_val_loss(str(out / 'hf'), data, **run, num_chunks=2)
    # fp32, same ops: ~0 this corpus is a bigram chain: a model that learned it barely looks at
    # positions (the same tokens at plain positions move the loss by ~1e-5 here), hence the tight
    # tolerance above; this guard keeps it meaningful
    assert abs(log[('val_loss', 40)] - pose_loss) < 1e-6, (log[('val_loss', 40)], pose_loss)
    plain = hf_val_loss(str(out / 'hf'), data, **run, num_chunks=2, plain=True)
    assert abs(plain - pose_loss) > 4e-6, (plain, pose_loss)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, data):
    out = tmp_path / 'nan'
    proc = train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=10',
                 '--save_interval=1', '--eval_interval=0', '--learning_rate=1e30',
                 '--warmup_iters=0', '--grad_clip=0', check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
    assert len(err) == 1 and 'loss is nan at iter' in err[0] and 'Traceback' not in proc.stderr
    bad_iter = int(err[0].split('at iter ')[1].split(':')[0])
    latest = (out / 'latest').read_text().strip()
    assert latest == f'ckpt-{bad_iter - 1}' and latest in err[0]
    # no export of a broken model
    assert sorted(os.listdir(out)) == sorted([latest, 'latest', 'log.jsonl'])
    state = json.load(open(out / latest / 'train_state.json'))
    assert state['iter'] == bad_iter - 1


BAD_CONFIGS = [  # (overrides, what the one error line must name)
    (['--batchsize=2'], ['batchsize']),
    (['--target_len=32'], ['target_len=32', 'train_len=64']),
    (['--method=fancy'], ["method='fancy'", 'pose']),
    (['--num_chunks=0'], ['num_chunks=0']),
    (['--content=middle'], ["'middle'"]),
    (['--chunking=official', '--num_chunks=3'], ["chunking='official'", 'num_chunks=3']),
    (['--method=full'], ["method='full'", 'train_len']),
    (['--select_by=best'], ["select_by='best'"]),
    (['--select_by=loss'], ['select_keys=0', 'no tokenizer']),  # the data has no tokenizer
    (['--train_len=400', '--target_len=800'],
     ['no document is long enough', 'train', '401', 'longest has ']),
    (['--init_from=/no/such/model'], ['/no/such/model']),
    (['--init_from=resume'], ['resume', 'no checkpoint']),
    # a paper config, through configurator.py
    (['config/pose_yarn_128k.py'], ["init_from='checkpoints/llama-7b'"]),
    (['--lora_rank=4', "--lora_targets=['q','gate','mlp']"], ['lora_targets', "'mlp'", 'down']),
]


def test_bad_config_is_one_clear_line(tmp_path, data):
    longest = np.diff(np.fromfile(os.path.join(data, 'train.idx'), dtype=np.int64)).max()
    # "no document is long enough" also names the data and its longest document
    named = [data, f'longest has {longest}']
    cases = [(args, needles + named if 'no document is long enough' in needles else needles)
             for args, needles in BAD_CONFIGS]
    for i in range(0, len(cases), 2):  # two at a time: 2 cores
        procs = [(args, needles,
                  start(*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "o"}', *args))
                 for args, needles in cases[i:i + 2]]
        for args, needles, proc in procs:
            finish(proc, check=False)
            assert proc.returncode == 2, (args, proc.stdout[-1000:] + proc.stderr[-2000:])
            lines = [l for l in proc.stderr.splitlines() if l.strip()]
            assert len(lines) == 1 and 'error' in lines[0], (args, proc.stderr)
            for n in needles:
                assert n in lines[0], (args, n, lines[0])


def train_globals(argv):
    """train.py's module code as `python train.py *argv` runs it (configurator, config files,
    overrides, derived settings), without its closing `run(main, ...)`: its functions, bound to
    that config."""
    path = os.path.join(ROOT, 'train.py')
    body = open(path).read().rsplit("\nif __name__ == '__main__':", 1)[0]
    argv0, sys.argv = sys.argv, [path, *argv]
    try:
        ns = {'__name__': '__main__', '__file__': path}
        exec(compile(body, path, 'exec'), ns)
    finally:
        sys.argv = argv0
    return ns


def check_paper_constraints(x, y, p, method, cfg, train_len, target_len):
    """One batch of a document corpus whose tokens are their own offsets (so x shows where each
    token came from) against the paper's definitions (PoSE Eq. 3-5; RandPos; full-length)."""
    for xr, yr, pr in zip(x.numpy(), y.numpy(), p.numpy()):
        n = int((yr != -100).sum())  # < train_len only for full_min_doc's padded documents
        xr, yr, pr = xr[:n], yr[:n], pr[:n]
        assert (yr == xr + 1).all()  # the target is the next token of the document
        assert (np.diff(pr) > 0).all() and 0 <= pr[0] and pr[-1] < target_len
        u, v = pr - np.arange(n), xr - np.arange(n)  # each chunk's skip / content offset
        if method == 'pose':  # u_0 = v_0 = 0, both non-decreasing, changing only between chunks
            assert u[0] == 0 and v[0] == 0 and (np.diff(u) >= 0).all() and (np.diff(v) >= 0).all()
            assert u[-1] <= target_len - train_len
            assert int(((np.diff(u) > 0) | (np.diff(v) > 0)).sum()) <= cfg['num_chunks'] - 1
            if cfg.get('content') == 'zero':
                assert (v == 0).all()
        else:  # RandPos (sorted distinct positions) and full: one contiguous span of text
            assert (v == v[0]).all()
            if method == 'full':
                assert (u == 0).all()


def test_every_config_checks_and_takes_its_first_step(tmp_path, monkeypatch, capsys):
    """Every config/*.py, through train.py's configurator and config check, at toy scale: a tiny
    scratch model, tiny data and L_c = 32 (override), while the config's method, sampler options,
    RoPE type and L_t / L_c ratio stay its own. Its first batch obeys the paper's definition of
    its method, the model gets the config's RoPE type and L_t, and one optimizer step runs."""
    monkeypatch.chdir(ROOT)  # configs exec their base config by a relative path
    lens = [40, 70, 100, 130, 200, 250]
    for split in ('train', 'val'):
        tokens = np.concatenate([np.arange(n) for n in lens]).astype(np.uint16)
        tokens.tofile(tmp_path / f'{split}.bin')
        np.concatenate([[0], np.cumsum(lens)]).astype(np.int64).tofile(tmp_path / f'{split}.idx')
    (tmp_path / 'meta.json').write_text(json.dumps(
        {'dtype': 'uint16', 'vocab_size': 256, 'tokenizer': '',
         'splits': {s: {'docs': len(lens), 'tokens': sum(lens)} for s in ('train', 'val')}}))
    names = sorted(f for f in os.listdir('config') if f.endswith('.py'))
    assert len(names) >= 10
    T = 32
    for name in names:
        cfg = {}
        exec(compile(open(f'config/{name}').read(), name, 'exec'), cfg)
        scale = T / cfg['train_len']
        toy = dict(init_from='scratch', data_dir=str(tmp_path), out_dir=str(tmp_path / 'o' / name),
                   model_args=dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64),
                   train_len=T, target_len=round(cfg['target_len'] * scale), batch_size=4,
                   gradient_accumulation_steps=1, device='cpu', dtype='float32', compile=False,
                   activation_checkpointing=False, eval_interval=0, wandb_log=False)
        for k in ('doc_cap', 'full_min_doc'):  # lengths in tokens: scaled with L_c
            if cfg.get(k):
                toy[k] = max(1, round(cfg[k] * scale))
        ns = train_globals([f'config/{name}'] + [f'--{k}={v}' for k, v in toy.items()])
        method, L_t = ns['method'], toy['target_len']
        assert method == cfg['method'] and ns['rope_scaling'] == cfg.get('rope_scaling'), name
        data, meta, _, _, model, margs, _, _ = ns['prepare']()  # check_config, data, model
        rope_type = (cfg.get('rope_scaling') or {}).get('rope_type')
        assert (margs.rope_scaling or {}).get('rope_type') == rope_type, name
        assert margs.max_position_embeddings == L_t, name
        x, y, p = ns['get_batch'](data, 'train', 0, 0)
        assert x.shape == y.shape == p.shape == (4, T), name
        check_paper_constraints(x, y, p, method, cfg, T, L_t)
        # a LoRA config: adapters on its targets, and only they, embeddings and norms train
        lora = [n for n, p in model.named_parameters() if p.requires_grad and 'lora' in n]
        assert len(lora) == 2 * len(cfg.get('lora_targets', [])) if cfg.get('lora_rank') \
            else not lora, name
        autocast = ns['wrap_model'](model, None)
        loss, _, _ = ns['train_step'](model, ns['make_optimizer'](model), data, autocast, 0)
        assert math.isfinite(loss), name
    capsys.readouterr()


def test_full_on_pose_documents_and_doc_cap(tmp_path, monkeypatch):
    """full_min_doc: the full-length baseline also draws PoSE's shorter documents, whole,
    right-padded with unscored targets (the official code's truncate/pad); doc_cap: tokens only from
    a document's first doc_cap + 1. Token value = its offset in the document, so every row shows
    where it came from."""
    lens = [40, 70, 100, 130, 300, 500]
    np.concatenate([np.arange(n) for n in lens]).astype(np.uint16).tofile(tmp_path / 'train.bin')
    np.concatenate([[0], np.cumsum(lens)]).astype(np.int64).tofile(tmp_path / 'train.idx')
    (tmp_path / 'meta.json').write_text(json.dumps({'dtype': 'uint16', 'vocab_size': 512,
                                                    'tokenizer': 'none',
                                                    'splits': {'train': {'docs': len(lens),
                                                                         'tokens': sum(lens)}}}))
    monkeypatch.setattr(sys, 'argv', ['train.py', '--device=cpu'])  # the config, set as by a user
    import importlib
    train = importlib.import_module('train')
    monkeypatch.setattr(train, 'data_dir', str(tmp_path))
    monkeypatch.setattr(train, 'batch_size', 64)
    for k, v in dict(method='full', train_len=128, target_len=128, full_min_doc=64,
                     sampler_options={}).items():
        monkeypatch.setattr(train, k, v)
    data = {'train': train.load_split('train', 512)}
    assert list(data['train'][2]) == [1, 2, 3, 4, 5]  # >= 65 tokens: PoSE's documents at L_c = 64
    x, y, p = train.get_batch(data, 'train', 0, 0)
    seen = set()
    for xr, yr, pr in zip(x.numpy(), y.numpy(), p.numpy()):
        n = int((yr != -100).sum())
        assert (pr == np.arange(128)).all() and (yr[n:] == -100).all() and (xr[n:] == 0).all()
        # contiguous text, next tokens
        assert (yr[:n] == xr[:n] + 1).all() and (np.diff(xr[:n]) == 1).all()
        if n < 128:  # a short document: all of it from its start (70 or 100 tokens: 69 / 99 inputs)
            assert xr[0] == 0 and n + 1 in (70, 100)
        seen.add(n)
    assert {69, 99, 128} <= seen
    for k, v in dict(method='pose', train_len=32, target_len=256, full_min_doc=0, doc_cap=60,
                     sampler_options={'num_chunks': 2, 'content': 'uniform',
                                      'chunking': 'paper'}).items():
        monkeypatch.setattr(train, k, v)
    data = {'train': train.load_split('train', 512)}
    x, y, p = train.get_batch(data, 'train', 3, 0)
    assert 50 <= y.max() <= 60 and (y == x + 1).all()  # from the first 61 tokens only
    monkeypatch.setattr(train, 'doc_cap', 0)
    # without the cap: the whole document
    assert train.get_batch(data, 'train', 3, 0)[1].max() > 100


def test_gpu_recipe_on_cpu_fsdp2_bf16_compile_checkpointing_and_resume(tmp_path, data):
    """The combination users run on GPUs, on 2 gloo processes: FSDP2 with a bf16
    MixedPrecisionPolicy, inductor-compiled blocks, activation checkpointing; a checkpoint, a resume
    from it, an export each time. Both runs exit 0 (no abort at exit: every tensor reference is
    dropped before destroy_process_group)."""
    recipe = ['config/tiny_pose.py', '--init_from=scratch', '--dtype=bfloat16', '--compile=True',
              '--activation_checkpointing=True', f'--data_dir={data}', f'--out_dir={tmp_path}',
              '--batch_size=2', '--eval_interval=0', '--save_interval=1', '--log_interval=1']
    first = train(*recipe, '--max_iters=1', nproc=2)
    resumed = train(*recipe, '--init_from=resume', '--max_iters=2', nproc=2)
    for proc in (first, resumed):
        assert 'terminate called' not in proc.stderr \
            and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    log = read_log(tmp_path)
    assert sorted(log) == [('loss', 1), ('loss', 2)] and all(np.isfinite(v) for v in log.values())
    assert sorted(os.listdir(tmp_path)) == ['ckpt-2', 'hf', 'latest', 'log.jsonl']
    cfg = json.load(open(tmp_path / 'hf/config.json'))
    assert cfg['torch_dtype'] == 'bfloat16' and cfg['max_position_embeddings'] == 256
    w = load_file(tmp_path / 'hf/model.safetensors')
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all() for t in w.values())


# ---- LoRA / LoRA+ ----
LORA_PROJ = {'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'o': 'o_proj', 'gate': 'gate_proj',
             'up': 'up_proj', 'down': 'down_proj'}  # lora_targets' names: the HF projections


def lora_count(cfg, rank, targets, embeddings_norms):
    """The trainable parameters LoRA+ prescribes, from an HF config.json: rank x (d_in + d_out) per
    adapted projection per layer; LoRA+ adds the token embeddings, lm_head when untied and every
    RMSNorm (two per layer and the final one)."""
    d, f, layers = cfg['hidden_size'], cfg['intermediate_size'], cfg['num_hidden_layers']
    hd = cfg.get('head_dim') or d // cfg['num_attention_heads']
    q, kv = cfg['num_attention_heads'] * hd, cfg['num_key_value_heads'] * hd
    d_in_out = {'q': (d, q), 'k': (d, kv), 'v': (d, kv), 'o': (q, d), 'gate': (d, f),
                'up': (d, f), 'down': (f, d)}
    n = layers * sum(rank * sum(d_in_out[t]) for t in targets)
    if embeddings_norms:
        n += cfg['vocab_size'] * d * (1 if cfg['tie_word_embeddings'] else 2)
        n += (2 * layers + 1) * d
    return n


def test_lora_plus_trains_what_it_should_and_exports_merged_weights(tmp_path, data):
    """LoRA+ (rank 4 on q, v, o, gate) from an HF model, one process and FSDP2 over 2 (rank 0
    scatters weights and adapters): the same losses and export. Resumed in this process, the model
    with its adapters unmerged gives transformers' logits on the export (merged, no extra keys);
    the projections without adapters are the base's bit for bit; the trainable parameters and the
    AdamW state are LoRA+'s count from config.json; a resume cannot change a LoRA setting."""
    import transformers
    _, base = make_hf(tmp_path, tie=False)
    targets = ['q', 'v', 'o', 'gate']
    one, two = tmp_path / 'one', tmp_path / 'two'
    common = [f'--init_from={base}', f'--data_dir={data}', '--method=pose', '--train_len=24',
              '--target_len=128', '--max_iters=3', '--eval_interval=3', '--eval_iters=1',
              '--learning_rate=1e-2', '--warmup_iters=0', '--device=cpu', '--dtype=float32',
              '--compile=False', '--activation_checkpointing=False',
              '--gradient_accumulation_steps=1', '--lora_rank=4', f'--lora_targets={targets}']
    procs = [start(*common, '--batch_size=2', f'--out_dir={one}'),
             start(*common, '--batch_size=1', f'--out_dir={two}', nproc=2)]
    for proc in procs:
        finish(proc)
    log1, log2 = read_log(one), read_log(two)
    assert log1.keys() == log2.keys() and all(abs(log1[k] - log2[k]) < 1e-5 for k in log1)
    w1, w2 = load_file(one / 'hf/model.safetensors'), load_file(two / 'hf/model.safetensors')
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5)
    # the export: the base's tensor names, nothing else; frozen projections untouched
    w0 = load_file(os.path.join(base, 'model.safetensors'))
    assert w1.keys() == w0.keys()
    for k in w0:
        adapted = any(f'.{LORA_PROJ[t]}.' in k for t in targets)
        frozen = k.endswith('proj.weight') and not adapted
        assert torch.equal(w1[k], w0[k]) == frozen, k  # the rest trained (embeddings, norms too)
    # the trained model, adapters unmerged, from the last checkpoint
    ns = train_globals(common + ['--batch_size=2', f'--out_dir={one}', '--init_from=resume'])
    _, _, ckpt_dir, _, model, _, _, _ = ns['prepare']()
    ns['wrap_model'](model, None)
    opt = ns['make_optimizer'](model)
    ns['load_checkpoint'](model, opt, ckpt_dir)
    adapters = [m for m in model.modules() if hasattr(m, 'lora_B')]
    assert len(adapters) == 2 * len(targets) and all(m.lora_B.abs().min() > 0 for m in adapters)
    cfg = json.load(open(os.path.join(base, 'config.json')))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == lora_count(cfg, 4, targets, True)
    assert {id(p) for g in opt.param_groups for p in g['params']} == {id(p) for p in trainable}
    assert sum(s['exp_avg'].numel() for s in opt.state.values()) == lora_count(cfg, 4, targets,
                                                                               True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(one / 'hf'),
                                                           dtype=torch.float32).eval()
    for kind in ('contig', 'mixed'):
        assert max_logit_diff(hf, model, positions(kind)) < TOL, kind
    for change in ('--lora_rank=8', '--lora_alpha=8', "--lora_targets=['q']",
                   '--train_embeddings_norms=False'):
        key = change[2:].split('=')[0]
        with pytest.raises(UserError, match=f"{key}=.* differs from the checkpoint's {key}="):
            train_globals(common + ['--batch_size=2', f'--out_dir={one}', '--init_from=resume',
                                    change])['prepare']()
    # a checkpoint written before the LoRA keys existed was full fine-tuning: not resumed as LoRA
    state_path = one / 'ckpt-3' / 'train_state.json'
    state = json.load(open(state_path))
    state['config'] = {k: v for k, v in state['config'].items() if 'lora' not in k}
    state_path.write_text(json.dumps(state))
    with pytest.raises(UserError, match="lora_rank=4 differs from the checkpoint's lora_rank=0"):
        train_globals(common + ['--batch_size=2', f'--out_dir={one}',
                                '--init_from=resume'])['prepare']()


def test_lora_trainable_count_and_config_checks(tmp_path, capsys):
    """add_lora on an HF model: the trainable parameters are LoRA+'s (or plain LoRA's) count from
    config.json, tied embeddings counted once; a bad LoRA setting is one error naming it."""
    from hf_checkpoint import load_pretrained
    ns = train_globals(['--device=cpu', f'--out_dir={tmp_path / "o"}'])
    for tie in (False, True):
        _, base = make_hf(tmp_path / f'tie{tie}', tie=tie, kv=1)
        cfg = json.load(open(os.path.join(base, 'config.json')))
        for targets, plus in ((['q', 'k', 'v', 'o'], True), (list(LORA_PROJ), False),
                              (['down'], True)):
            model = load_pretrained(base, dtype=torch.float32)
            ns['add_lora'](model, 8, 16.0, targets, plus)
            count = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert count == lora_count(cfg, 8, targets, plus), (tie, targets, plus)
    bad = [(['--lora_rank=-1'], 'lora_rank=-1'), (['--lora_alpha=0'], 'lora_alpha=0'),
           (['--lora_targets=[]'], 'lora_targets=[]'),
           (["--lora_targets=['q','q']"], "lora_targets=['q', 'q']"),
           (['--train_embeddings_norms=False'], 'train_embeddings_norms=False')]
    for args, needle in bad:
        ns = train_globals(['--device=cpu', f'--out_dir={tmp_path / "o"}', *args])
        with pytest.raises(UserError, match=re.escape(needle)):
            ns['check_config']()
    capsys.readouterr()
