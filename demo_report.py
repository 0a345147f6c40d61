"""
The demo's helper (demo.sh runs it): writes the demo's input files, and prints the final table.

    python demo_report.py --stage=sources   # stdlib -> src/python_{train,val}.jsonl + src/tok.jsonl (tokenizer sample)
    python demo_report.py --stage=passkey   # src/python_short.jsonl, src/passkey_short.jsonl, src/passkey_long.jsonl
    python demo_report.py --stage=report --seeds="1 2 3"   # the paper-style table (Table 1 + Fig. 2b) + plots

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

What made retrieval learnable (measured, see the README): the passkey documents must be MANY -- each seen
about once. With a few hundred, drawn again and again, the model memorises each document's key instead of
learning to copy it (0% at L_c after 1,000-2,500 steps; a repeated-sequence probe showed no copying at
all). Since draws are per document, the stdlib files are cut into `piece_tokens`-token pieces
(python_pieces), which multiplies the documents, and so the passkey documents at the same share. A
`copy_share` of fresh random-word sequences, repeated (word_drill), adds copying practice.
"""
import json
import os
import re

import numpy as np
from tqdm import tqdm

from errors import UserError, pyplot, run, save_figure, write_jsonl_atomic, write_text_atomic

# -----------------------------------------------------------------------------
stage = 'report'  # 'sources' | 'passkey' | 'report'
src_dir = 'data-demo/src'  # where the demo's jsonl inputs go
tokenizer = 'data-demo/tok/tokenizer.model'  # the demo's sentencepiece model (stage passkey)
train_len = 128  # L_c: the original window
target_len = 512  # L_t: the extended window (4x: why not 8x, see the README)
val_fraction = 0.1  # stdlib files held out for the perplexity evaluation (seeded)
python_mb = 8.0  # at most this many MB of stdlib source (test suites left out; a random subset of files)
tok_sample_docs = 150  # stdlib files in the tokenizer sample ...
tok_passkey_per_doc = 3  # ... each followed by this many passkey prompts (so the filler gets its own tokens)
passkey_share = 0.4  # fraction of the drawable training documents that are passkey prompts
copy_share = 0.2  # fraction that are copy drills: 16 random words, repeated (teaches copying, see word_drill)
piece_tokens = 512  # the stdlib files are cut into pieces of this many tokens for the L_c mix (python_pieces)
seed = 1337  # file split, keys, depths
out_dir = 'out-demo'  # eval JSONs (report stage) ...
methods = 'original,pi,randpos,full,pose'  # ... rows: out_dir/seed-S/{ppl,passkey}-{method}.json
seeds = '1'  # the seeds to report (space-separated): each cell is their mean and min-max
# -----------------------------------------------------------------------------
if __name__ == '__main__':  # run as a script: a config file / --key=value; imported (the tests): the defaults
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
LABELS = {'original': 'Original', 'pi': 'YaRN-only', 'randpos': 'RandPos', 'full': 'Full-length', 'pose': 'PoSE'}


def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line)['text'] for line in f]


def stage_sources():
    """The stdlib split by file into train / val, and a tokenizer sample with passkey prompts mixed in."""
    from data_format import corpus_files
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


def exact_passkey_doc(tok, length, rng, F):
    """Text of a passkey prompt + ' ' + key + '.' that tokenizes (BOS included) to exactly `length` tokens, for a
    random key and depth. The prompt's lines are tokenized apart ('\\n' is a piece of its own), so its length
    is a sum of per-line counts: F[n] = tokens of n filler words (filled in as needed), and the key's two lines.
    The result is checked with one real encode; filler comes in words, so some draws cannot land exactly."""
    from eval_passkey import KEY_LINE, QUESTION, TASK, filler_text
    tlen = lambda t: len(tok.encode(t, bos=False))  # noqa: E731
    for _ in range(200):
        key, depth = str(int(rng.integers(10000, 100000))), float(rng.random())
        fixed = 1 + 4 + tlen(TASK) + tlen(KEY_LINE.format(key=key)) + tlen(QUESTION + ' ' + key + '.')  # + BOS, newlines
        n = 0
        while True:
            nb = int(round(depth * n))
            while len(F) <= n:
                F.append(tlen(filler_text(len(F))))
            total = fixed + F[nb] + F[n - nb]
            if total >= length:
                break
            n += 1
        if total == length:
            text = make_prompt_text(n, key, depth)
            if len(tok.encode(text, bos=True)) == length:
                return text
    raise ValueError(f"could not build a passkey prompt of exactly {length} tokens in 200 draws")


