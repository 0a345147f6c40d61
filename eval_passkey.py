"""
Passkey retrieval over prompt lengths (x depths) (PoSE paper §4.3, Fig. 2; Mohtashami & Jaggi 2023).

    python eval_passkey.py --model=out/pose-16k --lengths="[2048,4096,8192,16384]" --num_trials=50
    python eval_passkey.py --model=out/pose-16k --depths="[0.0,0.25,0.5,0.75,1.0]" \
        --plot=passkey.png
    # PI-only: the base model with linear interpolation, no training
    python eval_passkey.py --model=ckpt/llama-7b \
        --rope_scaling="{'rope_type':'linear','factor':8.0}"

The prompt (paper Fig. 2a), its five parts joined by newlines:
    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I
    will quiz you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back ... (filler)
    The pass key is 71432. Remember it. 71432 is the pass key.
    The grass is green. The sky is blue. ...                                               (filler)
    What is the pass key? The pass key is
The filler is the five sentences repeated, counted in words (the first n words of the endless
repetition, so it may stop mid-sentence, as Mohtashami & Jaggi's character cut does) so that a
prompt hits a token length closely: for a requested length we binary-search the number of filler
words n so that BOS + prompt + " " + key is at most `length` tokens and within 1% of it. Depth d
puts round(d * n) filler words before the key line and the rest after it (both parts start with "The
grass is green."); the JSON records the realised depth (words before / n). Keys are random
5-digit numbers (the paper; its script drew 1..50000), depth uniform in [0, 1] per trial (the paper)
or a grid (`depths`).

Scoring = the official script's (dwzhu-pku/PoSE src/eval_passkey.py): greedy generation of up to 10
new tokens after BOS + prompt, the output decoded, and the trial passes iff int(first `\\d+` of it)
== key -- so "12345." and "is: 12345" and "\\n12345" pass for key 12345, "123456" and "1234" fail.
We compute exactly that with a guess: the prompt runs once into a KV cache (model.KVCache), then one
forward over the key's tokens after it, with lm_head only at the positions that predict the key and
the token after it (which shows whether the number ends). Greedy decoding sees the same prefixes as
long as its argmax agrees with those tokens, so the argmaxes up to the first disagreement are
greedy's own output; at a disagreement (e.g. a leading ":" or newline) we keep greedy's token and
run another short forward with a new guess over the cache. A trial stops as soon as its verdict is
fixed, so most trials take one short forward after the prompt, none more than max_new_tokens. The
tests check this against plain greedy decoding + the regex. `pred_ids` (the teacher-forced argmax on
the key's tokens) is kept for partial credit.

RULER-style needle tasks (`task`; Hsieh et al. 2024) on the same filler, lengths, depths and
verdict machinery; a needle is the line "One of the special magic numbers for <word> is: <value>."
(a 7-digit value; words from WORDS):
    multikey    num_needles needles with distinct words, one asked: "What is the special magic
                number for <word> mentioned in the provided text? The special magic number for
                <word> mentioned in the provided text is"; passes iff int(first number) == its value
    multivalue  num_values needles of one word, all asked ("What are all the special magic numbers
                for <word> ... are"); passes iff every value is among the output's numbers (in
                any order)
    multiquery  num_needles needles, the first num_queries asked at once ("... for <w1>, <w2> and
                <w3> ..."); passes iff every asked value is among the output's numbers
The first needle (the asked one; for multiquery the first asked) sits at the trial's depth, the
others at depths uniform in [0, 1] drawn from the trial's stream; the filler is split at
round(d * n) words for each needle (ties keep the needles' order). The expected answer is the asked
values joined by ", " after a space; it takes the key's place in the 1% length fit, the speculative
guess and `key_logprob` (its teacher-forced log-likelihood). The output budget is the answer's
tokens + 10 unless max_new_tokens is set.
"""
import json
import math
import os
import re
import time

import numpy as np
import torch

from errors import UserError, pyplot, run, save_figure, write_json_atomic
from eval_ppl import check_run, load_model, model_name, torch_dtype
from model import KVCache

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# the unit of filler: a word (~1.5 tokens), fine enough for 1% at ~1k tokens
FILLER_WORDS = FILLER.split()
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# the official script's answer: the first number in the generated text
ANSWER_RE = re.compile(r'\d+')
TASKS = ('passkey', 'multikey', 'multivalue', 'multiquery')
# the needle tasks' prompt (RULER's niah templates)
NEEDLE_TASK = ("Some special magic numbers are hidden within the following text. Make sure to "
               "memorize it. I will quiz you about the numbers afterwards.")
