"""
Position-id samplers for PoSE (Zhu et al., ICLR 2024, §3.2) and its baselines, plus the
coverage analysis of the paper's Appendix B (Fig. 5).

A training example is train_len = L_c tokens; the model should learn every relative distance up
to target_len = L_t. Every sampler is  f(doc_len, train_len, target_len, rng, **options)
-> (token_idx, position_ids): two int64 arrays of length L_c; token i of the example is
doc[token_idx[i]] and is trained at position position_ids[i]. rng is a numpy Generator: the
same rng state gives the same draw.

PoSE (Eq. 3-5). Split L_c into N chunks c_0 .. c_{N-1} of lengths l_i >= 1 (sum l_i = L_c) that
start at st_i = l_0 + ... + l_{i-1}. With u_0 = v_0 = 0 and, for i >= 1,
    skip offsets     u_i ~ U{u_{i-1} .. L_t - L_c}
    content offsets  v_i ~ U{v_{i-1} .. L_x - L_c}         (L_x = doc_len)
chunk i is trained at positions  u_i + st_i .. u_i + st_i + l_i - 1   (Eq. 4)
and holds the tokens             x[v_i + st_i : v_i + st_i + l_i]      (Eq. 5).
st_i + k is the token's index j in the example, so both arrays start as arange(L_c) and each chunk
adds its u_i (or v_i) to its own slice: one numpy op per chunk, no Python loop over tokens.
Choices the paper leaves open, settled here:
  - chunk lengths (chunking='paper', default): a uniformly random composition of L_c into N
    positive parts, i.e. N-1 distinct cut points drawn uniformly from 1 .. L_c-1, sorted. For
    N = 2 this is l_0 ~ U{1 .. L_c-1}, as in the paper's Fig. 6 coverage code (its N = 3 code
    breaks the stick sequentially instead, a slightly different distribution).
    chunking='official' is the authors' train_pose.py: N = 2 only, l_0 ~ U{1 .. ceil(L_c/2)};
    its u_1 and v_1 are distributed as above.
  - u_i are drawn one after another as the paper writes them, so for N >= 3 the later offsets
    pile up near L_t - L_c (u_2 is not uniform). We keep the paper's formula.
  - content='uniform' (default, v_i as above) | 'zero' (v_i = 0: one contiguous span from the
    document start) | 'aligned' (v_i = u_i: tokens sit at their true distance in the document).
    When the document is too short for 'aligned' (u_i > L_x - L_c) we clamp
    v_i = min(u_i, L_x - L_c), which keeps v non-decreasing, so the chunks still never overlap.
  - As in the paper, v_0 = 0: the first chunk always starts at the document start.
  - N = 1 gives positions 0 .. L_c-1 (and tokens 0 .. L_c-1): plain fine-tuning at L_c.
RandPos (Ruoss et al., 2023): L_c distinct positions drawn uniformly from {0 .. L_t-1}, sorted;
tokens are one contiguous span from a random offset. full: positions 0 .. L_c-1, one contiguous
span from a random offset (full-length fine-tuning runs it with train_len = target_len).

Coverage. A draw "exposes" relative distance d if two of its positions p_i < p_j have
p_j - p_i = d. relative_distances() computes that set exactly; coverage_curve() estimates
p_d = P(a draw exposes d) by Monte Carlo, the paper's Fig. 5; pose2_coverage_exact() is the
closed form for N = 2. examples_to_cover(p) turns p_d into training-example counts.

CLI:  python sample_positions.py --train_len=2048 --target_len=16384 [--draws=2000]
      [--plot=coverage.png] [--seed=0]
prints coverage per distance bucket for N = 1, 2, 3 and RandPos, the examples needed for 99%
coverage, and the measured draw speed.
"""
import math
import os
import time

import numpy as np

from errors import UserError, atomic_path, check_writable, run

# ----------------------------------------------------------------------------- samplers


def _check_lengths(doc_len, train_len, target_len):
    if train_len < 1:
        raise ValueError(f"train_len={train_len} must be >= 1")
    if target_len < train_len:
        raise ValueError(f"target_len={target_len} is shorter than train_len={train_len}")
    if doc_len < train_len:
        raise ValueError(f"doc_len={doc_len} is shorter than train_len={train_len}: the document "
                         "cannot fill an example")