def make_prompt_text(n, key, depth):
    from eval_passkey import make_passkey_prompt
    return make_passkey_prompt(n, key, depth)[0] + ' ' + key + '.'  # the '.' teaches where the number ends


def word_drill(words, length, rng):
    """16 random words, repeated to ~length tokens: after the first pass every token is a copy of one 16 words
    back. Fresh words in every document, so only copying (not memorising) lowers the loss."""
    seq = ' '.join(words[i] for i in rng.integers(0, len(words), 16))
    return ' '.join([seq] * (2 + length // 40))  # 16 words are ~40 tokens


def python_pieces(tok, texts, n_tokens):
    """The stdlib files cut into pieces of n_tokens tokens (decoded back to text; a shorter tail is dropped).
    train.py draws documents uniformly: short pieces make the pretraining mix a mix by tokens, and let the
    passkey documents be many (each seen about once) at the same share."""
    out = []
    for ids in tok.encode_batch(texts, bos=False):
        out += [tok.decode(ids[i:i + n_tokens]) for i in range(0, len(ids) - n_tokens + 1, n_tokens)]
    return out


def stage_passkey():
    from tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer)
    train = read_jsonl(os.path.join(src_dir, 'python_train.jsonl'))
    words = sorted({w for t in train for w in re.findall(r'\b[A-Za-z][a-z]{2,9}\b', t)})
    rng = np.random.default_rng([seed, 1])
    F = []
    short = python_pieces(tok, train, piece_tokens)
    write_jsonl_atomic(os.path.join(src_dir, 'python_short.jsonl'), short)
    lens = np.array([len(ids) for ids in tok.encode_batch(train, bos=True)])
    for name, L, n_python in (('passkey_short', train_len + 1, len(short)),
                              ('passkey_long', target_len + 1, int((lens >= target_len + 1).sum()))):
        n = int(round(passkey_share / (1 - passkey_share - copy_share) * n_python))
        n_copy = int(round(copy_share / (1 - passkey_share - copy_share) * n_python))
        docs = [exact_passkey_doc(tok, L, rng, F) for _ in tqdm(range(n), desc=name, leave=False)]
        docs += [word_drill(words, L, rng) for _ in range(n_copy)]
        write_jsonl_atomic(os.path.join(src_dir, f'{name}.jsonl'), docs)
        print(f'{name}: {n} passkey documents of {L} tokens + {n_copy} copy drills next to {n_python} python '
              f'documents ({100 * n / (n + n_copy + n_python):.0f}% + '
              f'{100 * n_copy / (n + n_copy + n_python):.0f}% of what a run at this length draws)')
    lengths = passkey_eval_lengths(tok, rng)
    with open(os.path.join(src_dir, 'passkey_lengths.txt'), 'w') as f:
        f.write(','.join(map(str, lengths)) + '\n')
    print(f'passkey eval lengths: {lengths} (written to {src_dir}/passkey_lengths.txt)')


def passkey_eval_lengths(tok, rng):
    """eval_passkey.py builds a prompt within 1% of the requested length, in whole filler words: some short
    lengths cannot be hit. For each multiple of L_c up to L_t (or each power-of-2 multiple when L_t > 4 L_c),
    take the largest length at or below it that works for 30 random keys and depths."""
    from eval_passkey import build_passkey_prompt
    ratio = target_len // train_len
    mults = range(1, ratio + 1) if ratio <= 4 else [2 ** i for i in range(ratio.bit_length()) if 2 ** i <= ratio]
    out = []
    for L in [m * train_len for m in mults]:
        for cand in range(L, L - 12, -1):
            try:
                for _ in range(30):
                    build_passkey_prompt(tok, cand, str(int(rng.integers(10000, 100000))), float(rng.random()))
                out.append(cand)
                break
            except UserError:  # this length cannot be built: try the next
                continue
        else:
            raise ValueError(f"no passkey prompt length in [{L - 11}, {L}] that eval_passkey.py can build")
    return out


def read_run(run_dir):
    """{method: {'ppl': {L: ppl}, 'passkey': {L: acc}, 'digits': {L: frac}, 'step_ms': ms}} from one seed's eval
    JSONs and train logs; a missing file leaves its entries out."""
    out = {}
    for m in [m.strip() for m in methods.split(',') if m.strip()]:
        row = out.setdefault(m, {})
        for kind in ('ppl', 'passkey'):
            p = os.path.join(run_dir, f'{kind}-{m}.json')
            if not os.path.isfile(p):
                continue
            with open(p) as f:
                r = json.load(f)
            row[kind] = {int(L): v for L, v in (r['ppl'] if kind == 'ppl' else r['accuracy']).items()}
            if kind == 'passkey':  # partial credit, to see a near miss: mean fraction of key tokens right
                row['digits'] = {}
                for L in row['passkey']:
                    ts = [t for t in r['trials'] if int(t['length']) == L]
                    row['digits'][L] = float(np.mean([np.mean([a == b for a, b in zip(t['answer_ids'], t['pred_ids'])])
                                                      for t in ts]))
                row['passkey_trials'] = r.get('settings', {}).get('num_trials')
        log = os.path.join(run_dir, 'original' if m == 'pi' else m, 'log.jsonl')
        if m != 'pi' and os.path.isfile(log):  # fine-tuning cost from train.py's log: mean step time
            recs = [json.loads(line) for line in open(log) if '"dt_ms"' in line]
            recs = recs[1:] or recs  # the first step includes warm-up
            if recs:
                row['step_ms'] = {0: float(np.mean([r['dt_ms'] for r in recs]))}
    return out


def claims(run):
    """The paper's claims in the miniature (issue goals), each True / False / None (not measured) for one seed."""
    Lc, Lt = train_len, target_len

    def get(m, kind, L):
        v = run.get(m, {}).get(kind, {})
        near = [k for k in v if 0.95 * L < k <= L]  # passkey lengths sit a few tokens below L (passkey_eval_lengths)
        return v[max(near)] if near else None

    def test(*xs, f):
        return None if any(x is None for x in xs) else bool(f(*xs))
    pk = lambda m: [v for v in run.get(m, {}).get('passkey', {}).values()] or None  # noqa: E731
    return [
        ('Original passkey >= 0.9 at L_c', test(get('original', 'passkey', Lc), f=lambda a: a >= 0.9)),
        ('PoSE passkey >= 0.9 at every length up to L_t', test(pk('pose'), f=lambda a: min(a) >= 0.9)),
        ('Full-length passkey >= 0.9 at every length', test(pk('full'), f=lambda a: min(a) >= 0.9)),
        ('Original passkey <= 0.2 at L_t', test(get('original', 'passkey', Lt), f=lambda a: a <= 0.2)),
        ('YaRN-only (no training) passkey <= 0.2 at L_t', test(get('pi', 'passkey', Lt), f=lambda a: a <= 0.2)),
        ('RandPos passkey at L_t <= PoSE - 0.3', test(get('randpos', 'passkey', Lt), get('pose', 'passkey', Lt),
                                                     f=lambda r, p: r <= p - 0.3)),
        ('Original ppl rises past L_c (L_t > L_c)', test(get('original', 'ppl', Lt), get('original', 'ppl', Lc),
                                                        f=lambda a, b: a > b)),
        ('PoSE ppl at L_t within 5% of Full-length', test(get('pose', 'ppl', Lt), get('full', 'ppl', Lt),
                                                          f=lambda p, q: p <= 1.05 * q)),
        ('RandPos ppl at L_t above PoSE', test(get('randpos', 'ppl', Lt), get('pose', 'ppl', Lt), f=lambda r, p: r > p)),
        ('PoSE ppl at L_c within 10% of Original', test(get('pose', 'ppl', Lc), get('original', 'ppl', Lc),
                                                        f=lambda p, o: p <= 1.10 * o)),
    ]


def cell(vs, fmt, several):
    """One table cell: the mean of a method's values over the seeds, then (min-max) when several seeds are
    reported; '-' when none was measured."""
    if not vs:
        return '-'
    return f'{np.mean(vs):{fmt}}' + (f' ({min(vs):{fmt}}-{max(vs):{fmt}})' if several else '')


def verdict(marks):
    """A claim's verdict from its per-seed marks ('+' holds, '-' fails, '?' not measured)."""
    return 'holds for every seed' if set(marks) == {'+'} else 'fails for some seed' if '-' in marks else 'unmeasured'


def report_lines(runs, labels):
    """{seed: read_run(...)} -> (the report's lines, {seed: claims}): each cell the mean over the seeds, and
    min-max when there are several; then the claims, per seed."""
    seed_list = list(runs)
    w = max(len(LABELS.get(m, m)) for m in labels) + 2
    cw = 20 if len(seed_list) > 1 else 9

    def section(title, kind, fmt):
        Ls = sorted({L for r in runs.values() for m in labels for L in r.get(m, {}).get(kind, {})})
        if not Ls:
            return []
        head = ''.join(f'{L:>{cw}}' for L in Ls) if kind != 'step_ms' else f"{'ms':>{cw}}"
        lines = [title, f"{'method':<{w}}" + head]
        for m in labels:
            cells = [cell([r[m][kind][L] for r in runs.values() if L in r.get(m, {}).get(kind, {})], fmt,
                          len(seed_list) > 1) for L in Ls]
            lines.append(f'{LABELS.get(m, m):<{w}}' + ''.join(f'{c:>{cw}}' for c in cells))
        return lines + ['']
    trials = next((r[m].get('passkey_trials') for r in runs.values() for m in r if r[m].get('passkey_trials')), '?')
    n = f'{len(seed_list)} seeds ({" ".join(map(str, seed_list))}): mean (min-max)' if len(seed_list) > 1 \
        else f'seed {seed_list[0]}'
    lines = [f'nanoPoSE demo, L_c = {train_len} -> L_t = {target_len}, {n}', '']
    lines += section('Perplexity on held-out stdlib files (eval_ppl.py), window length L:', 'ppl', '.2f')
    lines += section(f'Passkey retrieval accuracy (eval_passkey.py, {trials} trials per length, random depth):',
                     'passkey', '.2f')
    lines += section("Passkey, partial credit: mean fraction of the key's tokens predicted right (not in the paper):",
                     'digits', '.2f')
    lines += section('Training step time (train.py log, mean over the steps after the first):', 'step_ms', '.0f')
    per_seed = {s: claims(r) for s, r in runs.items()}
    lines += ['Claims (per seed: + holds, - fails, ? not measured):'] + claim_lines(per_seed, seed_list)
    # the extension claims presuppose a base model that retrieves inside its own window: where only some seeds
    # have one, the claims once more over those seeds alone, so a failed extension is told from a failed base
    able = [s for s in seed_list if per_seed[s][0][1]]
    if 0 < len(able) < len(seed_list):
        lines += ['', f'Claims over the seeds whose Original retrieves at L_c (passkey >= 0.9): '
                      f'{" ".join(map(str, able))}'] + claim_lines(per_seed, able)[1:]
    return lines, per_seed


def claim_lines(per_seed, seed_list):
    """One line per claim: its marks over seed_list ('+' holds, '-' fails, '?' not measured) and the verdict."""
    lines = []
    for i, (name, _) in enumerate(per_seed[seed_list[0]]):
        marks = ''.join('?' if per_seed[s][i][1] is None else '+-'[not per_seed[s][i][1]] for s in seed_list)
        lines.append(f'  {marks:<{max(len(seed_list), 5)}} {name:<48} {verdict(marks)}')
    return lines


def stage_report():
    """The table of report_lines, printed and written (results.txt, results.json), then the plots."""
    seed_list = [int(s) for s in str(seeds).split()]
    runs = {s: read_run(os.path.join(out_dir, f'seed-{s}')) for s in seed_list}
    labels = [m.strip() for m in methods.split(',') if m.strip()]
    lines, per_seed = report_lines(runs, labels)
    table = '\n'.join(lines)
    print(table)
    write_text_atomic(os.path.join(out_dir, 'results.txt'), table + '\n')
    write_text_atomic(os.path.join(out_dir, 'results.json'), json.dumps(
        {'seeds': seed_list, 'runs': {str(s): {m: {k: {str(L): v for L, v in d.items()} if isinstance(d, dict) else d
                                                    for k, d in row.items()} for m, row in r.items()}
                                      for s, r in runs.items()},
         'claims': {str(s): c for s, c in per_seed.items()}}, indent=1))
    plot(runs, labels)


def plot(runs, labels):
    """ppl and passkey vs length: the mean over the seeds, with a min-max band when there are several."""
    path = os.path.join(out_dir, 'demo.png')
    plt = pyplot(f'the plot {path}', required=False)  # the tables are written already
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ('ppl', 'passkey')):
        for m in labels:
            Ls = sorted({L for r in runs.values() for L in r.get(m, {}).get(kind, {})})
            vals = [[r[m][kind][L] for r in runs.values() if L in r.get(m, {}).get(kind, {})] for L in Ls]
            if not Ls:
                continue
            line, = ax.plot(Ls, [np.mean(v) for v in vals], 'o-', label=LABELS.get(m, m))
            if len(runs) > 1:
                ax.fill_between(Ls, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.15)
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
    fig.suptitle(f'nanoPoSE demo: L_c = {train_len} -> L_t = {target_len}, seeds {" ".join(map(str, runs))}')
    fig.tight_layout()
    save_figure(fig, path)
    print(f'wrote {path}')


def main():
    if stage not in ('sources', 'passkey', 'report'):
        raise UserError(f"stage='{stage}': expected 'sources', 'passkey' or 'report'")
    try:
        {'sources': stage_sources, 'passkey': stage_passkey, 'report': stage_report}[stage]()
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


if __name__ == '__main__':
    run(main)