NEEDLE_LINE = "One of the special magic numbers for {word} is: {value}."
QUESTION_ONE = ("What is the special magic number for {words} mentioned in the provided text? "
                "The special magic number for {words} mentioned in the provided text is")
QUESTION_ALL = ("What are all the special magic numbers for {words} mentioned in the provided "
                "text? The special magic numbers for {words} mentioned in the provided text are")
# the needles' keys: distinct English words, none of them in the filler or the templates
WORDS = ('anchor', 'apple', 'badger', 'banjo', 'basket', 'beacon', 'cactus', 'camel', 'candle',
         'canyon', 'cobalt', 'comet', 'copper', 'dagger', 'falcon', 'fossil', 'garnet', 'glacier',
         'harbor', 'hazel', 'island', 'jasmine', 'kettle', 'lantern', 'lemon', 'magnet', 'maple',
         'marble', 'meadow', 'mirror', 'nectar', 'orchid', 'otter', 'pepper', 'pigeon', 'pillow',
         'quartz', 'rabbit', 'ribbon', 'saddle', 'salmon', 'spruce', 'tiger', 'timber', 'tulip',
         'velvet', 'walnut', 'willow')

# -----------------------------------------------------------------------------
# statistics: every accuracy gets its 95% Wilson interval; two methods run on the same trials (the
# same keys, depths and lengths) are compared pairwise (demo reports import these)


