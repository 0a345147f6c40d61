"""
Passkey retrieval over prompt lengths (x depths) (PoSE paper §4.3, Fig. 2; Mohtashami & Jaggi 2023).

    python eval_passkey.py --model=out/pose-16k --lengths="[2048,4096,8192,16384]" --num_trials=50
    python eval_passkey.py --model=ckpt/llama-7b --rope_scaling="{'rope_type':'linear','factor':8.0}"  # PI-only
    python eval_passkey.py --model=out/pose-16k --depths="[0.0,0.25,0.5,0.75,1.0]" --plot=passkey.png

The prompt (paper Fig. 2a), its five parts joined by newlines:
    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will
    quiz you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...  (filler)
    The pass key is 71432. Remember it. 71432 is the pass key.
    The grass is green. The sky is blue. ...                                                        (filler)
    What is the pass key? The pass key is
The filler is the five sentences repeated, counted in words (the first n words of the endless
repetition, so it may stop mid-sentence, as Mohtashami & Jaggi's character cut does) so that a prompt
hits a token length closely: for a requested length we binary-search the number of filler words n so
that BOS + prompt + " " + key is at most `length` tokens and within 1% of it. Depth d puts round(d * n)
filler words before the key line and the rest after it (both parts start with "The grass is green.");
the JSON records the realised depth (words before / n). Keys are random
5-digit numbers (the paper; its script drew 1..50000), depth uniform in [0, 1] per trial (the paper)
or a grid (`depths`).

Scoring = the official script's (dwzhu-pku/PoSE src/eval_passkey.py): greedy generation of up to 10 new
tokens after BOS + prompt, the output decoded, and the trial passes iff int(first `\\d+` of it) == key --
so "12345." and "is: 12345" and "\\n12345" pass for key 12345, "123456" and "1234" fail. We compute exactly
that with a guess: the prompt runs once into a KV cache (model.KVCache), then one forward over the key's
tokens after it, with lm_head only at the positions that predict the key and the token after it (which
shows whether the number ends). Greedy decoding sees the same prefixes as long as its argmax agrees with
those tokens, so the argmaxes up to the first disagreement are greedy's own output; at a disagreement
(e.g. a leading ":" or newline) we keep greedy's token and run another short forward with a new guess
over the cache. A trial stops as soon as its verdict is fixed, so most trials take one short forward
after the prompt, none more than max_new_tokens. The tests check this against plain
greedy decoding + the regex. `pred_ids` (the teacher-forced argmax on the key's tokens) is kept for
partial credit.
"""
import math
import os
import re
import time

import numpy as np
import torch

from errors import UserError, pyplot, run, save_figure, write_json_atomic
from eval_ppl import check_run, load_model, model_name, torch_dtype
from model import KVCache

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLER_WORDS = FILLER.split()  # the unit of filler: a word (~1.5 tokens), fine enough for 1% at ~1k tokens
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER_RE = re.compile(r'\d+')  # the official script's answer: the first number in the generated text

# -----------------------------------------------------------------------------
# statistics: every accuracy gets its 95% Wilson interval; two methods run on the same trials (the same
# keys, depths and lengths) are compared pairwise (demo reports import these)


