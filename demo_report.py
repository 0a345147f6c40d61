"""
The demo's helper (demo.sh runs it): writes the demo's input files, and prints the final table.

    python demo_report.py --stage=sources   # stdlib -> src/python_{train,val}.jsonl + src/tok.jsonl (tokenizer sample)
    python demo_report.py --stage=passkey   # src/passkey_short.jsonl (L_c+1 tokens), src/passkey_long.jsonl (L_t+1)
    python demo_report.py --stage=report    # the paper-style table (Table 1 + Fig. 2b) + plots from the eval JSONs

Why synthetic passkey documents: a tiny model pretrained for minutes on Python source has never seen
English, let alone the passkey prompt, and retrieves nothing even inside its window -- then a passkey row
measures nothing. So a share of the training documents (`passkey_share` of the documents a run can draw)
are the paper's passkey prompt (eval_passkey.py's own builder: task, filler, key line at a random depth,
question) followed by the answer. train.py draws whole documents uniformly and a window of train_len + 1
tokens inside one, so a passkey document is exactly train_len + 1 tokens: the window is the whole prompt
and ends with the answer. Each method gets the same share at its own training length:
  passkey_short.jsonl  L_c + 1 tokens: pretraining, and PoSE / RandPos fine-tuning (same mix as pretraining;
                       PoSE's skip offsets put the key and the question up to L_t positions apart)
  passkey_long.jsonl   L_t + 1 tokens: full-length fine-tuning (real L_t-token prompts)
Evaluation (eval_passkey.py) uses other random keys and depths (another seed) on the trained models.
"""
import glob
import json
import math
import os
import sys

import numpy as np

# -----------------------------------------------------------------------------
stage = 'report'  # 'sources' | 'passkey' | 'report'
src_dir = 'data-demo/src'  # where the demo's jsonl inputs go
tokenizer = 'data-demo/tok/tokenizer.model'  # the demo's sentencepiece model (stage passkey)
train_len = 128  # L_c: the original window
target_len = 1024  # L_t: the extended window
val_fraction = 0.1  # stdlib files held out for the perplexity evaluation (seeded)
python_mb = 8.0  # at most this many MB of stdlib source (test suites left out; a random subset of files)
tok_sample_docs = 150  # stdlib files in the tokenizer sample ...
tok_passkey_per_doc = 3  # ... each followed by this many passkey prompts (so the filler gets its own tokens)
passkey_share = 0.5  # fraction of the drawable training documents that are passkey prompts
copy_share = 0.0  # fraction that are copy drills: 12 random 5-digit numbers, repeated (induction warm-up)
seed = 1337  # file split, keys, depths
out_dir = 'out-demo'  # eval JSONs (report stage) ...
methods = 'original,pi,randpos,full,pose'  # ... rows: out_dir/{ppl,passkey}-{method}.json
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
LABELS = {'original': 'Original', 'pi': 'PI-only', 'randpos': 'RandPos', 'full': 'Full-length', 'pose': 'PoSE'}


def write_jsonl_atomic(path, texts):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        for t in texts:
            f.write(json.dumps({'text': t}) + '\n')
    os.replace(path + '.tmp', path)
    print(f'wrote {path} ({len(texts)} documents)')


def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line)['text'] for line in f]


def stage_sources():
    """The stdlib split by file into train / val, and a tokenizer sample with passkey prompts mixed in."""
    from prepare_data import corpus_files
    from eval_passkey import make_passkey_prompt
    rng = np.random.default_rng([seed, 0])
    files = [p for p in corpus_files('python_stdlib') if not set(p.split(os.sep)) & {'test', 'tests', 'idle_test'}]
    texts, size = [], 0
    for i in rng.permutation(len(files)):  # a seeded random subset of python_mb MB
        path = files[i]
        if size >= python_mb * 2 ** 20:
            break
        try:
            with open(path, encoding='utf-8') as f:
                t = f.read()
        except UnicodeDecodeError:
            continue  # a few stdlib test fixtures are not UTF-8
        if t.strip():
            texts.append(t)
            size += len(t.encode())
    is_val = rng.random(len(texts)) < val_fraction
    train = [t for t, v in zip(texts, is_val) if not v]
    val = [t for t, v in zip(texts, is_val) if v]
    write_jsonl_atomic(os.path.join(src_dir, 'python_train.jsonl'), train)
    write_jsonl_atomic(os.path.join(src_dir, 'python_val.jsonl'), val)
    sample = []
    for i in rng.permutation(len(train))[:tok_sample_docs]:
        sample.append(train[i])
        for _ in range(tok_passkey_per_doc):
            key = str(int(rng.integers(10000, 100000)))
            sample.append(make_passkey_prompt(int(rng.integers(2, 60)), key, float(rng.random()))[0] + ' ' + key)
    write_jsonl_atomic(os.path.join(src_dir, 'tok.jsonl'), sample)