def wilson(k, n, z=1.96):
    """95% Wilson score interval (lo, hi) of k successes in n trials; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the ends at k = 0 and k = n are exactly 0 and 1 (in floats mid + half can fall 1e-16 short)
    return 0.0 if k == 0 else max(0.0, mid - half), 1.0 if k == n else min(1.0, mid + half)


def mcnemar_exact(a, b):
    """Two-sided exact McNemar p on paired verdicts a[i], b[i] (bools): a binomial test of the
    discordant pairs, B(n01 + n10, 1/2). 1.0 when no pair is discordant."""
    n01 = sum(1 for x, y in zip(a, b) if x and not y)
    n10 = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = n01 + n10, min(n01, n10)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def wilcoxon_signed_rank(x, y):
    """Two-sided Wilcoxon signed-rank p on paired values x[i] - y[i], exact: zero differences
    dropped (Wilcoxon's rule), tied |d| get mid-ranks, and the null distribution of the positive
    rank sum is counted over all 2^n sign patterns of those ranks (a dynamic programme over doubled
    ranks). Returns (p, n used)."""
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


def compare_paired(a, b):
    """Method a vs method b on the same passkey trials: each trial of a paired with b's trial of
    the same identity (length, requested depth, key; the i-th repeat of an identity with the i-th),
    the unpaired left out. {'n': pairs, 'passed': [a, b], 'discordant': [a only, b only],
    'mcnemar_p'} and, when every paired trial has its key log-likelihood, d = a - b per pair:
    'mean_dlogp', 'median_dlogp' and the Wilcoxon signed-rank 'wilcoxon_p' / 'wilcoxon_n'."""
    def identities(trials):
        seen = {}
        for t in trials:
            k = (t['length'], t.get('depth_requested'), t['key'])
            seen[k] = seen.get(k, 0) + 1
            yield k, seen[k]
    index = dict(zip(identities(b), b))
    pairs = [(x, index[k]) for k, x in zip(identities(a), a) if k in index]
    va, vb = [bool(x['pass']) for x, _ in pairs], [bool(y['pass']) for _, y in pairs]
    out = {'n': len(pairs), 'passed': [sum(va), sum(vb)],
           'discordant': [sum(x and not y for x, y in zip(va, vb)),
                          sum(y and not x for x, y in zip(va, vb))],
           'mcnemar_p': mcnemar_exact(va, vb)}
    if pairs and all(t.get('key_logprob') is not None for pair in pairs for t in pair):
        la, lb = [x['key_logprob'] for x, _ in pairs], [y['key_logprob'] for _, y in pairs]
        p, n = wilcoxon_signed_rank(la, lb)
        d = np.subtract(la, lb)
        out.update(mean_dlogp=float(np.mean(d)), median_dlogp=float(np.median(d)), wilcoxon_p=p,
                   wilcoxon_n=n)
    return out


# -----------------------------------------------------------------------------
# this script's pieces (tests and demo/mini_report.py import them; shared ones live in eval_ppl.py)


def filler_text(n):
    """The first n words of the filler repeated forever."""
    return ' '.join(FILLER_WORDS[i % len(FILLER_WORDS)] for i in range(n))


def make_passkey_prompt(n_filler, key, depth):
    """(prompt text ending in 'The pass key is', n_before): round(depth * n_filler) filler words
    before the key."""
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"depth must be in [0, 1], got {depth}")
    n_before = int(round(depth * n_filler))
    lines = [TASK, filler_text(n_before), KEY_LINE.format(key=key),
             filler_text(n_filler - n_before), QUESTION]
    return '\n'.join(lines), n_before


def encode_answer(tok, text, answer, what):
    """(ids of BOS + text + answer, n_prompt): ids[n_prompt:] are the answer's tokens."""
    prompt = tok.encode(text, bos=True, eos=False)
    full = tok.encode(text + answer, bos=True, eos=False)
    # the answer starts where the two encodings part (a tokenizer may re-split the last prompt
    # token)
    p = 0
    while p < min(len(prompt), len(full)) and prompt[p] == full[p]:
        p += 1
    if p == len(full):
        raise UserError(f"tokenizer lost the {what} {answer.strip()!r}: prompt + {what} encodes "
                        f"to the prompt's tokens")
    return full, p


def encode_trial(tok, n_filler, key, depth):
    """(ids of BOS + prompt + answer, n_prompt, n_before): ids[n_prompt:] are the answer (the key's
    tokens)."""
    text, n_before = make_passkey_prompt(n_filler, key, depth)
    return (*encode_answer(tok, text, ' ' + key, 'key'), n_before)


def fit_filler(size, length, hint, what):
    """Largest filler count n with size(n) <= length tokens; must be within 1% of length. size(n):
    the token count of BOS + prompt + answer with n filler words. `hint`: an n that was right for
    this length before."""
    if size(0) > length:
        raise UserError(f"length {length} is shorter than the {what} prompt without filler "
                        f"({size(0)} tokens)")
    if hint is not None and size(max(hint - 8, 0)) <= length:
        # a different key changes the count by a few tokens only
        lo, hi = max(hint - 8, 0), hint + 8
    else:
        lo, hi = 0, 16
    while size(hi) <= length:  # grow the bracket: size(lo) <= length < size(hi)
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the token count grows with n
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= length else (lo, mid)
    if length - size(lo) > 0.01 * length:
        raise UserError(f"cannot build a {what} prompt within 1% of length {length}: "
                        f"got {size(lo)} tokens (one filler word is too coarse at this length)")
    return lo


def build_passkey_prompt(tok, length, key, depth, hint=None):
    """Largest filler count n with len(BOS + prompt + answer) <= length; must be within 1% of
    length. Returns (ids, n_prompt, n_filler, n_before). `hint`: an n that was right for this length
    before."""
    n = fit_filler(lambda n: len(encode_trial(tok, n, key, depth)[0]), length, hint, 'passkey')
    ids, p, n_before = encode_trial(tok, n, key, depth)
    return ids, p, n, n_before


# -----------------------------------------------------------------------------
# the needle tasks (RULER-style): a trial is its needles [(word, value, depth)] and those asked


def needle_answer(needles, asked):
    """The expected answer text: the asked values joined by ', ', after a space."""
    return ' ' + ', '.join(needles[i][1] for i in asked)


def make_needle_prompt(task, n_filler, needles, asked):
    """(prompt text ending in the question, each needle's filler words before it): needle i after
    round(depth_i * n_filler) filler words; needles at one position keep their order. Each filler
    part starts the repetition afresh, as the passkey's two do."""
    at = [int(round(d * n_filler)) for _, _, d in needles]
    lines, prev = [NEEDLE_TASK], 0
    for i in sorted(range(len(needles)), key=lambda i: (at[i], i)):
        word, value, _ = needles[i]
        lines += [filler_text(at[i] - prev), NEEDLE_LINE.format(word=word, value=value)]
        prev = at[i]
    words = [needles[i][0] for i in asked]
    if task == 'multivalue':
        words = words[:1]  # one word, all its values asked
    listed = words[0] if len(words) == 1 else ', '.join(words[:-1]) + ' and ' + words[-1]
    question = QUESTION_ONE if task == 'multikey' else QUESTION_ALL
    lines += [filler_text(n_filler - prev), question.format(words=listed)]
    return '\n'.join(lines), at


def build_needle_prompt(tok, task, length, needles, asked, hint=None):
    """fit_filler for a needle trial: (ids of BOS + prompt + answer, n_prompt, n_filler, the
    needles' word positions)."""
    answer = needle_answer(needles, asked)

    def encode(n):
        return encode_answer(tok, make_needle_prompt(task, n, needles, asked)[0], answer, 'answer')
    n = fit_filler(lambda n: len(encode(n)[0]), length, hint, task)
    ids, p = encode(n)
    return ids, p, n, make_needle_prompt(task, n, needles, asked)[1]


def answer_state(text, key, done):
    """The official script's verdict on a greedy output `text`: True/False, or None while more
    tokens could change it. Official: int(first `\\d+` of the output) == key (no number: fail).
    done: no more tokens come."""
    m = ANSWER_RE.search(text)
    if m is None:
        return False if done else None
    # the number has ended at the first non-digit after it; a trailing U+FFFD may be the first bytes
    # of a multi-byte character that completes to a (Unicode) digit, so it does not end the number
    # yet
    if done or (m.end() < len(text) and text[m.end()] != '\ufffd'):
        return int(m.group()) == int(key)
    # digits so far; int() ignores leading zeros, as the official comparison does
    v = int(m.group())
    return None if str(int(key)).startswith(str(v) if v else '') else False


def all_values_state(text, values, done):
    """The verdict generalised to several asked values: True once every value is among the
    numbers (`\\d+`, compared by int) of the output, False if one is still missing when done, None
    while more tokens could add it. A number at the end of the text (or before a U+FFFD) counts
    once it has ended."""
    found = {int(m.group()) for m in ANSWER_RE.finditer(text)
             if done or (m.end() < len(text) and text[m.end()] != '\ufffd')}
    if all(int(v) in found for v in values):
        return True
    return False if done else None


def speculate(gen, guess, decode):
    """Tokens greedy decoding is expected to write after `gen`: the rest of the answer (the key's
    tokens). Only speed depends on this guess: every token kept is the model's own argmax."""
    if gen == guess[:len(gen)]:
        return guess[len(gen):]
    digits = [i for i, t in enumerate(guess) if any(c.isdigit() for c in decode([t]))]
    dg = guess[digits[0]:] if digits else []  # the key's tokens without the leading space piece
    for m in range(len(dg), -1, -1):  # gen ends with the key's first m tokens: the rest follows
        if m == 0 or gen[-m:] == dg[:m]:
            return dg[m:]


@torch.inference_mode()
def extend_cache(model, cache, cached, ids, device='cpu'):
    """Make `cache` hold `ids`: keep the longest prefix they share with `cached` (the ids it holds
    now) and run only the rest. Trials at one length and depth share the filler before the key, so
    each trial after the first pays for the tokens from its key on. Returns the ids the cache now
    holds."""
    n = min(len(cached), len(ids))
    diff = np.flatnonzero(np.asarray(cached[:n]) != np.asarray(ids[:n]))
    c = int(diff[0]) if len(diff) else n  # tokens shared with what the cache holds
    cache.truncate(c)
    if c < len(ids):
        rest = torch.tensor(ids[c:], dtype=torch.long, device=device)[None]
        model.forward_hidden(rest, cache=cache)
    return list(ids)


@torch.inference_mode()
def greedy_passkey(model, prompt, guess, key, decode, max_new_tokens=10, eos_id=None, device='cpu',
                   cache=None, judge=None):
    """Greedy decoding after `prompt` (ids) judged like the official script (first number == key).
    The prompt runs once into a KV cache; each forward then runs the prompt's last token + the
    confirmed tokens + a guessed continuation (the key, then one more position that shows whether
    the number ends) and keeps the model's argmax up to the first miss, so one forward usually
    decides a trial and each one adds at least one generated token. Stops once the verdict is fixed,
    at EOS, or after max_new_tokens (what the official script's generate(max_new_tokens=10) sees).
    `cache`: a KVCache already holding prompt[:-1] (extend_cache); None = a new one. The first
    forward also gives the key's teacher-forced log-likelihood, log p(guess | prompt) in nats: a
    graded score of every trial, passed or failed. `judge(text, done)`: another verdict in
    answer_state's terms (the needle tasks' all_values_state); None = the key's.
    Returns (passed, generated ids, teacher-forced argmax at the guess's positions, key log-prob,
    forwards)."""
    # tokens kept in the cache: the prompt but its last, whose output is the first token
    P = len(prompt) - 1
    if cache is None:
        cache = KVCache(model.args.n_layers)
        extend_cache(model, cache, [], prompt[:P], device)
    gen, tf_pred, key_lp, n_fwd = [], None, None, 0
    while True:
        spec = speculate(gen, guess, decode)
        ids = torch.tensor([prompt[P]] + gen + spec, dtype=torch.long, device=device)[None]
        # positions predicting gen's next tokens
        h = model.forward_hidden(ids, cache=cache)[0, len(gen):]
        # the guess may be wrong: the next forward reruns everything after the prompt
        cache.truncate(P)
        logits = model.lm_head(h).float()  # [len(spec) + 1, vocab]: no [T, vocab] logits
        pred = logits.argmax(-1).tolist()
        # gen is empty, so spec is the whole guess and rows 0 .. len(guess)-1 predict it
        if n_fwd == 0:
            lp = logits[:len(guess)].log_softmax(-1)
            key_lp = float(lp.gather(1, torch.tensor(guess, device=lp.device)[:, None]).sum())
            tf_pred = pred[:len(guess)]
        n_fwd += 1
        for j, t in enumerate(pred):
            gen.append(t)
            done = t == eos_id or len(gen) >= max_new_tokens
            text = decode(gen)
            state = answer_state(text, key, done) if judge is None else judge(text, done)
            if state is not None:
                return state, gen, tf_pred, key_lp, n_fwd
            # the guess is wrong from here: its later argmaxes mean nothing
            if j == len(spec) or t != spec[j]:
                break


def trial_streams(lengths, num_trials, depths, seed):
    """(length, grid depth or None, rng) per trial: trial i at a length (and grid depth j) draws
    from its own stream (seed, length, j, i): every method run with the same seed gets the same
    trials (paired), and a run with more trials extends one with fewer."""
    for L in lengths:
        for j, d in enumerate(depths if depths is not None else [None]):
            for i in range(num_trials):
                yield L, d, np.random.default_rng([seed, L, j, i])


def make_trials(lengths, num_trials, depths, seed):
    """[(length, depth, key)]: num_trials per length (x depth); random depth when depths is None
    (the paper). Trial i at a length (and grid depth j) draws from its own stream
    (trial_streams)."""
    trials = []
    for L, d, rng in trial_streams(lengths, num_trials, depths, seed):
        key = str(int(rng.integers(10000, 100000)))  # 5 digits
        trials.append((L, float(rng.random()) if d is None else float(d), key))
    return trials


def make_needle_trials(task, lengths, num_trials, depths, seed, num_needles=4, num_values=4,
                       num_queries=2):
    """[(length, depth, needles, asked)] per trial as make_trials (the same streams): needles
    [(word, 7-digit value, depth)], the first at the trial's depth, the others at uniform depths;
    asked: the indices of the needles whose values the question asks for (multikey [0]; multivalue
    all, one word; multiquery the first num_queries). Words and values distinct within a trial."""
    k = num_values if task == 'multivalue' else num_needles
    trials = []
    for L, d, rng in trial_streams(lengths, num_trials, depths, seed):
        depth = float(rng.random()) if d is None else float(d)
        words = [WORDS[w] for w in rng.choice(len(WORDS), size=k, replace=False)]
        if task == 'multivalue':
            words = words[:1] * k
        values = [str(int(v) + 10 ** 6) for v in rng.choice(9 * 10 ** 6, size=k, replace=False)]
        at = [depth] + [float(x) for x in rng.random(k - 1)]
        asked = {'multikey': [0], 'multivalue': list(range(k)),
                 'multiquery': list(range(num_queries))}[task]
        trials.append((L, depth, list(zip(words, values, at)), asked))
    return trials


def accuracy_table(trials, lengths, depths):
    """{row label: {length: accuracy or None}}; rows: the depth grid (requested depths) or, for
    random depths, ten bins of the realised depth; then 'all'."""
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
    return [(i / 10, (i + 1) / 10 - (1e-12 if i < 9 else 0), f"{i / 10:.1f}-{(i + 1) / 10:.1f}")
            for i in range(10)]


def accuracy_text(rows, lengths):
    """accuracy_table's rows as text: one line per depth row (then 'all'), lengths as columns."""
    w = max(len(r) for r in rows)
    lines = [f"{'depth':<{w}} " + ' '.join(f"{L:>7}" for L in lengths)]
    for label, accs in rows.items():
        cells = [f"{'-':>7}" if accs[L] is None else f"{accs[L]:>7.2f}" for L in lengths]
        lines.append(f"{label:<{w}} " + ' '.join(cells))
    return '\n'.join(lines)


def plot_heatmap(rows, lengths, path, title='', ylabel='depth of the key'):
    """Accuracy heatmap: depth rows x length columns, written atomically."""
    plt = pyplot(f"plot={path!r}")
    labels = [r for r in rows if r != 'all']
    grid = np.array([[np.nan if rows[r][L] is None else rows[r][L] for L in lengths]
                     for r in labels])
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(lengths), 1.0 + 0.4 * len(labels)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap='RdYlGn', aspect='auto')
    for i in range(len(labels)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha='center', va='center', fontsize=7)
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel('prompt length (tokens)')
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label='accuracy')
    fig.tight_layout()
    save_figure(fig, path)