def wilson(k, n, z=1.96):
    """95% Wilson score interval (lo, hi) of k successes in n trials; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, mid - half), min(1.0, mid + half)


def mcnemar_exact(a, b):
    """Two-sided exact McNemar p on paired verdicts a[i], b[i] (bools): a binomial test of the discordant
    pairs, B(n01 + n10, 1/2). 1.0 when no pair is discordant."""
    n01 = sum(1 for x, y in zip(a, b) if x and not y)
    n10 = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = n01 + n10, min(n01, n10)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def wilcoxon_signed_rank(x, y):
    """Two-sided Wilcoxon signed-rank p on paired values x[i] - y[i], exact: zero differences dropped
    (Wilcoxon's rule), tied |d| get mid-ranks, and the null distribution of the positive rank sum is
    counted over all 2^n sign patterns of those ranks (a dynamic programme over doubled ranks).
    Returns (p, n used)."""
    d = [float(u) - float(v) for u, v in zip(x, y) if float(u) != float(v)]
    n = len(d)
    if n == 0:
        return 1.0, 0
    order = sorted(range(n), key=lambda i: abs(d[i]))
    r2 = [0] * n  # doubled mid-ranks: integers even with ties
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for t in range(i, j + 1):
            r2[order[t]] = i + j + 2  # 2 * mean of ranks i+1 .. j+1
        i = j + 1
    t_obs = sum(r for r, v in zip(r2, d) if v > 0)
    counts = {0: 1}  # doubled positive rank sum -> number of sign patterns
    for r in r2:
        nxt = dict(counts)
        for s, c in counts.items():
            nxt[s + r] = nxt.get(s + r, 0) + c
        counts = nxt
    total = 2 ** n
    lo = sum(c for s, c in counts.items() if s <= t_obs) / total
    hi = sum(c for s, c in counts.items() if s >= t_obs) / total
    return min(1.0, 2 * min(lo, hi)), n


# -----------------------------------------------------------------------------
# this script's pieces (tests and demo_report.py import them; the shared ones live in eval_ppl.py)


def filler_text(n):
    """The first n words of the filler repeated forever."""
    return ' '.join(FILLER_WORDS[i % len(FILLER_WORDS)] for i in range(n))


def make_passkey_prompt(n_filler, key, depth):
    """(prompt text ending in 'The pass key is', n_before): round(depth * n_filler) filler words before the key."""
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"depth must be in [0, 1], got {depth}")
    n_before = int(round(depth * n_filler))
    lines = [TASK, filler_text(n_before), KEY_LINE.format(key=key), filler_text(n_filler - n_before), QUESTION]
    return '\n'.join(lines), n_before


def encode_trial(tok, n_filler, key, depth):
    """(ids of BOS + prompt + answer, n_prompt, n_before): ids[n_prompt:] are the answer (the key's tokens)."""
    text, n_before = make_passkey_prompt(n_filler, key, depth)
    prompt = tok.encode(text, bos=True, eos=False)
    full = tok.encode(text + ' ' + key, bos=True, eos=False)
    p = 0  # the answer starts where the two encodings part (a tokenizer may re-split the last prompt token)
    while p < min(len(prompt), len(full)) and prompt[p] == full[p]:
        p += 1
    if p == len(full):
        raise UserError(f"tokenizer lost the key {key!r}: prompt + key encodes to the prompt's tokens")
    return full, p, n_before


def build_passkey_prompt(tok, length, key, depth, hint=None):
    """Largest filler count n with len(BOS + prompt + answer) <= length; must be within 1% of length.
    Returns (ids, n_prompt, n_filler, n_before). `hint`: an n that was right for this length before."""
    def size(n):
        return len(encode_trial(tok, n, key, depth)[0])
    if size(0) > length:
        raise UserError(f"length {length} is shorter than the passkey prompt without filler ({size(0)} tokens)")
    if hint is not None and size(max(hint - 8, 0)) <= length:
        lo, hi = max(hint - 8, 0), hint + 8  # a different key changes the count by a few tokens only
    else:
        lo, hi = 0, 16
    while size(hi) <= length:  # grow the bracket: size(lo) <= length < size(hi)
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the token count grows with n
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= length else (lo, mid)
    ids, p, n_before = encode_trial(tok, lo, key, depth)
    if length - len(ids) > 0.01 * length:
        raise UserError(f"cannot build a passkey prompt within 1% of length {length}: "
                         f"got {len(ids)} tokens (one filler word is too coarse at this length)")
    return ids, p, lo, n_before


def answer_state(text, key, done):
    """The official script's verdict on a greedy output `text`: True/False, or None while more tokens could
    change it. Official: int(first `\\d+` of the output) == key (no number: fail). done: no more tokens come."""
    m = ANSWER_RE.search(text)
    if m is None:
        return False if done else None
    # the number has ended at the first non-digit after it; a trailing U+FFFD may be the first bytes of
    # a multi-byte character that completes to a (Unicode) digit, so it does not end the number yet
    if done or (m.end() < len(text) and text[m.end()] != '\ufffd'):
        return int(m.group()) == int(key)
    v = int(m.group())  # digits so far; int() ignores leading zeros, as the official comparison does
    return None if str(int(key)).startswith(str(v) if v else '') else False


def speculate(gen, guess, decode):
    """Tokens greedy decoding is expected to write after `gen`: the rest of the answer (the key's tokens).
    Only speed depends on this guess: every token kept is the model's own argmax."""
    if gen == guess[:len(gen)]:
        return guess[len(gen):]
    digits = [i for i, t in enumerate(guess) if any(c.isdigit() for c in decode([t]))]
    dg = guess[digits[0]:] if digits else []  # the key's tokens without the leading space piece
    for m in range(len(dg), -1, -1):  # gen ends with the key's first m tokens: the rest follows
        if m == 0 or gen[-m:] == dg[:m]:
            return dg[m:]


@torch.inference_mode()
def extend_cache(model, cache, cached, ids, device='cpu'):
    """Make `cache` hold `ids`: keep the longest prefix they share with `cached` (the ids it holds now) and
    run only the rest. Trials at one length and depth share the filler before the key, so each trial
    after the first pays for the tokens from its key on. Returns the ids the cache now holds."""
    n = min(len(cached), len(ids))
    diff = np.flatnonzero(np.asarray(cached[:n]) != np.asarray(ids[:n]))
    c = int(diff[0]) if len(diff) else n  # tokens shared with what the cache holds
    cache.truncate(c)
    if c < len(ids):
        model.forward_hidden(torch.tensor(ids[c:], dtype=torch.long, device=device)[None], cache=cache)
    return list(ids)


@torch.inference_mode()
def greedy_passkey(model, prompt, guess, key, decode, max_new_tokens=10, eos_id=None, device='cpu',
                   cache=None):
    """Greedy decoding after `prompt` (ids) judged like the official script (first number == key). The prompt
    runs once into a KV cache; each forward then runs the prompt's last token + the confirmed tokens + a guessed
    continuation (the key, then one more position that shows whether the number ends) and keeps the model's
    argmax up to the first miss, so one forward usually decides a trial and each one adds at least one
    generated token. Stops once the verdict is fixed, at EOS, or after max_new_tokens (what the official
    script's generate(max_new_tokens=10) sees). `cache`: a KVCache already holding prompt[:-1]
    (extend_cache); None = a new one. The first forward also gives the key's teacher-forced log-likelihood,
    log p(guess | prompt) in nats: a graded score of every trial, passed or failed.
    Returns (passed, generated ids, teacher-forced argmax at the guess's positions, key log-prob, forwards)."""
    P = len(prompt) - 1  # tokens kept in the cache: the prompt but its last, whose output is the first token
    if cache is None:
        cache = KVCache(model.args.n_layers)
        extend_cache(model, cache, [], prompt[:P], device)
    gen, tf_pred, key_lp, n_fwd = [], None, None, 0
    while True:
        spec = speculate(gen, guess, decode)
        ids = torch.tensor([prompt[P]] + gen + spec, dtype=torch.long, device=device)[None]
        h = model.forward_hidden(ids, cache=cache)[0, len(gen):]  # positions predicting gen's next tokens
        cache.truncate(P)  # the guess may be wrong: the next forward reruns everything after the prompt
        logits = model.lm_head(h).float()  # [len(spec) + 1, vocab]: no [T, vocab] logits
        pred = logits.argmax(-1).tolist()
        if n_fwd == 0:  # gen is empty, so spec is the whole guess and rows 0 .. len(guess)-1 predict it
            lp = logits[:len(guess)].log_softmax(-1)
            key_lp = float(lp.gather(1, torch.tensor(guess, device=lp.device)[:, None]).sum())
            tf_pred = pred[:len(guess)]
        n_fwd += 1
        for j, t in enumerate(pred):
            gen.append(t)
            state = answer_state(decode(gen), key, done=t == eos_id or len(gen) >= max_new_tokens)
            if state is not None:
                return state, gen, tf_pred, key_lp, n_fwd
            if j == len(spec) or t != spec[j]:  # the guess is wrong from here: its later argmaxes mean nothing
                break


def make_trials(lengths, num_trials, depths, seed):
    """[(length, depth, key)]: num_trials per length (x depth); random depth when depths is None (the paper).
    Trial i at a length (and grid depth j) draws from its own stream (seed, length, j, i): every method run
    with the same seed gets the same trials (paired), and a run with more trials extends one with fewer."""
    trials = []
    for L in lengths:
        for j, d in enumerate(depths if depths is not None else [None]):
            for i in range(num_trials):
                rng = np.random.default_rng([seed, L, j, i])
                key = str(int(rng.integers(10000, 100000)))  # 5 digits
                trials.append((L, float(rng.random()) if d is None else float(d), key))
    return trials


def accuracy_table(trials, lengths, depths):
    """{row label: {length: accuracy or None}}; rows: the depth grid (requested depths) or, for random
    depths, ten bins of the realised depth; then 'all'."""
    rows, key = {}, 'depth' if depths is None else 'depth_requested'
    for lo, hi, label in depth_bins_for(depths):
        rows[label] = {}
        for L in lengths:
            hits = [t['pass'] for t in trials if t['length'] == L and lo <= t[key] <= hi]
            rows[label][L] = sum(hits) / len(hits) if hits else None
    rows['all'] = {}
    for L in lengths:
        hits = [t['pass'] for t in trials if t['length'] == L]
        rows['all'][L] = sum(hits) / len(hits) if hits else None
    return rows


def depth_bins_for(depths):
    if depths is not None:  # a grid: one row per depth (the bins are the grid points)
        return [(d, d, f"{d:.2f}") for d in depths]
    return [(i / 10, (i + 1) / 10 - (1e-12 if i < 9 else 0), f"{i / 10:.1f}-{(i + 1) / 10:.1f}") for i in range(10)]


def accuracy_text(rows, lengths):
    """accuracy_table's rows as text: one line per depth row (then 'all'), lengths as columns."""
    w = max(len(r) for r in rows)
    lines = [f"{'depth':<{w}} " + ' '.join(f"{L:>7}" for L in lengths)]
    for label, accs in rows.items():
        lines.append(f"{label:<{w}} " + ' '.join(f"{'-':>7}" if accs[L] is None else f"{accs[L]:>7.2f}" for L in lengths))
    return '\n'.join(lines)


def plot_heatmap(rows, lengths, path, title=''):
    """Accuracy heatmap: depth rows x length columns, written atomically."""
    plt = pyplot(f"plot={path!r}")
    labels = [r for r in rows if r != 'all']
    grid = np.array([[np.nan if rows[r][L] is None else rows[r][L] for L in lengths] for r in labels])
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(lengths), 1.0 + 0.4 * len(labels)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap='RdYlGn', aspect='auto')
    for i in range(len(labels)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha='center', va='center', fontsize=7)
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel('prompt length (tokens)')
    ax.set_ylabel('depth of the key')
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label='accuracy')
    fig.tight_layout()
    save_figure(fig, path)


