"""
The demo's helper (demo/mini.sh runs it): writes the demo's input files, checks and picks its base
model, prints the final table.

    python demo/mini_report.py --stage=sources  # stdlib -> src/python_{train,val}.jsonl, tok.jsonl
    python demo/mini_report.py --stage=passkey  # src/python_short.jsonl, passkey_short.jsonl, ...
    python demo/mini_report.py --stage=rehearsal --ext_passkey=0.1  # src/passkey_ext.jsonl
    python demo/mini_report.py --stage=base --base=DIR  # checks DIR's sha256, prints its output dir
    python demo/mini_report.py --stage=select --base_dirs="A B"  # passkey probes at L_c: the base
    python demo/mini_report.py --stage=report --out_dir=out-demo/base-X --seeds="1 2"  # table, plot

Why synthetic passkey documents: a tiny model pretrained for minutes on Python source has never seen
English, let alone the passkey prompt, and retrieves nothing even inside its window -- then a
passkey row measures nothing. So a share of the training documents (`passkey_share` of the documents
a run can draw) are the paper's passkey prompt (eval_passkey.py's own builder: task, filler, key
line at a random depth, question) followed by the answer. train.py draws whole documents uniformly
and a window of train_len + 1 tokens inside one, so a passkey document is exactly train_len + 1
tokens: the window is the whole prompt and ends with the answer (passkey_short.jsonl, L_c + 1
tokens). Only pretraining sees them: the extension runs fine-tune on the stdlib pieces alone
(mini.sh's data-demo/ext), so retrieval past L_c is transfer from the base model's retrieval inside
L_c, as in the paper (Pile text). Evaluation (eval_passkey.py) uses other random keys and depths
(another seed) on the trained models.

What makes retrieval learnable (docs/miniature-notes.md): the passkey documents must be MANY -- each
seen about once. With a few hundred, drawn again and again, the model memorises each document's key
instead of learning to copy it (0% at L_c after 1,000-2,500 steps; a repeated-sequence probe showed
no copying at all). Since draws are per document, the stdlib files are cut into `piece_tokens`-token
pieces (python_pieces), which multiplies the documents, and so the passkey documents at the same
share. A `copy_share` of fresh random-word sequences, repeated (word_drill), adds copying practice.
"""
import json
import os
import re
import sys

import numpy as np
from tqdm import tqdm

# the project's modules and configurator.py live in the repo root, one folder up
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from errors import (UserError, pyplot, read_json, run, save_figure, write_json_atomic,  # noqa: E402
                    write_jsonl_atomic, write_text_atomic)
from eval_passkey import compare_paired, wilson  # noqa: E402
from tokenizer import sha256_file  # noqa: E402

# -----------------------------------------------------------------------------
stage = 'report'  # 'sources' | 'passkey' | 'rehearsal' | 'base' | 'select' | 'report'
src_dir = 'data-demo/src'  # where the demo's jsonl inputs go
tokenizer = 'data-demo/tok/tokenizer.model'  # the demo's sentencepiece model (stage passkey)
train_len = 128  # L_c: the original window
target_len = 512  # L_t: the extended window (4x: why not 8x, see the README)
val_fraction = 0.1  # stdlib files held out for the perplexity evaluation (seeded)
# at most this many MB of stdlib source (test suites left out; a random subset of files)
python_mb = 8.0
tok_sample_docs = 150  # stdlib files in the tokenizer sample ...
# ... each followed by this many passkey prompts (so the filler gets its own tokens)
tok_passkey_per_doc = 3
passkey_share = 0.4  # fraction of the drawable training documents that are passkey prompts
# fraction that are copy drills: 16 random words, repeated (teaches copying, see word_drill)
copy_share = 0.2
# the stdlib files are cut into pieces of this many tokens for the L_c mix (python_pieces)
piece_tokens = 512
# stage rehearsal: the share of the extension data that is pretraining's passkey prompts
ext_passkey = 0.1
seed = 1337  # file split, keys, depths
base = ''  # stage base: an HF dir of a pretrained Original
base_sha256 = ''  # stage base: its weights' sha256 ('' = base/model.safetensors.sha256, if any)
pretrain_seed = -1  # stage base: the seed it was pretrained with, for base.json (-1 = not known)
base_dirs = ''  # stage select: the candidates' dirs (from stage base), each with probe-passkey.json
min_probe = 0.9  # stage select: a base retrieves when its probe passkey at L_c is at least this
eval_seed = 7  # stage select: the evaluation's eval_passkey seed, which a probe must not use
out_dir = 'out-demo'  # stage base: where base-<sha256[:12]>/ goes; stage report: one such base dir
methods = 'original,pi,randpos,contig,full,pose'  # rows: {ppl,passkey}-{method}.json (BASE_METHODS)
seeds = '1'  # the extension seeds to report (space-separated): pooled counts, mean and min-max
# -----------------------------------------------------------------------------
# run as a script: a config file / --key=value; imported (the tests): the defaults
if __name__ == '__main__':
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
# -----------------------------------------------------------------------------
LABELS = {'original': 'Original', 'pi': 'YaRN-only', 'randpos': 'RandPos', 'contig': 'Contiguous',
          'full': 'Full-length', 'pose': 'PoSE'}