def trial_prompt(tok, task, trial, hint):
    """One trial's prompt: (ids of BOS + prompt + answer, n_prompt, prompt text, the trial's JSON
    fields, the key for answer_state, a judge for greedy_passkey or None)."""
    if task == 'passkey':
        L, depth, key = trial
        ids, p, n_filler, n_before = build_passkey_prompt(tok, L, key, depth, hint)
        text = make_passkey_prompt(n_filler, key, depth)[0]
        rec = {'length': L, 'tokens': len(ids), 'depth_requested': depth,
               'depth': n_before / n_filler if n_filler else 0.0, 'n_filler': n_filler, 'key': key}
        return ids, p, text, rec, key, None
    L, depth, needles, asked = trial
    ids, p, n, at = build_needle_prompt(tok, task, L, needles, asked, hint)
    text = make_needle_prompt(task, n, needles, asked)[0]
    values = [needles[i][1] for i in asked]
    rec = {'length': L, 'tokens': len(ids), 'depth_requested': depth,
           'depth': at[0] / n if n else 0.0, 'n_filler': n,
           'key': needle_answer(needles, asked).strip(),
           'needles': [{'word': w, 'value': v, 'depth': a / n if n else 0.0}
                       for (w, v, _), a in zip(needles, at)],
           'asked': [needles[i][0] for i in asked], 'expected': values}
    if task == 'multikey':  # one value asked: the passkey's verdict on it
        return ids, p, text, rec, values[0], None
    return ids, p, text, rec, None, lambda text, done: all_values_state(text, values, done)