# -----------------------------------------------------------------------------
# config (python eval_passkey.py [config.py] [--key=value ...])
model = ''  # HF-format model dir (ours or a stock Llama/Mistral/Qwen2)
rope_scaling = None  # None = the checkpoint's own; a dict (HF semantics) overrides it, e.g. the paper's PI-only baseline
max_position_embeddings = None  # None = the checkpoint's own; else an override (also what the length warning checks)
tokenizer = None  # None = the model dir's tokenizer (tokenizer.model or tokenizer.json)
lengths = [2048, 4096, 8192, 16384, 32768]  # prompt lengths in tokens (BOS + prompt + key, within 1%)
num_trials = 50  # trials per length (x depth); the paper: 50
depths = None  # None = a random depth per trial (the paper); a list of fractions in [0, 1] = a length x depth grid
seed = 1337  # keys and depths
check_tokenizer = True  # refuse a tokenizer whose fingerprint differs from the model's own (False: skip)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # 'auto' = bfloat16 on CUDA, float32 on CPU; or 'float32' / 'bfloat16' / 'float16'
max_new_tokens = 10  # greedy tokens a trial may generate (the official script: 10); decided trials stop early
out = ''  # JSON results path ('' = out/passkey-<model>[-<rope override>].json)
overwrite = False  # replace an existing `out` (else: refuse before evaluating)
plot = ''  # heatmap PNG path ('' = none)
CONFIG_TYPES = {'rope_scaling': dict, 'max_position_embeddings': int, 'tokenizer': str,
                'depths': list}  # keys whose default is None