def _check_chunks(train_len, num_chunks, chunking):
    if not 1 <= num_chunks <= train_len:
        raise ValueError(f"num_chunks={num_chunks} must be in [1, train_len={train_len}]")
    if chunking not in ('paper', 'official'):
        raise ValueError(f"chunking={chunking!r}: expected 'paper' or 'official'")
    if chunking == 'official' and num_chunks != 2:
        raise ValueError(f"chunking='official' has exactly 2 chunks, got num_chunks={num_chunks}")


def _check_content(content):
    if content not in ('uniform', 'zero', 'aligned'):
        raise ValueError(f"content={content!r}: expected 'uniform', 'zero' or 'aligned'")


def check_options(method, train_len, target_len, **options):
    """What a sampler would reject whatever the document: the method, the two lengths and the
    method's options. Once, before any draw (train.py calls it on its config); raises ValueError
    naming the value."""
    if method not in SAMPLERS:
        raise ValueError(f"method={method!r}: expected one of {sorted(SAMPLERS)}")
    _check_lengths(train_len, train_len, target_len)
    known = ('num_chunks', 'content', 'chunking') if method == 'pose' else ()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"method={method!r} takes no option {unknown[0]!r} "
                         f"(its options: {list(known)})")
    if method == 'pose':
        _check_chunks(train_len, options.get('num_chunks', 2), options.get('chunking', 'paper'))
        _check_content(options.get('content', 'uniform'))