def prompt_cache(net):
    """A KVCache that consecutive trials share (run_trial), or None for 'dynamic' RoPE: it rescales
    with the sequence length, so its cached keys depend on the forward that made them."""
    if (net.args.rope_scaling or {}).get('rope_type') == 'dynamic':
        return None
    return KVCache(net.args.n_layers)


def run_trial(net, tok, task, trial, hint=None, max_new_tokens=None, device='cpu', cache=None,
              cached=()):
    """One trial: its prompt (trial_prompt), greedy output and verdict (greedy_passkey) -> (the
    trial's JSON record, the ids `cache` holds now). cache (prompt_cache): holds `cached`, the ids
    of the trial before; the prefix they share is kept (extend_cache). None: a fresh cache.
    max_new_tokens None: the task's own budget. train.py's checkpoint selection runs this too."""
    ids, p, text, rec, key, judge = trial_prompt(tok, task, trial, hint)
    if max(ids) >= net.args.vocab_size:
        raise UserError(f"the tokenizer ({tok.path}) gives token id {max(ids)} >= the model's "
                        f"vocab_size {net.args.vocab_size}: not the model's tokenizer?")
    prompt = tok.encode(text, bos=True)  # what generation sees
    guess = ids[len(prompt):] if ids[:len(prompt)] == prompt else ids[p:]
    # the budget: the official 10 for the passkey; the needle tasks' whole answer + 10
    budget = max_new_tokens or (10 if task == 'passkey' else len(ids) - p + 10)
    if cache is not None:
        cached = extend_cache(net, cache, cached, prompt[:-1], device)
    ok, gen, tf_pred, key_lp, n_fwd = greedy_passkey(
        net, prompt, guess, key, tok.decode, budget, tok.eos_id, device, cache, judge)
    return {**rec, 'answer_ids': list(ids[p:]), 'pred_ids': tf_pred[:len(ids) - p],
            'output_ids': gen, 'output': tok.decode(gen), 'forwards': n_fwd,
            'key_logprob': key_lp, 'pass': ok}, cached