def main():
    from tqdm import tqdm  # after the config: a bad key fails before the heavy imports

    from tokenizer import check_same_tokenizer, load_tokenizer, sha256_file

    path = check_run('passkey', model, rope_scaling, out, overwrite, plot)
    if not lengths or any(not isinstance(L, int) or L < 1 for L in lengths):
        raise UserError(f"lengths must be a list of positive ints, got {lengths!r}")
    if depths is not None and (not depths or any(isinstance(d, bool) or not isinstance(d, (int, float))
                                                 or not 0 <= d <= 1 for d in depths)):
        raise UserError(f"depths={depths!r}: expected None (a random depth per trial) or a non-empty list "
                        f"of fractions in [0, 1]")
    if max_position_embeddings is not None and max_position_embeddings < 1:
        raise UserError(f"max_position_embeddings must be >= 1 (or None: the checkpoint's), "
                        f"got {max_position_embeddings}")
    if num_trials < 1:
        raise UserError(f"num_trials must be >= 1, got {num_trials}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    torch_dtype(dtype, device)  # a bad dtype fails here, before the work
    tok = load_tokenizer(tokenizer or model)
    if tokenizer and check_tokenizer:
        check_same_tokenizer(sha256_file(tok.path), f"tokenizer='{tokenizer}'", model, 'check_tokenizer')
    net = load_model(model, rope_scaling, max_position_embeddings, dtype, device, lengths)

    # 'dynamic' RoPE rescales with the sequence length, so its cached keys depend on the forward that made them
    reuse = (net.args.rope_scaling or {}).get('rope_type') != 'dynamic'
    cache, cached = KVCache(net.args.n_layers), []  # the prompt prefix shared with the previous trial
    trials, hints, t0 = [], {}, time.time()
    for L, depth, key in tqdm(make_trials(lengths, num_trials, depths, seed), desc='passkey'):
        ids, p, n_filler, n_before = build_passkey_prompt(tok, L, key, depth, hints.get(L))
        hints[L] = n_filler
        if max(ids) >= net.args.vocab_size:
            raise UserError(f"the tokenizer ({tok.path}) gives token id {max(ids)} >= the model's vocab_size "
                            f"{net.args.vocab_size}: not the model's tokenizer?")
        prompt = tok.encode(make_passkey_prompt(n_filler, key, depth)[0], bos=True)  # what generation sees
        guess = ids[len(prompt):] if ids[:len(prompt)] == prompt else ids[p:]
        if reuse:
            cached = extend_cache(net, cache, cached, prompt[:-1], device)
        ok, gen, tf_pred, key_lp, n_fwd = greedy_passkey(net, prompt, guess, key, tok.decode, max_new_tokens,
                                                         tok.eos_id, device, cache if reuse else None)
        trials.append({'length': L, 'tokens': len(ids), 'depth_requested': depth,
                       'depth': n_before / n_filler if n_filler else 0.0, 'n_filler': n_filler, 'key': key,
                       'answer_ids': list(ids[p:]), 'pred_ids': tf_pred[:len(ids) - p], 'output_ids': gen,
                       'output': tok.decode(gen), 'forwards': n_fwd, 'key_logprob': key_lp, 'pass': ok})
    dt = time.time() - t0

    rows = accuracy_table(trials, lengths, depths)
    result = {
        'model': os.path.abspath(model),
        'rope_scaling': rope_scaling if rope_scaling is not None else net.args.rope_scaling,
        'rope_scaling_override': rope_scaling is not None,
        'max_position_embeddings': net.args.max_position_embeddings,
        'tokenizer': tok.files,
        'settings': {'lengths': lengths, 'num_trials': num_trials, 'depths': depths, 'seed': seed,
                     'max_new_tokens': max_new_tokens, 'scoring': 'official: greedy, int(first \\d+) == key',
                     'dtype': dtype, 'torch_dtype': str(next(net.parameters()).dtype), 'device': device},
        'accuracy': {str(L): rows['all'][L] for L in lengths},
        'passed': {str(L): sum(t['pass'] for t in trials if t['length'] == L) for L in lengths},
        'count': {str(L): sum(t['length'] == L for t in trials) for L in lengths},
        'wilson95': {str(L): wilson(sum(t['pass'] for t in trials if t['length'] == L),
                                    sum(t['length'] == L for t in trials)) for L in lengths},
        'accuracy_by_depth': {r: {str(L): a for L, a in accs.items()} for r, accs in rows.items() if r != 'all'},
        'seconds': dt, 'trials': trials,
    }
    write_json_atomic(path, result)
    print(accuracy_text(rows, lengths))
    for L in lengths:
        lo, hi = result['wilson95'][str(L)]
        print(f"{L}: {result['passed'][str(L)]}/{result['count'][str(L)]} passed, 95% Wilson [{lo:.2f}, {hi:.2f}]")
    print('settings: ' + ', '.join(f"{k}={v}" for k, v in result['settings'].items()))
    print(f"wrote {path}")
    if plot:
        plot_heatmap(rows, lengths, plot, title=model_name(model))
        print(f"wrote {plot}")


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run(main)