def chunk_lengths(train_len, num_chunks, rng, chunking='paper'):
    """[l_0 .. l_{N-1}]: N positive chunk lengths summing to L_c (§3.2, the split before Eq. 3), as
    a list of ints (tiny; Python ints keep a draw well under 50 us)."""
    L, N = train_len, num_chunks
    _check_chunks(L, N, chunking)
    # dwzhu-pku/PoSE train_pose.py: rt1 = random.randint(1, (len_chunk+1)//2)
    if chunking == 'official':
        l0 = int(rng.integers(1, (L + 1) // 2 + 1))
        return [l0, L - l0]
    k = N - 1  # cut points, distinct, uniform among the (L-1 choose k) subsets of 1..L-1
    if k == 1:  # N = 2, the paper's setting: l_0 ~ U{1 .. L_c-1}
        cuts = [int(rng.integers(1, L))]
    elif k * k <= L:
        # few cuts: draw them i.i.d. and redraw on a collision (accepted w.p. >~ 0.6); a uniform
        # ordered k-tuple of distinct values, once sorted, is a uniform k-subset. Python ints:
        # numpy's per-call overhead on tiny arrays would dominate a 20k draws/s budget.
        while len(cuts := set(int(rng.integers(1, L)) for _ in range(k))) < k:
            pass
        cuts = sorted(cuts)
    else:
        cuts = np.sort(rng.choice(np.arange(1, L), size=k, replace=False)).tolist()
    return [b - a for a, b in zip([0] + cuts, cuts + [L])]


def monotone_offsets(n, high, rng):
    """w_0 = 0 and w_i ~ U{w_{i-1} .. high} for i = 1 .. n-1: the skip offsets u_i of Eq. 4
    (high = L_t - L_c) and the content offsets v_i of Eq. 5 (high = L_x - L_c). A list of ints."""
    w = [0]
    for _ in range(n - 1):  # sequential by definition; n = N is small
        w.append(int(rng.integers(w[-1], high + 1)))
    return w


def pose(doc_len, train_len, target_len, rng, num_chunks=2, content='uniform', chunking='paper'):
    """PoSE (Eq. 3-5): N chunks with skip offsets u_i (positions) and content offsets v_i
    (tokens)."""
    _check_lengths(doc_len, train_len, target_len)
    _check_content(content)  # (num_chunks and chunking: chunk_lengths checks them)
    l = chunk_lengths(train_len, num_chunks, rng, chunking)         # [N] l_i
    u = monotone_offsets(len(l), target_len - train_len, rng)        # [N] u_i, Eq. 4
    if content == 'uniform':
        v = monotone_offsets(len(l), doc_len - train_len, rng)       # [N] v_i, Eq. 5
    elif content == 'zero':
        v = [0] * len(l)
    else:  # 'aligned': v_i = u_i, clamped so that the last chunk still ends inside the document
        v = [min(u_i, doc_len - train_len) for u_i in u]
    # [L_c] st_i + k for the k-th token of chunk i
    position_ids = np.arange(train_len, dtype=np.int64)
    token_idx = np.arange(train_len, dtype=np.int64)     # [L_c]
    st = 0
    # chunk c_i holds the example's tokens st_i .. st_i + l_i - 1
    for l_i, u_i, v_i in zip(l, u, v):
        if u_i:
            position_ids[st:st + l_i] += u_i  # u_i + st_i + k   (Eq. 4)
        if v_i:
            token_idx[st:st + l_i] += v_i     # x[v_i + st_i + k] (Eq. 5)
        st += l_i
    return token_idx, position_ids


def randpos(doc_len, train_len, target_len, rng):
    """RandPos: L_c distinct positions from {0 .. L_t-1}, sorted; contiguous text at a random
    offset."""
    _check_lengths(doc_len, train_len, target_len)
    draw = rng.choice(target_len, size=train_len, replace=False, shuffle=False)
    position_ids = np.sort(draw).astype(np.int64)
    token_idx = int(rng.integers(0, doc_len - train_len + 1)) + np.arange(train_len, dtype=np.int64)
    return token_idx, position_ids


def full(doc_len, train_len, target_len, rng):
    """Full-length / plain: positions 0 .. L_c-1; contiguous text at a random offset."""
    _check_lengths(doc_len, train_len, target_len)
    j = np.arange(train_len, dtype=np.int64)
    return int(rng.integers(0, doc_len - train_len + 1)) + j, j.copy()


SAMPLERS = {'pose': pose, 'randpos': randpos, 'full': full}

# ----------------------------------------------------------------------------- coverage


def relative_distances(position_ids, target_len, method='auto'):
    """Which relative distances one draw exposes, exactly: a bool array `e` of length L_t with
    e[d] = True iff some pair i < j has p_j - p_i = d (d = 1 .. L_t-1; e[0] is False: a token's
    distance to itself is not a relative distance the model has to learn).

    method='intervals': the positions are a union of K runs [a_r, b_r] (K = N for PoSE). Pairs
    inside runs give 1 .. max(b_r - a_r); pairs across runs r < s give every d in
    [a_s - b_r, b_s - a_r]. A difference array over these K(K-1)/2 + 1 intervals: O(K^2 + L_t).
    method='fft': any position set. The autocorrelation of the 0/1 indicator counts the pairs at
    each distance; it is an integer, exact after rounding: O(L_t log L_t) (RandPos has K ~ L_c).
    'auto' picks 'intervals' when K(K-1)/2 <= 4 L_t."""
    p = np.asarray(position_ids, dtype=np.int64)
    if p.ndim != 1 or p.size == 0 or p[0] < 0 or p[-1] >= target_len \
            or (p.size > 1 and (np.diff(p) <= 0).any()):
        raise ValueError(f"position_ids must be strictly increasing in "
                         f"[0, target_len={target_len})")
    new_run = np.flatnonzero(np.diff(p) != 1) + 1
    a = p[np.concatenate(([0], new_run))]                 # [K] run starts
    b = p[np.concatenate((new_run - 1, [p.size - 1]))]    # [K] run ends (inclusive)
    K = a.size
    if method == 'auto':
        method = 'intervals' if K * (K - 1) // 2 <= 4 * target_len else 'fft'
    if method == 'intervals':
        r, s = np.triu_indices(K, 1)
        lo = np.concatenate(([1], a[s] - b[r]))            # [1 + K(K-1)/2]
        # first interval empty if all runs are singletons
        hi = np.concatenate(([(b - a).max()], b[s] - a[r]))
        keep = lo <= hi
        delta = np.bincount(lo[keep], minlength=target_len + 1) \
            - np.bincount(hi[keep] + 1, minlength=target_len + 1)
        return np.cumsum(delta[:target_len]) > 0
    if method == 'fft':
        n = 1 << (2 * target_len - 1).bit_length()  # >= 2 L_t: no circular wrap-around
        ind = np.zeros(n)
        ind[p] = 1.0
        f = np.fft.rfft(ind)
        # pairs[d] = #{(i, j): p_j - p_i = d}
        pairs = np.rint(np.fft.irfft(f * np.conj(f), n)[:target_len])
        exposed = pairs > 0
        exposed[0] = False
        return exposed
    raise ValueError(f"method={method!r}: expected 'auto', 'intervals' or 'fft'")


def coverage_curve(sampler, train_len, target_len, draws, rng, *, doc_len=None, progress=False,
                   **options):
    """Monte-Carlo p_d = P(one draw exposes distance d), d = 0 .. L_t-1 (the paper's Fig. 5/6).
    sampler: a name in SAMPLERS or a sampler function; options go to the sampler."""
    fn = SAMPLERS[sampler] if isinstance(sampler, str) else sampler
    doc_len = target_len if doc_len is None else doc_len
    counts = np.zeros(target_len, dtype=np.int64)
    it = range(draws)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"coverage {getattr(fn, '__name__', fn)} {options or ''}", leave=False)
    for _ in it:
        position_ids = fn(doc_len, train_len, target_len, rng, **options)[1]
        counts += relative_distances(position_ids, target_len)
    return counts / draws


def pose2_coverage_exact(train_len, target_len, chunking='paper'):
    """Exact p_d for PoSE with N = 2. A draw exposes [1, max(l_0, l_1) - 1] (inside the chunks)
    and [u_1 + 1, u_1 + L_c - 1] (across them, whatever l_0); l_0 and u_1 are independent, so
    p_d = 1 - (1 - A_d)(1 - B_d), A_d = P(max(l_0, l_1) > d), B_d = P(d-L_c+1 <= u_1 <= d-1)."""
    L, M = train_len, target_len - train_len
    if L < 2 or M < 0:
        raise ValueError(f"need 2 <= train_len <= target_len, got train_len={L}, "
                         f"target_len={target_len}")
    # the support of l_0, uniform
    l0 = np.arange(1, (L if chunking == 'paper' else (L + 1) // 2 + 1))
    longest = np.maximum(l0, L - l0)
    d = np.arange(target_len)
    A = 1 - np.cumsum(np.bincount(longest, minlength=target_len)) / l0.size  # A[d] = P(longest > d)
    B = np.clip(np.minimum(d - 1, M) - np.maximum(0, d - L + 1) + 1, 0, None) / (M + 1)
    p = 1 - (1 - A) * (1 - B)
    p[0] = 0.0
    return p


def examples_to_cover(p, confidence=0.99):
    """Training examples needed to see the distances 1 .. L_t-1 of a coverage curve p (draws
    i.i.d.).
    Returns (per_distance, all_distances):
      per_distance  = smallest n with P(d exposed at least once in n draws) = 1 - (1-p_d)^n
                      >= confidence for every d, i.e. max_d ceil(log(1-conf) / log(1-p_d));
      all_distances = smallest n with sum_d (1-p_d)^n <= 1-conf: by the union bound every
                      distance is then covered at once with probability >= confidence.
    Both are inf when some p_d = 0."""
    q = 1 - np.asarray(p, dtype=np.float64)[1:]   # miss probability per distance d >= 1
    if q.size == 0 or (q <= 0).all():
        return 1, 1
    if (q >= 1).any():
        return math.inf, math.inf
    per = int(math.ceil(math.log(1 - confidence) / math.log(q.max())))
    lo, hi = per, per  # the union bound needs at least `per`; find an upper end, then bisect
    while np.sum(q ** hi) > 1 - confidence:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if np.sum(q ** mid) > 1 - confidence else (lo, mid)
    return per, hi


def draws_per_second(sampler, train_len, target_len, seconds=1.0, *, doc_len=None, seed=0,
                     **options):
    """Measured sampler speed on one core: draws per CPU second of this process, run for `seconds`
    of CPU time (a sampler is single-threaded; CPU time keeps other jobs on a shared machine
    from deflating the figure)."""
    fn = SAMPLERS[sampler] if isinstance(sampler, str) else sampler
    doc_len = target_len if doc_len is None else doc_len
    rng = np.random.default_rng(seed)
    n, t0 = 0, time.process_time()
    while (elapsed := time.process_time() - t0) < seconds:
        fn(doc_len, train_len, target_len, rng, **options)
        n += 1
    return n / elapsed


def plot_coverage(curves, train_len, target_len, path):
    """The paper's Fig. 5: coverage probability vs relative distance, one line per method.
    curves: {label: p}. Written atomically."""
    try:
        from matplotlib.figure import Figure  # optional dependency; no pyplot, no display needed
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    d = np.arange(1, target_len)
    for label, p in curves.items():
        ax.plot(d, p[1:], label=label, linewidth=1)
    ax.axvline(train_len, color='gray', linestyle=':', linewidth=1)
    ax.set(xlabel='relative distance', ylabel='coverage probability (one example)',
           title=f'Relative-distance coverage, {train_len} -> {target_len}', ylim=(-0.02, 1.02),
           xlim=(0, target_len))
    ax.legend(loc='center right')
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk: the temp file goes, one line names the path
        fig.savefig(tmp, format='png', dpi=120)


# ----------------------------------------------------------------------------- CLI

def main():
    methods = {'N=1': ('pose', {'num_chunks': 1}), 'N=2': ('pose', {'num_chunks': 2}),
               'N=3': ('pose', {'num_chunks': 3}), 'RandPos': ('randpos', {})}
    if draws < 1:
        raise UserError(f"draws={draws} must be >= 1")
    if plot:
        check_writable(plot, 'plot', exts=('.png',))
    if not 3 <= train_len <= target_len:
        raise UserError(f"need 3 <= train_len <= target_len (N = 1, 2, 3 are compared), got "
                        f"train_len={train_len}, target_len={target_len}")
    curves = {name: coverage_curve(s, train_len, target_len, draws, np.random.default_rng(seed),
                                   progress=True, **o)
              for name, (s, o) in methods.items()}

    print(f"coverage probability of each relative distance in one example, {train_len} -> "
          f"{target_len}, {draws} draws per method (seed {seed}); per bucket: mean / min")
    width = train_len * max(1, math.ceil(target_len / train_len / 16))  # at most ~16 rows
    print(f"{'distance':>16} " + ' '.join(f"{name:>13}" for name in curves))
    for lo in range(0, target_len, width):
        a, b = max(lo, 1), min(lo + width, target_len)
        cells = ' '.join(f"{p[a:b].mean():6.3f}/{p[a:b].min():6.3f}" for p in curves.values())
        print(f"{f'[{a}, {b})':>16} {cells}")

    print(f"\ntraining examples until every distance 1..{target_len - 1} is seen with 99% "
          f"probability (per distance / all at once, union bound; from the Monte-Carlo p_d, so a "
          f"p_d below ~1/{draws} reads as 0 -> inf):")
    for name, p in curves.items():
        per, joint = examples_to_cover(p)
        print(f"{name:>8}: {per} / {joint}  (unseen distances: {int((p[1:] == 0).sum())})")
    per, joint = examples_to_cover(pose2_coverage_exact(train_len, target_len))
    print(f"{'N=2':>8}: {per} / {joint}  (exact p_d; the rarest distance is L_t-1, "
          f"p = 1/(L_t-L_c+1))")

    print(f"\ndraw speed at {train_len} -> {target_len} (one core, {speed_seconds:g} s each):")
    for name, (s, o) in {**methods, 'full': ('full', {})}.items():
        rate = draws_per_second(s, train_len, target_len, speed_seconds, seed=seed, **o)
        print(f"{name:>8}: {rate:10,.0f} draws/s")

    if plot:
        plot_coverage(curves, train_len, target_len, plot)
        print(f"\nwrote {plot}")


if __name__ == '__main__':
    train_len = 2048  # L_c: tokens per training example
    target_len = 16384  # L_t: the context window to cover
    draws = 2000  # Monte-Carlo draws per method for the coverage curves
    seed = 0  # numpy Generator seed
    plot = ''  # path of a PNG for the paper's Fig. 5 ('' = no plot)
    speed_seconds = 0.5  # CPU seconds of this process per sampler for the draws/s measurement
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run(main)