def check_task():
    """The task keys (before the work): a known task, needle counts that fit the word list."""
    if task not in TASKS:
        raise UserError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    if task in ('multikey', 'multiquery') and not 1 <= num_needles <= len(WORDS):
        raise UserError(f"num_needles={num_needles}: expected 1 .. {len(WORDS)} (the words in "
                        f"WORDS)")
    if task == 'multivalue' and num_values < 1:
        raise UserError(f"num_values must be >= 1, got {num_values}")
    if task == 'multiquery' and not 1 <= num_queries <= num_needles:
        raise UserError(f"num_queries={num_queries}: expected 1 .. num_needles ({num_needles})")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1 (or None: the task's own), "
                        f"got {max_new_tokens}")


def task_settings():
    """The JSON's settings that name the task: none for the passkey (its JSON is as it was)."""
    if task == 'passkey':
        return {}
    counts = {'multikey': {'num_needles': num_needles}, 'multivalue': {'num_values': num_values},
              'multiquery': {'num_needles': num_needles, 'num_queries': num_queries}}[task]
    return {'task': task, **counts,
            'needle_depths': 'the first at the trial depth, the others uniform in [0, 1]'}


SCORING = {'passkey': 'official: greedy, int(first \\d+) == key',
           'multikey': 'greedy, int(first \\d+) == the asked value',
           'multivalue': 'greedy, every asked value among the \\d+ of the output',
           'multiquery': 'greedy, every asked value among the \\d+ of the output'}