def exact_passkey_doc(tok, length, rng, hints):
    """Text of a passkey prompt + ' ' + key that tokenizes (BOS included) to exactly `length` tokens.
    Filler comes in whole sentences (~5 tokens), so we draw keys / depths until one lands exactly."""
    from eval_passkey import encode_trial, make_passkey_prompt
    for _ in range(200):
        key, depth = str(int(rng.integers(10000, 100000))), float(rng.random())
        lo = hints.get(length, 0)
        while len(encode_trial(tok, lo + 1, key, depth)[0]) <= length:  # hints make this a short walk
            lo += 1
        while lo > 0 and len(encode_trial(tok, lo, key, depth)[0]) > length:
            lo -= 1
        if len(encode_trial(tok, lo, key, depth)[0]) == length:
            hints[length] = max(lo - 2, 0)
            return make_passkey_prompt(lo, key, depth)[0] + ' ' + key
    raise ValueError(f"could not build a passkey prompt of exactly {length} tokens in 200 draws")


def stage_passkey():
    from prepare_data import load_tokenizer
    tok = load_tokenizer(tokenizer)
    train = read_jsonl(os.path.join(src_dir, 'python_train.jsonl'))
    lens = np.array([len(ids) for ids in tok.encode_batch(train, bos=True)]) if hasattr(tok, 'encode_batch') \
        else np.array([len(tok.encode(t, bos=True)) for t in train])
    rng = np.random.default_rng([seed, 1])
    for name, L in (('passkey_short', train_len + 1), ('passkey_long', target_len + 1)):
        n_python = int((lens >= L).sum())  # the python documents a run at this length can draw
        n = int(round(passkey_share / (1 - passkey_share - copy_share) * n_python))
        n_copy = int(round(copy_share / (1 - passkey_share - copy_share) * n_python))
        hints = {}
        docs = [exact_passkey_doc(tok, L, rng, hints) for _ in range(n)]
        assert all(len(tok.encode(d, bos=True)) == L for d in docs[:5])
        for _ in range(n_copy):  # the same numbers over and over: the next one is always a copy of 12 back
            nums = ' '.join(str(int(k)) for k in rng.integers(10000, 100000, 12))
            reps = 2 + L // 60  # 12 numbers are ~72 tokens: enough repeats for a window of L tokens
            docs.append(' '.join([nums] * reps))
        write_jsonl_atomic(os.path.join(src_dir, f'{name}.jsonl'), docs)
        print(f'{name}: {n} passkey documents of {L} tokens + {n_copy} copy drills next to {n_python} python '
              f'documents of >= {L} tokens ({100 * n / (n + n_copy + n_python):.0f}% + '
              f'{100 * n_copy / (n + n_copy + n_python):.0f}% of what a run at this length draws)')
    lengths = passkey_eval_lengths(tok, rng)
    with open(os.path.join(src_dir, 'passkey_lengths.txt'), 'w') as f:
        f.write(','.join(map(str, lengths)) + '\n')
    print(f'passkey eval lengths: {lengths} (written to {src_dir}/passkey_lengths.txt)')


def passkey_eval_lengths(tok, rng):
    """eval_passkey.py builds a prompt within 1% of the requested length, in whole filler sentences (~5 tokens
    here): below ~500 tokens most lengths cannot be hit. For each of L_c, 2L_c, 4L_c, 8L_c take the largest
    length at or below it that works for 30 random keys and depths."""
    from eval_passkey import build_passkey_prompt
    out = []
    for L in (train_len, 2 * train_len, 4 * train_len, target_len):
        for cand in range(L, L - 12, -1):
            try:
                for _ in range(30):
                    build_passkey_prompt(tok, cand, str(int(rng.integers(10000, 100000))), float(rng.random()))
                out.append(cand)
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"no passkey prompt length in [{L - 11}, {L}] that eval_passkey.py can build")
    return out