BASE_METHODS = ('original', 'pi')  # evaluated once per base (out_dir/), the others per seed
ALPHA = 0.05  # the significance level of the paired tests


def read_jsonl(path):
    """The texts of a .jsonl file that stage sources wrote."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found (run --stage=sources first, with the same src_dir)")
    with open(path, encoding='utf-8') as f:
        try:
            return [json.loads(line)['text'] for line in f]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a .jsonl of {{\"text\": ...}} lines ({e})") from None


def stage_sources():
    """The stdlib split by file into train / val, and a tokenizer sample with passkey prompts mixed
    in."""
    from data_format import corpus_files
    from eval_passkey import make_passkey_prompt
    rng = np.random.default_rng([seed, 0])
    test_dirs = {'test', 'tests', 'idle_test'}
    files = [p for p in corpus_files('python_stdlib') if not set(p.split(os.sep)) & test_dirs]
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
            n_filler, depth = int(rng.integers(2, 60)), float(rng.random())
            sample.append(make_passkey_prompt(n_filler, key, depth)[0] + ' ' + key)
    write_jsonl_atomic(os.path.join(src_dir, 'tok.jsonl'), sample)


def exact_passkey_doc(tok, length, rng, F):
    """Text of a passkey prompt + ' ' + key + '.' that tokenizes (BOS included) to exactly `length`
    tokens, for a random key and depth. The prompt's lines are tokenized apart ('\\n' is a piece of
    its own), so its length is a sum of per-line counts: F[n] = tokens of n filler words (filled in
    as needed), and the key's two lines. The result is checked with one real encode; filler comes in
    words, so some draws cannot land exactly."""
    from eval_passkey import KEY_LINE, QUESTION, TASK, filler_text
    tlen = lambda t: len(tok.encode(t, bos=False))  # noqa: E731
    for _ in range(200):
        key, depth = str(int(rng.integers(10000, 100000))), float(rng.random())
        # BOS + 4 newlines + the task, key and question lines
        fixed = 1 + 4 + tlen(TASK) + tlen(KEY_LINE.format(key=key)) \
            + tlen(QUESTION + ' ' + key + '.')
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
    # the lengths come from train_len / target_len: a length the filler cannot hit is a config
    # choice
    raise UserError(f"could not build a passkey prompt of exactly {length} tokens in 200 draws "
                    f"(train_len={train_len}: try another)")


def make_prompt_text(n, key, depth):
    from eval_passkey import make_passkey_prompt
    # the '.' teaches where the number ends
    return make_passkey_prompt(n, key, depth)[0] + ' ' + key + '.'


def word_drill(words, length, rng):
    """16 random words, repeated to ~length tokens: after the first pass every token is a copy of
    one 16 words back. Fresh words in every document, so only copying (not memorising) lowers the
    loss."""
    seq = ' '.join(words[i] for i in rng.integers(0, len(words), 16))
    return ' '.join([seq] * (2 + length // 40))  # 16 words are ~40 tokens


def python_pieces(tok, texts, n_tokens):
    """The stdlib files cut into pieces of n_tokens tokens (decoded back to text; a shorter tail is
    dropped). train.py draws documents uniformly: short pieces make the pretraining mix a mix by
    tokens, and let the passkey documents be many (each seen about once) at the same share."""
    out = []
    for ids in tok.encode_batch(texts, bos=False):
        starts = range(0, len(ids) - n_tokens + 1, n_tokens)
        out += [tok.decode(ids[i:i + n_tokens]) for i in starts]
    return out


def stage_passkey():
    from tokenizer import load_tokenizer
    train = read_jsonl(os.path.join(src_dir, 'python_train.jsonl'))
    tok = load_tokenizer(tokenizer)
    words = sorted({w for t in train for w in re.findall(r'\b[A-Za-z][a-z]{2,9}\b', t)})
    rng = np.random.default_rng([seed, 1])
    F = []
    short = python_pieces(tok, train, piece_tokens)
    write_jsonl_atomic(os.path.join(src_dir, 'python_short.jsonl'), short)
    n = int(round(passkey_share / (1 - passkey_share - copy_share) * len(short)))
    n_copy = int(round(copy_share / (1 - passkey_share - copy_share) * len(short)))
    L = train_len + 1
    docs = [exact_passkey_doc(tok, L, rng, F) for _ in tqdm(range(n), desc='passkey', leave=False)]
    docs += [word_drill(words, L, rng) for _ in range(n_copy)]
    write_jsonl_atomic(os.path.join(src_dir, 'passkey_short.jsonl'), docs)
    total = n + n_copy + len(short)
    print(f'passkey_short: {n} passkey documents of {L} tokens + {n_copy} copy drills next to '
          f'{len(short)} python documents ({100 * n / total:.0f}% + {100 * n_copy / total:.0f}% of '
          f'what pretraining draws)')
    lengths = passkey_eval_lengths(tok, np.random.default_rng([seed, 2]))
    with open(os.path.join(src_dir, 'passkey_lengths.txt'), 'w') as f:
        f.write(','.join(map(str, lengths)) + '\n')
    print(f'passkey eval lengths: {lengths} (written to {src_dir}/passkey_lengths.txt)')


def stage_rehearsal():
    """src/passkey_ext.jsonl: the first of pretraining's L_c-token passkey prompts, as many as make
    them `ext_passkey` of the extension data beside the stdlib pieces (mini.sh EXT_PASSKEY): the
    skill is rehearsed at L_c only, so retrieval past L_c still has to come from the positions."""
    if not 0 < ext_passkey < 1:
        raise UserError(f"ext_passkey={ext_passkey!r}: expected a share in (0, 1)")
    short = read_jsonl(os.path.join(src_dir, 'python_short.jsonl'))
    path = os.path.join(src_dir, 'passkey_short.jsonl')
    n = round(ext_passkey / (1 - ext_passkey) * len(short))
    # stage passkey writes its passkey prompts first, then the copy drills
    docs = read_jsonl(path)[:n]
    if len(docs) < n or not all('pass key' in d for d in docs):
        raise UserError(f"{path}: fewer than {n} passkey prompts lead it, which "
                        f"ext_passkey={ext_passkey} needs next to {len(short)} stdlib pieces")
    write_jsonl_atomic(os.path.join(src_dir, 'passkey_ext.jsonl'), docs)
    print(f'passkey_ext: {n} passkey documents next to {len(short)} python documents '
          f'({100 * n / (n + len(short)):.1f}% of what the extension runs draw)')


def passkey_eval_lengths(tok, rng):
    """eval_passkey.py builds a prompt within 1% of the requested length, in whole filler words:
    some short lengths cannot be hit. For each multiple of L_c up to L_t (or each power-of-2
    multiple when L_t > 4 L_c), take the largest length at or below it that works for 30 random keys
    and depths."""
    from eval_passkey import build_passkey_prompt
    ratio = target_len // train_len
    mults = range(1, ratio + 1) if ratio <= 4 else \
        [2 ** i for i in range(ratio.bit_length()) if 2 ** i <= ratio]
    out = []
    for L in [m * train_len for m in mults]:
        for cand in range(L, L - 12, -1):
            try:
                for _ in range(30):
                    key = str(int(rng.integers(10000, 100000)))
                    build_passkey_prompt(tok, cand, key, float(rng.random()))
                out.append(cand)
                break
            except UserError:  # this length cannot be built: try the next
                continue
        else:
            raise UserError(f"no passkey prompt length in [{L - 11}, {L}] that eval_passkey.py "
                            f"can build (train_len={train_len}, target_len={target_len})")
    return out


def stage_base():
    """Check a pretrained Original and give it its own dir, out_dir/base-<sha256[:12]>/, with
    base.json (its path, the sha256 of its model.safetensors, its pretraining seed); prints that
    dir (mini.sh reads it). The weights must match base_sha256, or else a model.safetensors.sha256
    beside them (as `sha256sum model.safetensors` writes it): a committed base carries one."""
    weights = os.path.join(base, 'model.safetensors')
    if not (os.path.isfile(os.path.join(base, 'config.json')) and os.path.isfile(weights)):
        raise UserError(f"base='{base}': not a model dir (no config.json and model.safetensors)")
    sha, expected, where = sha256_file(weights), base_sha256, 'base_sha256'
    if not expected and os.path.isfile(weights + '.sha256'):
        with open(weights + '.sha256') as f:
            expected, where = (f.read().split() or [''])[0], weights + '.sha256'
    if expected and expected.lower() != sha:
        raise UserError(f"base='{base}': model.safetensors has sha256 {sha}, but {where} "
                        f"expects {expected}")
    d = os.path.join(out_dir, f'base-{sha[:12]}')
    path = os.path.join(d, 'base.json')
    old = read_json(path) if os.path.isfile(path) else {}  # the same weights: keep a known seed
    known = pretrain_seed if pretrain_seed >= 0 else old.get('pretrain_seed')
    write_json_atomic(path, {'model': os.path.abspath(base), 'sha256': sha, 'pretrain_seed': known})
    print(d)


def read_probe(d):
    """(base.json, probe) of one base dir: the probe's passed / count / 95% Wilson interval at its
    one length (L_c) and its eval_passkey seed; probe = None without probe-passkey.json."""
    if not os.path.isfile(os.path.join(d, 'base.json')):
        raise UserError(f"{d}: no base.json (not a base dir from --stage=base)")
    info = read_json(os.path.join(d, 'base.json'))
    path = os.path.join(d, 'probe-passkey.json')
    if not os.path.isfile(path):
        return info, None
    r = read_json(path)
    L = min(r['count'], key=int)
    k, n = r['passed'][L], r['count'][L]
    return info, {'length': int(L), 'passed': k, 'count': n, 'accuracy': k / n,
                  'wilson95': list(wilson(k, n)), 'seed': r['settings']['seed']}


def probe_text(p):
    lo, hi = p['wilson95']
    return f"{p['passed']}/{p['count']} = {p['accuracy']:.2f} [95% Wilson {lo:.2f}-{hi:.2f}]"


def stage_select():
    """Each candidate base's passkey at L_c on the probe keys, with its 95% Wilson interval; the
    base is the first whose accuracy is >= min_probe (none: the most accurate, said so). Writes
    selection.json into the chosen dir; the last line printed is 'selected: DIR' (for mini.sh)."""
    cands = []
    for d in base_dirs.split():
        info, p = read_probe(d)
        if p is None:
            raise UserError(f"base_dirs: {d} has no probe-passkey.json (mini.sh's probe of a base)")
        if p['seed'] == eval_seed:
            raise UserError(f"{d}/probe-passkey.json: eval_passkey seed {p['seed']} is the "
                            f"evaluation's (eval_seed): a probe must use other keys")
        cands.append({'dir': d, **info, 'probe': p})
    if not cands:
        raise UserError("base_dirs is empty: give the candidates' dirs (stage base)")
    print(f'base models: passkey at L_c on probe keys (the evaluation uses eval_passkey seed '
          f'{eval_seed}); the first >= {min_probe} is the base:')
    for c in cands:
        ps = c['pretrain_seed']
        print(f"  {c['dir']}: pretraining seed {ps if ps is not None else '?'}, probe seed "
              f"{c['probe']['seed']}: {probe_text(c['probe'])}")
    ok = [c for c in cands if c['probe']['accuracy'] >= min_probe]
    chosen = ok[0] if ok else max(cands, key=lambda c: c['probe']['accuracy'])  # the first of ties
    if not ok:
        print(f"warning: no base reaches {min_probe} at L_c: extending the most accurate one; the "
              f"extension claims presuppose a base that retrieves inside its window")
    write_json_atomic(os.path.join(chosen['dir'], 'selection.json'),
                      {'candidates': cands, 'min_probe': min_probe, 'chosen': chosen['dir'],
                       'retrieves': bool(ok)})
    print(f"selected: {chosen['dir']}")


def read_evals(run_dir, ms, logs):
    """{method: {'ppl': {L: ppl}, 'passkey': {L: acc}, 'trials': {L: [trial]}, 'nll': {L: the key's
    mean negative log-likelihood}, 'eval_seed': seed, 'step_ms': {0: ms}} from one dir's eval JSONs
    and the train logs `logs` ({method: log.jsonl}); a missing file leaves its entries out."""
    out = {}
    for m in ms:
        row = out[m] = {}
        p = os.path.join(run_dir, f'ppl-{m}.json')
        if os.path.isfile(p):
            row['ppl'] = {int(L): v for L, v in read_json(p)['ppl'].items()}
        p = os.path.join(run_dir, f'passkey-{m}.json')
        if os.path.isfile(p):
            r = read_json(p)
            row['passkey'] = {int(L): v for L, v in r['accuracy'].items()}
            row['trials'] = {L: [t for t in r['trials'] if int(t['length']) == L]
                             for L in row['passkey']}
            row['nll'] = {L: -float(np.mean([t['key_logprob'] for t in ts]))
                           for L, ts in row['trials'].items()
                           if ts and all(t.get('key_logprob') is not None for t in ts)}
            row['eval_seed'] = r.get('settings', {}).get('seed')
        log = logs.get(m)
        if log and os.path.isfile(log):  # training cost from train.py's log: mean step time
            recs = [json.loads(line) for line in open(log) if '"dt_ms"' in line]
            recs = recs[1:] or recs  # the first step includes warm-up
            if recs:
                row['step_ms'] = {0: float(np.mean([r['dt_ms'] for r in recs]))}
    return out


def read_runs(seed_list, labels, base_info):
    """{seed: {method: read_evals row}}: the base's rows (BASE_METHODS, out_dir/) are the same in
    every seed; the extension methods' come from out_dir/seed-S/."""
    model = (base_info or {}).get('model')
    logs = {'original': os.path.join(os.path.dirname(model), 'log.jsonl')} if model else {}
    shared = read_evals(out_dir, [m for m in labels if m in BASE_METHODS], logs)
    own = [m for m in labels if m not in BASE_METHODS]
    runs = {}
    for s in seed_list:
        d = os.path.join(out_dir, f'seed-{s}')
        logs = {m: os.path.join(d, m, 'log.jsonl') for m in own}
        runs[s] = {**shared, **read_evals(d, own, logs)}
    return runs


def seed_rows(runs, m):
    """The runs holding method m's own results: the first alone for a base method (all the same)."""
    return list(runs.values())[:1] if m in BASE_METHODS else list(runs.values())


def pooled_trials(runs, m, L):
    """Method m's passkey trials at length L over the extension seeds, in seed order."""
    return [t for r in seed_rows(runs, m) for t in r.get(m, {}).get('trials', {}).get(L, [])]


def paired_tests(runs, a='pose', b='contig'):
    """{seed: {L: compare_paired}} of a vs b at each passkey length past L_c that both have, and
    'pooled': every seed's pairs together, at the lengths every seed has. Both must hold the same
    trials (the same keys, depths and lengths), every one paired."""
    def paired(ta, tb):
        t = compare_paired(ta, tb)
        if not t['n'] == len(ta) == len(tb):
            raise UserError(f'{LABELS[a]} and {LABELS[b]} were not evaluated on the same passkey '
                            f'trials (another eval_passkey seed or num_trials?): no paired test')
        return t
    out = {}
    for s, r in runs.items():
        ta, tb = r.get(a, {}).get('trials', {}), r.get(b, {}).get('trials', {})
        out[s] = {L: paired(ta[L], tb[L]) for L in sorted(ta) if L > train_len and L in tb}
    common = sorted(set.intersection(*(set(t) for t in out.values()))) if out else []
    out['pooled'] = {L: paired(pooled_trials(runs, a, L), pooled_trials(runs, b, L))
                     for L in common}
    return out


def pose_above(t):
    """PoSE above Contiguous on one length's paired trials: more passes with McNemar p < ALPHA, or a
    higher mean key log-likelihood with Wilcoxon p < ALPHA (either test counts)."""
    n_a, n_b = t['discordant']
    return bool((n_a > n_b and t['mcnemar_p'] < ALPHA)
                or (t.get('mean_dlogp', 0.0) > 0 and t.get('wilcoxon_p', 1.0) < ALPHA))


def above(tests):
    """PoSE above Contiguous at every tested length; None when nothing was tested."""
    return all(pose_above(t) for t in tests.values()) if tests else None


def claims(run, tests):
    """The demo's claims (PoSE vs Contiguous, then the paper's in the miniature), each True /
    False / None (not measured), for one extension seed; tests: its paired tests of PoSE vs
    Contiguous ({L: test})."""
    Lc, Lt = train_len, target_len

    def get(m, kind, L):
        v = run.get(m, {}).get(kind, {})
        near = [k for k in v if 0.95 * L < k <= L]  # passkey lengths sit a few tokens below L
        return v[max(near)] if near else None

    def test(*xs, f):
        return None if any(x is None for x in xs) else bool(f(*xs))

    def upto(m, L):  # m's passkey accuracies at every length <= L, when L itself was measured
        v = run.get(m, {}).get('passkey', {})
        return [a for k, a in v.items() if k <= L] if get(m, 'passkey', L) is not None else None

    def good(m, L):
        return test(upto(m, L), f=lambda a: min(a) >= 0.9)
    pk, ppl = (lambda m, L: get(m, 'passkey', L)), (lambda m, L: get(m, 'ppl', L))  # noqa: E731
    return [
        ('Base (Original) passkey >= 0.9 at L_c', test(pk('original', Lc), f=lambda a: a >= 0.9)),
        ('PoSE passkey >= 0.9 at every length up to 3 L_c', good('pose', 3 * Lc)),
        (f'PoSE above Contiguous at each length past L_c (p < {ALPHA})', above(tests)),
        ('PoSE passkey >= 0.9 at every length up to L_t', good('pose', Lt)),
        ('Full-length passkey >= 0.9 at every length', good('full', Lt)),
        ('Original passkey <= 0.2 at L_t', test(pk('original', Lt), f=lambda a: a <= 0.2)),
        ('YaRN-only (no training) passkey <= 0.2 at L_t', test(pk('pi', Lt), f=lambda a: a <= 0.2)),
        ('RandPos passkey at L_t <= PoSE - 0.3', test(pk('randpos', Lt), pk('pose', Lt),
                                                     f=lambda r, p: r <= p - 0.3)),
        ('Original ppl rises past L_c (L_t > L_c)', test(ppl('original', Lt), ppl('original', Lc),
                                                        f=lambda a, b: a > b)),
        ('Contiguous ppl at L_t above PoSE', test(ppl('contig', Lt), ppl('pose', Lt),
                                                 f=lambda c, p: c > p)),
        ('PoSE ppl at L_t within 5% of Full-length', test(ppl('pose', Lt), ppl('full', Lt),
                                                          f=lambda p, q: p <= 1.05 * q)),
        ('RandPos ppl at L_t above PoSE', test(ppl('randpos', Lt), ppl('pose', Lt),
                                              f=lambda r, p: r > p)),
        ('PoSE ppl at L_c within 10% of Original', test(ppl('pose', Lc), ppl('original', Lc),
                                                        f=lambda p, o: p <= 1.10 * o)),
    ]


def cell(vs, fmt, several):
    """One table cell: the mean of a method's values over the seeds, then (min-max) when several
    seeds are reported; '-' when none was measured."""
    if not vs:
        return '-'
    return f'{np.mean(vs):{fmt}}' + (f' ({min(vs):{fmt}}-{max(vs):{fmt}})' if several else '')


def passkey_cell(trials):
    """'passed/trials [lo-hi]' with the 95% Wilson interval; '-' for no trials."""
    if not trials:
        return '-'
    k, n = sum(bool(t['pass']) for t in trials), len(trials)
    lo, hi = wilson(k, n)
    return f'{k}/{n} [{lo:.2f}-{hi:.2f}]'


def verdict(marks):
    """A claim's verdict from its per-seed marks ('+' holds, '-' fails, '?' not measured)."""
    if set(marks) == {'+'}:
        return 'holds for every seed'
    return 'fails for some seed' if '-' in marks else 'unmeasured'


def mark(v):
    return '?' if v is None else '+' if v else '-'


def lengths_of(runs, labels, kind):
    return sorted({L for r in runs.values() for m in labels for L in r.get(m, {}).get(kind, {})})


def mean_section(runs, labels, title, kind, fmt):
    """A table of kind's values: each cell the mean over the seeds, and min-max when there are
    several (a base method's one value alone)."""
    Ls = lengths_of(runs, labels, kind)
    if not Ls:
        return []
    rows = {}
    for m in labels:
        rs = seed_rows(runs, m)
        rows[m] = [cell([r[m][kind][L] for r in rs if L in r.get(m, {}).get(kind, {})], fmt,
                        len(rs) > 1) for L in Ls]
    w = max(len(LABELS.get(m, m)) for m in labels) + 2
    cw = max(9, max(len(c) for cells in rows.values() for c in cells) + 2)
    head = ''.join(f'{L:>{cw}}' for L in Ls) if kind != 'step_ms' else f"{'ms':>{cw}}"
    lines = [title, f"{'method':<{w}}" + head]
    lines += [f'{LABELS.get(m, m):<{w}}' + ''.join(f'{c:>{cw}}' for c in cells)
              for m, cells in rows.items()]
    return lines + ['']


def passkey_section(runs, labels):
    """Passed/trials with the 95% Wilson interval per method and length, pooled over the extension
    seeds; with several seeds, then each seed's own."""
    Ls = lengths_of(runs, labels, 'trials')
    if not Ls:
        return []
    w, cw = max(len(LABELS.get(m, m)) for m in labels) + 6, 20
    pooled = ', pooled over the extension seeds' if len(runs) > 1 else ''
    lines = [f'Passkey retrieval (eval_passkey.py), passed/trials [95% Wilson]{pooled}:',
             f"{'method':<{w}}" + ''.join(f'{L:>{cw}}' for L in Ls)]
    for m in labels:
        cells = [passkey_cell(pooled_trials(runs, m, L)) for L in Ls]
        lines.append(f'{LABELS.get(m, m):<{w}}' + ''.join(f'{c:>{cw}}' for c in cells))
    if len(runs) > 1:
        lines += ['', 'Passkey per extension seed, passed/trials [95% Wilson]:']
        for m in [m for m in labels if m not in BASE_METHODS]:
            for s, r in runs.items():
                cells = [passkey_cell(r.get(m, {}).get('trials', {}).get(L)) for L in Ls]
                name = f'{LABELS.get(m, m)} s{s}'
                lines.append(f'{name:<{w}}' + ''.join(f'{c:>{cw}}' for c in cells))
    return lines + ['']


def paired_lines(tests, seed_list):
    """The paired tests of PoSE vs Contiguous per seed and length past L_c, then pooled."""
    keys = seed_list + (['pooled'] if len(seed_list) > 1 else [])
    rows = [(s, L, t) for s in keys for L, t in tests.get(s, {}).items()]
    if not rows:
        return []
    lines = ['PoSE vs Contiguous on the same trials past L_c: exact McNemar on the verdicts',
             '(passes, then the discordant pairs), Wilcoxon signed-rank on the key log-likelihoods',
             '(d = PoSE - Contiguous, nats):', paired_header('seed', 8, 'Contig', 'C only')]
    return lines + [paired_row(s, L, t, 8) for s, L, t in rows] + ['']


def paired_header(name, width, other, other_only):
    """The column heads of paired_row's rows."""
    return (f"{name:<{width}}{'L':>5}{'PoSE':>9}{other:>9}{'P only':>8}{other_only:>8}"
            f"{'McNemar p':>11}{'mean d':>9}{'Wilcoxon p':>12}{'n':>5}")


def paired_row(name, L, t, width):
    """One paired test's row: name, L, both arms' passes, the discordant pairs, McNemar p, then
    the mean key log-likelihood difference, Wilcoxon p and its n (- without log-likelihoods)."""
    (pa, pb), (da, db), n = t['passed'], t['discordant'], t['n']
    wil = f"{'-':>9}{'-':>12}{'-':>5}"
    if 'wilcoxon_p' in t:
        wil = f"{t['mean_dlogp']:>+9.2f}{t['wilcoxon_p']:>12.2g}{t['wilcoxon_n']:>5}"
    return (f"{name:<{width}}{L:>5}{f'{pa}/{n}':>9}{f'{pb}/{n}':>9}{da:>8}{db:>8}"
            f"{t['mcnemar_p']:>11.2g}" + wil)


def versus_tests(runs, others=('full', 'randpos')):
    """{method: {L: compare_paired}}: PoSE vs each other fine-tune that every seed has, pooled
    over the seeds, at each length past L_c."""
    return {b: paired_tests(runs, 'pose', b)['pooled'] for b in others
            if all('pose' in r and b in r for r in runs.values())}


def versus_lines(vs, several):
    """The paired tests of PoSE vs Full-length and RandPos (versus_tests), pooled over the seeds
    when there are several."""
    rows = [(LABELS[b], L, t) for b, tests in vs.items() for L, t in tests.items()]
    if not rows:
        return []
    return ['PoSE vs the other fine-tunes on the same trials past L_c'
            + (', pooled over the seeds' if several else '') + ' (columns as above;',
            'd = PoSE - other):', paired_header('other', 12, 'other', 'O only')] \
        + [paired_row(name, L, t, 12) for name, L, t in rows] + ['']


def header_lines(runs, meta):
    """The title, the base (path, sha256, pretraining seed, probe, selection), the eval seed."""
    seed_list, meta = list(runs), meta or {}
    several = len(seed_list) > 1
    lines = [f'nanoPoSE demo, L_c = {train_len} -> L_t = {target_len}, one base model, extension '
             + ('seeds ' if several else 'seed ') + ' '.join(map(str, seed_list))]
    if meta.get('base'):
        b = meta['base']
        ps = b['pretrain_seed'] if b.get('pretrain_seed') is not None else 'not known'
        lines += [f"Base (the Original): {b['model']}, pretraining seed {ps}",
                  f"  model.safetensors sha256 {b['sha256']}"]
    if meta.get('probe'):
        p = meta['probe']
        lines.append(f"  its passkey at L = {p['length']} on probe keys (eval_passkey seed "
                     f"{p['seed']}): " + probe_text(p))
    sel = meta.get('selection')
    if sel and len(sel['candidates']) > 1:
        how = f"the first with a probe >= {sel['min_probe']}" if sel['retrieves'] else \
            f"none reached {sel['min_probe']}: the most accurate"
        lines.append(f"  chosen of {len(sel['candidates'])} candidates, {how}:")
        seed_of = lambda c: '?' if c['pretrain_seed'] is None else c['pretrain_seed']  # noqa: E731
        lines += [f"    {c['dir']} (pretraining seed {seed_of(c)}): " + probe_text(c['probe'])
                  for c in sel['candidates']]
    eseeds = sorted({r[m]['eval_seed'] for r in runs.values() for m in r
                     if r[m].get('eval_seed') is not None})
    if eseeds:
        lines.append(f"Evaluation: eval_passkey seed {', '.join(map(str, eseeds))} for every "
                     f"method and seed (the same keys and depths: paired trials)")
    return lines + ['']


def report_lines(runs, labels, meta=None):
    """{seed: {method: row}} -> (the report's lines, {seed: claims}, paired tests of PoSE vs
    Contiguous, pooled ones vs the other fine-tunes): the tables, the paired tests, then the claims
    per extension seed and pooled over them."""
    seed_list = list(runs)
    tests, vs = paired_tests(runs), versus_tests(runs)
    over = ', mean (min-max) over the extension seeds' if len(runs) > 1 else ''
    lines = header_lines(runs, meta)
    title = f'Perplexity on held-out stdlib files (eval_ppl.py), window length L{over}:'
    lines += mean_section(runs, labels, title, 'ppl', '.2f')
    lines += passkey_section(runs, labels)
    title = (f"Passkey: the key's teacher-forced negative log-likelihood (nats, mean over the "
             f"trials; lower is better){over}:")
    lines += mean_section(runs, labels, title, 'nll', '.2f')
    lines += paired_lines(tests, seed_list)
    lines += versus_lines(vs, len(runs) > 1)
    title = 'Training step time (train.py log, mean over the steps after the first):'
    lines += mean_section(runs, labels, title, 'step_ms', '.0f')
    per_seed = {s: claims(r, tests.get(s, {})) for s, r in runs.items()}
    lines += ['Claims (per extension seed: + holds, - fails, ? not measured):']
    claim = claim_lines(per_seed, seed_list)
    if len(seed_list) > 1:  # the pooled PoSE-above-Contiguous test, under its per-seed line
        v = above(tests['pooled'])
        nw = max(len(c) for c, _ in per_seed[seed_list[0]])
        name = '... the same, pooled over the seeds'
        at = 1 + next(i for i, (c, _) in enumerate(per_seed[seed_list[0]])
                      if c.startswith('PoSE above Contiguous'))
        claim.insert(at, f"  {mark(v):<{max(len(seed_list), 5)}} {name:<{nw}}  "
                     + ('unmeasured' if v is None else 'holds' if v else 'fails'))
    return lines + claim, per_seed, tests, vs


def claim_lines(per_seed, seed_list):
    """One line per claim: its marks over seed_list (+ holds, - fails, ? not measured), verdict."""
    lines, nw = [], max(len(name) for name, _ in per_seed[seed_list[0]])
    for i, (name, _) in enumerate(per_seed[seed_list[0]]):
        marks = ''.join(mark(per_seed[s][i][1]) for s in seed_list)
        lines.append(f'  {marks:<{max(len(seed_list), 5)}} {name:<{nw}}  {verdict(marks)}')
    return lines


def results_json(runs, labels, meta, per_seed, tests, vs):
    """What results.json holds: the base, each seed's cells (passkey with counts and Wilson
    intervals), the pooled counts, the paired tests and the claims."""
    def row(r):
        out = {k: {str(L): v for L, v in r[k].items()}
               for k in ('ppl', 'passkey', 'nll', 'step_ms') if k in r}
        for L, ts in r.get('trials', {}).items():
            k, n = sum(bool(t['pass']) for t in ts), len(ts)
            out.setdefault('passed', {})[str(L)], out.setdefault('count', {})[str(L)] = k, n
            out.setdefault('wilson95', {})[str(L)] = list(wilson(k, n))
        return out
    pooled = {m: row({'trials': {L: pooled_trials(runs, m, L)
                                 for L in lengths_of(runs, [m], 'trials')}}) for m in labels}
    return {**(meta or {}), 'seeds': list(runs),
            'runs': {str(s): {m: row(r[m]) for m in labels if m in r} for s, r in runs.items()},
            'pooled': pooled,
            'paired_pose_vs_contig': {str(s): {str(L): t for L, t in d.items()}
                                      for s, d in tests.items()},
            'paired_pose_vs_pooled': {b: {str(L): t for L, t in d.items()}
                                      for b, d in vs.items()},
            'claims': {str(s): c for s, c in per_seed.items()},
            'claim_pooled_pose_above_contig': above(tests['pooled'])}


def stage_report():
    """The table of report_lines, printed and written (results.txt, results.json), then the plot."""
    seed_list = [int(s) for s in str(seeds).split()]
    labels = [m.strip() for m in methods.split(',') if m.strip()]
    meta = {}
    if os.path.isfile(os.path.join(out_dir, 'base.json')):
        meta['base'], meta['probe'] = read_probe(out_dir)
    if os.path.isfile(os.path.join(out_dir, 'selection.json')):
        meta['selection'] = read_json(os.path.join(out_dir, 'selection.json'))
    if not os.path.isdir(out_dir):
        raise UserError(f"out_dir={out_dir!r} is not a directory")
    runs = read_runs(seed_list, labels, meta.get('base'))
    if not any(rows for r in runs.values() for rows in r.values()):
        raise UserError(f"out_dir={out_dir!r} holds no eval results of {labels} for seeds "
                        f"{seed_list} (passkey-*.json / ppl-*.json, here or in seed-S/)")
    lines, per_seed, tests, vs = report_lines(runs, labels, meta)
    table = '\n'.join(lines)
    print(table)
    write_text_atomic(os.path.join(out_dir, 'results.txt'), table + '\n')
    write_json_atomic(os.path.join(out_dir, 'results.json'),
                      results_json(runs, labels, meta, per_seed, tests, vs))
    plot(runs, labels)


def plot(runs, labels):
    """ppl (mean over the seeds, min-max band) and passkey (pooled, 95% Wilson bars) vs length."""
    path = os.path.join(out_dir, 'demo.png')
    plt = pyplot(f'the plot {path}', required=False)  # the tables are written already
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(labels):
        rs = seed_rows(runs, m)
        Ls = sorted({L for r in rs for L in r.get(m, {}).get('ppl', {})})
        if Ls:
            vals = [[r[m]['ppl'][L] for r in rs if L in r.get(m, {}).get('ppl', {})] for L in Ls]
            line, = axes[0].plot(Ls, [np.mean(v) for v in vals], 'o-', label=LABELS.get(m, m))
            if len(rs) > 1:
                axes[0].fill_between(Ls, [min(v) for v in vals], [max(v) for v in vals],
                                     color=line.get_color(), alpha=0.15)
        Ls = lengths_of(runs, [m], 'trials')
        if Ls:
            ts = [pooled_trials(runs, m, L) for L in Ls]
            kn = [(sum(bool(t['pass']) for t in x), len(x)) for x in ts]
            acc, ci = [k / n for k, n in kn], [wilson(k, n) for k, n in kn]
            err = [[a - lo for a, (lo, _) in zip(acc, ci)], [hi - a for a, (_, hi) in zip(acc, ci)]]
            dodge = 2 ** (0.03 * (i - (len(labels) - 1) / 2))  # side by side: the bars stay apart
            axes[1].errorbar([L * dodge for L in Ls], acc, yerr=err, fmt='o-', capsize=3,
                             label=LABELS.get(m, m))
    axes[0].set_yscale('log')
    axes[0].set_ylabel('perplexity (Table 1)')
    axes[1].set_ylabel('passkey accuracy, 95% Wilson (Fig. 2b)')
    axes[1].set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.set_xscale('log', base=2)
        ax.set_xlabel('length (tokens)')
        ax.axvline(train_len, color='gray', ls=':', lw=1)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f'nanoPoSE demo: L_c = {train_len} -> L_t = {target_len}, one base, extension '
                 f'seed{"s" if len(runs) > 1 else ""} {" ".join(map(str, runs))}')
    fig.tight_layout()
    save_figure(fig, path)
    print(f'wrote {path}')


def main():
    stages = {'sources': stage_sources, 'passkey': stage_passkey, 'rehearsal': stage_rehearsal,
              'base': stage_base, 'select': stage_select, 'report': stage_report}
    if stage not in stages:
        raise UserError(f"stage='{stage}': expected one of {', '.join(stages)}")
    stages[stage]()


if __name__ == '__main__':
    run(main)