# -----------------------------------------------------------------------------
# config (python eval_passkey.py [config.py] [--key=value ...])
model = ''  # HF-format model dir (ours or a stock Llama/Mistral/Qwen2)
# None = the checkpoint's own; a dict (HF semantics) overrides it, e.g. the paper's PI-only baseline
rope_scaling = None
# None = the checkpoint's own; else an override (also what the length warning checks)
max_position_embeddings = None
tokenizer = None  # None = the model dir's tokenizer (tokenizer.model or tokenizer.json)
# prompt lengths in tokens (BOS + prompt + key, within 1%)
lengths = [2048, 4096, 8192, 16384, 32768]
num_trials = 50  # trials per length (x depth); the paper: 50
# None = a random depth per trial (the paper); a list of fractions in [0, 1] = a length x depth grid
depths = None
seed = 1337  # keys and depths
# refuse a tokenizer whose fingerprint differs from the model's own (False: skip)
check_tokenizer = True
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # 'auto' = bfloat16 on CUDA, float32 on CPU; or 'float32' / 'bfloat16' / 'float16'
# decided trials stop early; None = the official 10 for the passkey, the answer's tokens + 10 else
max_new_tokens = None  # greedy tokens a trial may generate (None: the task's own budget)
task = 'passkey'  # 'passkey' (the paper's) or a needle task: 'multikey', 'multivalue', 'multiquery'
num_needles = 4  # multikey / multiquery: needles in the prompt (multikey: 1 asked + distractors)
num_values = 4  # multivalue: values of the one key, all asked
num_queries = 2  # multiquery: needles asked at once (the first num_queries of the num_needles)
out = ''  # JSON results path ('' = out/<task>-<model>[-<rope override>].json)
overwrite = False  # replace an existing `out` (else: refuse before evaluating)
# keep the trials of an existing `out` with the same settings but fewer num_trials; run the rest
extend = False
plot = ''  # heatmap PNG path ('' = none)
CONFIG_TYPES = {'rope_scaling': dict, 'max_position_embeddings': int, 'tokenizer': str,
                'depths': list, 'max_new_tokens': int}  # keys whose default is None


def run_settings(net):
    """The JSON's settings: what decides the trials and their verdicts."""
    return {**task_settings(), 'lengths': lengths, 'num_trials': num_trials, 'depths': depths,
            'seed': seed, 'max_new_tokens': max_new_tokens if max_new_tokens is not None else
            10 if task == 'passkey' else 'answer tokens + 10',
            'scoring': SCORING[task], 'dtype': dtype,
            'torch_dtype': str(next(net.parameters()).dtype), 'device': device}


def result_json(trials, rows, net, tok, seconds):
    """The run's JSON: settings, per length accuracy, passed / count and the 95% Wilson interval,
    the depth rows, every trial."""
    settings = run_settings(net)
    passed = {L: sum(t['pass'] for t in trials if t['length'] == L) for L in lengths}
    count = {L: sum(t['length'] == L for t in trials) for L in lengths}
    return {
        'model': os.path.abspath(model),
        'rope_scaling': rope_scaling if rope_scaling is not None else net.args.rope_scaling,
        'rope_scaling_override': rope_scaling is not None,
        'max_position_embeddings': net.args.max_position_embeddings,
        'tokenizer': tok.files,
        'settings': settings,
        'accuracy': {str(L): rows['all'][L] for L in lengths},
        'passed': {str(L): passed[L] for L in lengths},
        'count': {str(L): count[L] for L in lengths},
        'wilson95': {str(L): wilson(passed[L], count[L]) for L in lengths},
        'accuracy_by_depth': {r: {str(L): a for L, a in accs.items()} for r, accs in rows.items()
                              if r != 'all'},
        'seconds': seconds, 'trials': trials,
    }