def stage_report():
    rows, lengths, pk_lengths = [], set(), set()
    for m in [m.strip() for m in methods.split(',') if m.strip()]:
        row = {'method': m, 'label': LABELS.get(m, m)}
        for kind in ('ppl', 'passkey'):
            p = os.path.join(out_dir, f'{kind}-{m}.json')
            if os.path.isfile(p):
                with open(p) as f:
                    r = json.load(f)
                row[kind] = r['ppl'] if kind == 'ppl' else r['accuracy']
                if kind == 'passkey':  # partial credit, to see a near miss: mean fraction of key tokens right
                    row['digits'] = {}
                    for L in r['accuracy']:
                        ts = [t for t in r['trials'] if str(t['length']) == L]
                        row['digits'][L] = float(np.mean([np.mean([a == b for a, b in zip(t['answer_ids'], t['pred_ids'])])
                                                          for t in ts])) if ts else None
                row[kind + '_trials'] = r.get('settings', {}).get('num_trials')
                (lengths if kind == 'ppl' else pk_lengths).update(int(L) for L in row[kind])
        log = os.path.join(out_dir, m, 'log.jsonl')
        if os.path.isfile(log):  # fine-tuning cost from train.py's log: mean step time, tokens/s
            recs = [json.loads(line) for line in open(log) if '"dt_ms"' in line]
            recs = recs[1:] or recs  # the first step includes warm-up
            if recs:
                row['step_ms'] = float(np.mean([r['dt_ms'] for r in recs]))
                row['tok_s'] = float(np.mean([r.get('tok_per_s', r.get('tokens_per_s', float('nan'))) for r in recs]))
        rows.append(row)
    lengths, pk_lengths = sorted(lengths), sorted(pk_lengths)
    w = max(len(r['label']) for r in rows) + 2

    def cell(v, fmt):
        return f"{'-':>9}" if v is None else f'{v:>9.3g}' if fmt == 'g' and v >= 1e4 else f'{v:>9{fmt}}'
    lines = [f'Perplexity on held-out stdlib files (eval_ppl.py), window length L:',
             f"{'method':<{w}}" + ''.join(f'{L:>9}' for L in lengths) + f"{'step ms':>10}"]
    for r in rows:
        lines.append(f"{r['label']:<{w}}" + ''.join(cell(r.get('ppl', {}).get(str(L)), '.2f') for L in lengths)
                     + (f"{r['step_ms']:>10.0f}" if 'step_ms' in r else f"{'-':>10}"))
    trials = next((r['passkey_trials'] for r in rows if r.get('passkey_trials')), '?')
    lines += ['', f'Passkey retrieval accuracy (eval_passkey.py, {trials} trials per length, random depth):',
              f"{'method':<{w}}" + ''.join(f'{L:>9}' for L in pk_lengths)]
    for r in rows:
        lines.append(f"{r['label']:<{w}}" + ''.join(cell(r.get('passkey', {}).get(str(L)), '.2f') for L in pk_lengths))
    lines += ['', 'Passkey, partial credit: mean fraction of the key\'s tokens predicted right (not in the paper):',
              f"{'method':<{w}}" + ''.join(f'{L:>9}' for L in pk_lengths)]
    for r in rows:
        lines.append(f"{r['label']:<{w}}" + ''.join(cell(r.get('digits', {}).get(str(L)), '.2f') for L in pk_lengths))
    table = '\n'.join(lines)
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'results.txt.tmp'), 'w') as f:
        f.write(table + '\n')
    os.replace(os.path.join(out_dir, 'results.txt.tmp'), os.path.join(out_dir, 'results.txt'))
    with open(os.path.join(out_dir, 'results.json.tmp'), 'w') as f:
        json.dump(rows, f, indent=1)
    os.replace(os.path.join(out_dir, 'results.json.tmp'), os.path.join(out_dir, 'results.json'))
    plot(rows, lengths, pk_lengths)


def plot(rows, lengths, pk_lengths):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('note: matplotlib is not installed: no plots (pip install matplotlib)')
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if 'ppl' in r:
            axes[0].plot(lengths, [r['ppl'].get(str(L), math.nan) for L in lengths], 'o-', label=r['label'])
        if 'passkey' in r:
            axes[1].plot(pk_lengths, [r['passkey'].get(str(L), math.nan) for L in pk_lengths], 'o-', label=r['label'])
    axes[0].set_yscale('log')
    axes[0].set_ylabel('perplexity (Table 1)')
    axes[1].set_ylabel('passkey accuracy (Fig. 2b)')
    axes[1].set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.set_xscale('log', base=2)
        ax.set_xlabel('length (tokens)')
        ax.axvline(train_len, color='gray', ls=':', lw=1)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f'nanoPoSE demo: L_c = {train_len} -> L_t = {target_len}')
    fig.tight_layout()
    path = os.path.join(out_dir, 'demo.png')
    fig.savefig(path + '.tmp', format='png', dpi=120)
    os.replace(path + '.tmp', path)
    print(f'wrote {path}')


if stage not in ('sources', 'passkey', 'report'):
    print(f"error: stage='{stage}': expected 'sources', 'passkey' or 'report'", file=sys.stderr)
    sys.exit(2)
try:
    {'sources': stage_sources, 'passkey': stage_passkey, 'report': stage_report}[stage]()
except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