def reused_trials(path, settings, tok_files):
    """extend=True: ({repr(trial): record}, its seconds) from the result at `path`, which must be
    this model's and these settings' with at most num_trials; ({}, 0) when there is none. Its trials
    are the first ones of this run's streams (trial_streams): the merged result equals one run."""
    if not os.path.exists(path):
        return {}, 0.0
    try:
        old = json.load(open(path))
        old_settings, old_trials = old['settings'], old['trials']
        old_model, old_override = old['model'], old['rope_scaling_override']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"extend: {path} is not an eval_passkey result ({e})")
    if old_model != os.path.abspath(model):
        raise UserError(f"extend: {path} was made with model {old_model}, not {model}")
    if old.get('tokenizer') != tok_files:
        raise UserError(f"extend: {path} was made with tokenizer {old.get('tokenizer')}, "
                        f"not {tok_files}")
    if (rope_scaling is not None) != old_override or (
            rope_scaling is not None and old['rope_scaling'] != rope_scaling):
        raise UserError(f"extend: {path} was made with rope_scaling "
                        f"{old['rope_scaling'] if old_override else None}, not {rope_scaling}")
    for k, v in settings.items():
        if k != 'num_trials' and old_settings.get(k) != v:
            raise UserError(f"extend: {path} was made with {k}={old_settings.get(k)!r}, "
                            f"not {v!r}")
    if old_settings['num_trials'] > num_trials:
        raise UserError(f"extend: {path} has num_trials={old_settings['num_trials']} > "
                        f"{num_trials}: nothing to extend")
    before = make_todo(old_settings['num_trials'])
    if len(before) != len(old_trials):
        raise UserError(f"extend: {path} holds {len(old_trials)} trials, its settings make "
                        f"{len(before)}")
    return {repr(t): rec for t, rec in zip(before, old_trials)}, float(old.get('seconds', 0.0))


def make_todo(n):
    """This run's trials with num_trials=n."""
    if task == 'passkey':
        return make_trials(lengths, n, depths, seed)
    return make_needle_trials(task, lengths, n, depths, seed, num_needles, num_values,
                              num_queries)


def main():
    from tqdm import tqdm  # after the config: a bad key fails before the heavy imports

    from tokenizer import check_same_tokenizer, load_tokenizer, sha256_file

    check_task()
    if not lengths or any(not isinstance(L, int) or L < 1 for L in lengths):
        raise UserError(f"lengths must be a list of positive ints, got {lengths!r}")
    if depths is not None and (not depths or any(
            isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1
            for d in depths)):
        raise UserError(f"depths={depths!r}: expected None (a random depth per trial) or a "
                        f"non-empty list of fractions in [0, 1]")
    if max_position_embeddings is not None and max_position_embeddings < 1:
        raise UserError(f"max_position_embeddings must be >= 1 (or None: the checkpoint's), "
                        f"got {max_position_embeddings}")
    if num_trials < 1:
        raise UserError(f"num_trials must be >= 1, got {num_trials}")
    torch_dtype(dtype, device)  # a bad dtype fails here, before the work
    # the result's name is claimed once the settings are known good, before the work
    path = check_run(task, model, rope_scaling, out, overwrite or extend, plot)
    tok = load_tokenizer(tokenizer or model)
    if tokenizer and check_tokenizer:
        check_same_tokenizer(sha256_file(tok.path), f"tokenizer='{tokenizer}'", model,
                             'check_tokenizer')
    net = load_model(model, rope_scaling, max_position_embeddings, dtype, device, lengths)

    cache, cached = prompt_cache(net), []  # the prompt prefix shared with the previous trial
    todo = make_todo(num_trials)
    done, seconds = reused_trials(path, run_settings(net), tok.files) if extend else ({}, 0.0)
    trials, hints, t0 = [], {}, time.time()
    for trial in tqdm(todo, desc=task):
        rec = done.get(repr(trial))
        if rec is None:
            rec, cached = run_trial(net, tok, task, trial, hints.get(trial[0]), max_new_tokens,
                                    device, cache, cached)
        hints[trial[0]] = rec['n_filler']
        trials.append(rec)
    dt = seconds + time.time() - t0  # with the extended result's own

    rows = accuracy_table(trials, lengths, depths)
    result = result_json(trials, rows, net, tok, dt)
    write_json_atomic(path, result)
    print(accuracy_text(rows, lengths))
    for L in lengths:
        lo, hi = result['wilson95'][str(L)]
        print(f"{L}: {result['passed'][str(L)]}/{result['count'][str(L)]} passed, "
              f"95% Wilson [{lo:.2f}, {hi:.2f}]")
    print('settings: ' + ', '.join(f"{k}={v}" for k, v in result['settings'].items()))
    print(f"wrote {path}")
    if plot:
        name = model_name(model) if task == 'passkey' else f"{model_name(model)}: {task}"
        plot_heatmap(rows, lengths, plot, name, 'depth of the key' if task == 'passkey' else
                     'first needle depth')
        print(f"wrote {plot}")


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run(main)
