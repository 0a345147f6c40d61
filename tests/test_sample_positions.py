"""sample_positions.py against the paper's formulas (§3.2 Eq. 3-5, Appendix B) and brute-force
loops."""
import math
import os
import subprocess
import sys
import time
from itertools import product

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# noqa: E402
from sample_positions import (SAMPLERS, check_options, coverage_curve, draws_per_second,
                              examples_to_cover, pose, pose2_coverage_exact, randpos, full,
                              relative_distances)


# ----------------------------------------------------------------------------- references

def brute_distances(pos):
    """Every p_j - p_i, i < j: the O(L^2) pair loop of the paper's Fig. 6 (RandPos column)."""
    pos = [int(x) for x in pos]
    return {pos[j] - pos[i] for i in range(len(pos)) for j in range(i + 1, len(pos))}


def chi2_ok(samples, support, probs=None):
    """Pearson chi-square of `samples` against a distribution on `support` (uniform if probs is
    None): accepts when the statistic is within 5 sigma of its mean (df + 5 sqrt(2 df))."""
    support = np.asarray(support)
    probs = np.full(support.size, 1 / support.size) if probs is None \
        else np.asarray(probs, dtype=float)
    assert abs(probs.sum() - 1) < 1e-9
    if not np.isin(samples, support).all():
        return False
    observed = (np.asarray(samples)[:, None] == support[None, :]).sum(0)
    expected = probs * len(samples)
    df = support.size - 1
    return ((observed - expected) ** 2 / expected).sum() < df + 5 * math.sqrt(2 * df)


def moments_ok(samples, support):
    """Sample mean and variance within 5 standard errors of the discrete uniform's."""
    x, s, n = np.asarray(samples, float), np.asarray(support, float), len(samples)
    mu, var = s.mean(), s.var()           # (a+b)/2 and ((b-a+1)^2-1)/12
    mu4 = ((s - mu) ** 4).mean()
    return abs(x.mean() - mu) < 5 * math.sqrt(var / n) \
        and abs(x.var() - var) < 5 * math.sqrt((mu4 - var ** 2) / n)


def offsets(tok, pos):
    """Eq. 4/5 say position = u_i + st_i + k and token = v_i + st_i + k, with st_i + k the index
    j."""
    j = np.arange(len(pos))
    return pos - j, tok - j  # per token: u of its chunk, v of its chunk


# ----------------------------------------------------------------------------- PoSE structure

@pytest.mark.parametrize("doc_len,L_c,L_t,N,content,chunking", [
    (64, 16, 64, 2, 'uniform', 'paper'), (20, 16, 64, 3, 'uniform', 'paper'),
    (16, 16, 16, 2, 'uniform', 'paper'), (100, 16, 200, 1, 'uniform', 'paper'),
    (100, 16, 200, 16, 'uniform', 'paper'), (100, 16, 200, 7, 'zero', 'paper'),
    (300, 16, 200, 3, 'aligned', 'paper'), (40, 16, 200, 4, 'aligned', 'paper'),
    (50, 17, 90, 2, 'uniform', 'official'), (5000, 2048, 16384, 2, 'uniform', 'paper'),
])
def test_pose_follows_eq4_eq5(doc_len, L_c, L_t, N, content, chunking):
    rng = np.random.default_rng(1)
    for _ in range(200):
        tok, pos = pose(doc_len, L_c, L_t, rng, num_chunks=N, content=content, chunking=chunking)
        assert tok.dtype == pos.dtype == np.int64 and tok.shape == pos.shape == (L_c,)
        assert pos[0] == 0 and (np.diff(pos) > 0).all() and pos[-1] < L_t
        assert tok.min() >= 0 and tok.max() < doc_len and (np.diff(tok) > 0).all()
        u, v = offsets(tok, pos)
        # u_0 = v_0 = 0; u_{i-1} <= u_i <= L_t - L_c; v_{i-1} <= v_i <= L_x - L_c
        assert u[0] == 0 and (np.diff(u) >= 0).all() and u.max() <= L_t - L_c
        assert v[0] == 0 and (np.diff(v) >= 0).all() and v.max() <= doc_len - L_c
        # positions and tokens are both contiguous inside each of the N chunks: at most N-1 breaks
        breaks = np.flatnonzero((np.diff(u) != 0) | (np.diff(v) != 0))
        assert len(breaks) <= N - 1
        if N == 1:
            assert (pos == np.arange(L_c)).all() and (tok == np.arange(L_c)).all()
        if content == 'zero':
            assert (tok == np.arange(L_c)).all()
        if content == 'aligned':  # v_i = u_i, clamped to L_x - L_c for a short document
            assert (v == np.minimum(u, doc_len - L_c)).all()
            if doc_len >= L_t:
                assert (tok == pos).all()


def test_pose_offsets_are_uniform_as_in_the_paper():
    # N = 2: u_1 ~ U{0 .. L_t - L_c}, v_1 ~ U{0 .. L_x - L_c}, l_0 ~ U{1 .. L_c - 1}
    L_c, L_t, L_x, n = 16, 64, 40, 20000
    rng = np.random.default_rng(2)
    draws = [pose(L_x, L_c, L_t, rng) for _ in range(n)]
    u1 = np.array([p[-1] - (L_c - 1) for _, p in draws])  # the last token sits in chunk 1
    v1 = np.array([t[-1] - (L_c - 1) for t, _ in draws])
    assert chi2_ok(u1, np.arange(L_t - L_c + 1)) and moments_ok(u1, np.arange(L_t - L_c + 1))
    assert chi2_ok(v1, np.arange(L_x - L_c + 1)) and moments_ok(v1, np.arange(L_x - L_c + 1))
    # l_0 is visible where u_1 > 0 or v_1 > 0, an event independent of l_0
    l0 = [1 + np.flatnonzero(np.diff(p) + np.diff(t) > 2)[0]
          for t, p in draws if p[-1] + t[-1] > 2 * (L_c - 1)]
    assert len(l0) > 0.9 * n and chi2_ok(l0, np.arange(1, L_c))
    # the checks have teeth: an off-by-one u_1 ~ U{0 .. L_t - L_c - 1} or a wrong support fails them
    bad = np.random.default_rng(3).integers(0, L_t - L_c, size=n)
    assert not chi2_ok(bad, np.arange(L_t - L_c + 1)) and not moments_ok(bad,
                                                                         np.arange(L_t - L_c + 1))
    assert not chi2_ok(np.minimum(u1 + 1, L_t - L_c), np.arange(L_t - L_c + 1))


def test_official_chunking_first_chunk_at_most_half():
    L_c, n = 17, 8000
    rng = np.random.default_rng(4)
    l0 = []
    for _ in range(n):
        t, p = pose(400, L_c, 400, rng, chunking='official')
        jump = np.flatnonzero(np.diff(p) + np.diff(t) > 2)
        if len(jump):
            l0.append(jump[0] + 1)
    # train_pose.py: randint(1, (len_chunk+1)//2)
    assert chi2_ok(l0, np.arange(1, (L_c + 1) // 2 + 1))


def test_three_chunks_follow_the_sequential_formula():
    # u_2 ~ U{u_1 .. M} after u_1 ~ U{0 .. M}: P(u_2 = k) = sum_{j <= k} 1/(M+1) * 1/(M-j+1) -- not
    # uniform
    L_c, L_t, n = 16, 40, 20000
    M = L_t - L_c
    rng = np.random.default_rng(5)
    u2 = np.array([pose(L_c, L_c, L_t, rng, num_chunks=3)[1][-1] - (L_c - 1) for _ in range(n)])
    probs = np.array([sum(1 / (M + 1) / (M - j + 1) for j in range(k + 1)) for k in range(M + 1)])
    assert chi2_ok(u2, np.arange(M + 1), probs)
    assert not chi2_ok(u2, np.arange(M + 1))  # the sequential draw is measurably biased high


@pytest.mark.parametrize("N", [3, 6])  # 3: i.i.d. cuts with rejection; 6: rng.choice branch
def test_chunk_lengths_are_a_uniform_composition(N):
    # uniform over compositions of L_c into N positive parts: P(l_0 = a) = C(L_c-a-1, N-2) /
    # C(L_c-1, N-1)
    L_c, L_t, n = 16, 100000, 6000
    rng = np.random.default_rng(6)
    l0 = []
    for _ in range(n):
        t, p = pose(L_t, L_c, L_t, rng, num_chunks=N)
        jumps = np.flatnonzero(np.diff(p) + np.diff(t) > 2)
        if len(jumps) == N - 1:  # all boundaries visible: depends on u, v only, not on the lengths
            l0.append(jumps[0] + 1)
    support = np.arange(1, L_c - N + 2)
    probs = np.array([math.comb(L_c - a - 1, N - 2) for a in support]) / math.comb(L_c - 1, N - 1)
    assert len(l0) > 0.8 * n and chi2_ok(l0, support, probs)


# ----------------------------------------------------------------------------- baselines

def test_randpos_distinct_sorted_and_every_position_equally_likely():
    L_c, L_t, L_x, n = 8, 32, 20, 4000
    rng = np.random.default_rng(7)
    hits, starts = np.zeros(L_t), []
    for _ in range(n):
        tok, pos = randpos(L_x, L_c, L_t, rng)
        assert tok.dtype == pos.dtype == np.int64 and len(pos) == len(tok) == L_c
        assert (np.diff(pos) > 0).all() and pos[0] >= 0 and pos[-1] < L_t
        assert (np.diff(tok) == 1).all()
        hits[pos] += 1
        starts.append(tok[0])
    # each position is kept with probability L_c / L_t (a uniform L_c-subset)
    sd = math.sqrt(n * L_c / L_t * (1 - L_c / L_t))
    assert np.abs(hits - n * L_c / L_t).max() < 5 * sd
    assert chi2_ok(starts, np.arange(L_x - L_c + 1))


def test_full_is_arange_with_contiguous_text():
    rng = np.random.default_rng(8)
    starts = []
    for _ in range(3000):
        tok, pos = full(30, 10, 10, rng)
        assert (pos == np.arange(10)).all() and (np.diff(tok) == 1).all() and tok[-1] < 30
        starts.append(tok[0])
    assert chi2_ok(starts, np.arange(21))


@pytest.mark.parametrize("name,args,kwargs,words", [
    ('pose', (10, 16, 64), {}, ['doc_len=10', 'train_len=16']),
    ('randpos', (10, 16, 64), {}, ['doc_len=10']),
    ('full', (100, 16, 8), {}, ['target_len=8', 'train_len=16']),
    ('pose', (100, 16, 8), {}, ['target_len=8']),
    ('pose', (100, 16, 64), {'num_chunks': 0}, ['num_chunks=0', 'train_len=16']),
    ('pose', (100, 16, 64), {'num_chunks': 17}, ['num_chunks=17']),
    ('pose', (100, 16, 64), {'content': 'random'}, ["content='random'"]),
    ('pose', (100, 16, 64), {'chunking': 'sequential'}, ["chunking='sequential'"]),
    ('pose', (100, 16, 64), {'chunking': 'official', 'num_chunks': 3}, ['num_chunks=3']),
])
def test_bad_arguments_raise_naming_the_values(name, args, kwargs, words):
    with pytest.raises(ValueError) as e:
        SAMPLERS[name](*args, np.random.default_rng(0), **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)
    # the same rejection before any draw, from check_options (train.py's check)
    if 'doc_len=10' not in words:
        with pytest.raises(ValueError) as e:
            check_options(name, *args[1:], **kwargs)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_check_options_accepts_what_the_samplers_draw_and_names_the_rest():
    for name, kwargs in [('pose', {}),
                         ('pose', {'num_chunks': 3, 'content': 'zero', 'chunking': 'paper'}),
                         ('pose', {'num_chunks': 2, 'chunking': 'official'}), ('randpos', {}),
                         ('full', {})]:
        check_options(name, 16, 64, **kwargs)
        # and the sampler draws with them
        SAMPLERS[name](16, 16, 64, np.random.default_rng(0), **kwargs)
    for args, kwargs, word in [(('fancy', 16, 64), {}, "method='fancy'"),
                               (('pose', 0, 64), {}, 'train_len=0'),
                               (('randpos', 16, 64), {'num_chunks': 2}, "'num_chunks'")]:
        with pytest.raises(ValueError, match=word):
            check_options(*args, **kwargs)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_seeding(name):
    a = SAMPLERS[name](5000, 64, 4096, np.random.default_rng(9))
    b = SAMPLERS[name](5000, 64, 4096, np.random.default_rng(9))
    c = SAMPLERS[name](5000, 64, 4096, np.random.default_rng(10))
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))


# ----------------------------------------------------------------------------- coverage

@pytest.mark.parametrize("name,options", [('pose', {'num_chunks': 2}), ('pose', {'num_chunks': 3}),
                                          ('pose', {'chunking': 'official'}), ('randpos', {})])
def test_every_distance_is_covered_given_enough_draws(name, options):
    L_c, L_t = 8, 32
    rng = np.random.default_rng(11)
    seen = set()
    for _ in range(1500):  # rarest distance L_t-1 has p = 1/(L_t-L_c+1) = 1/25 for N = 2
        seen |= brute_distances(SAMPLERS[name](L_t, L_c, L_t, rng, **options)[1])
    assert seen == set(range(1, L_t))


def test_one_chunk_covers_only_the_training_window():
    rng = np.random.default_rng(12)
    seen = set()
    for _ in range(50):
        seen |= brute_distances(pose(32, 8, 32, rng, num_chunks=1)[1])
    assert seen == set(range(1, 8))


def test_relative_distances_equals_the_pair_loop():
    rng = np.random.default_rng(13)
    cases = [pose(60, 12, 60, rng, num_chunks=N)[1] for N in (1, 2, 3, 5, 12) for _ in range(30)]
    cases += [randpos(60, 12, 60, rng)[1] for _ in range(30)]
    cases += [np.sort(rng.choice(60, size=k, replace=False))
              for k in (1, 2, 3, 30, 60) for _ in range(5)]
    for pos in cases:
        truth = np.zeros(60, bool)
        truth[list(brute_distances(pos))] = True
        for method in ('auto', 'intervals', 'fft'):
            assert (relative_distances(pos, 60, method=method) == truth).all(), (pos, method)
    for bad in ([3, 2], [0, 60], [-1, 4], [1, 1]):
        with pytest.raises(ValueError, match='target_len=60'):
            relative_distances(np.array(bad), 60)


@pytest.mark.parametrize("chunking", ['paper', 'official'])
def test_exact_two_chunk_coverage_equals_enumeration(chunking):
    # enumerate every equally likely (l_0, u_1) and brute-force its distances
    L_c, L_t = 7, 20
    l0s = range(1, L_c) if chunking == 'paper' else range(1, (L_c + 1) // 2 + 1)
    counts = np.zeros(L_t)
    for l0, u1 in product(l0s, range(L_t - L_c + 1)):
        pos = list(range(l0)) + [u1 + j for j in range(l0, L_c)]
        counts[list(brute_distances(pos))] += 1
    truth = counts / (len(l0s) * (L_t - L_c + 1))
    assert np.allclose(pose2_coverage_exact(L_c, L_t, chunking), truth, atol=1e-12)


def test_monte_carlo_curve_matches_exact():
    L_c, L_t, n = 8, 40, 3000
    exact = pose2_coverage_exact(L_c, L_t)
    mc = coverage_curve('pose', L_c, L_t, n, np.random.default_rng(14), num_chunks=2)
    se = np.sqrt(exact * (1 - exact) / n) + 1e-12
    assert mc.shape == (L_t,) and mc[0] == 0 and (np.abs(mc - exact) <= 5 * se).all()


def test_examples_to_cover_definition():
    rng = np.random.default_rng(15)
    p = np.concatenate(([0.0], rng.uniform(0.02, 1.0, size=50)))
    per, joint = examples_to_cover(p)
    q = 1 - p[1:]
    n = 1
    while not (1 - q ** n >= 0.99).all():  # per distance: P(seen at least once in n draws) >= 0.99
        n += 1
    assert per == n
    n = 1
    while (q ** n).sum() > 0.01:            # union bound: P(any distance unseen) <= 0.01
        n += 1
    assert joint == n
    assert examples_to_cover(np.array([0.0, 0.5, 0.0, 0.3])) == (math.inf, math.inf)
    assert examples_to_cover(np.array([0.0, 1.0, 1.0])) == (1, 1)


def test_draws_per_second_is_draws_over_cpu_seconds():
    """The real clock: a counting sampler runs for at least `seconds` of this process's CPU time,
    and the rate lies between its draws over that budget and its draws over the CPU time the whole
    call took (measured here, around it); options and the default doc_len reach the sampler."""
    calls = []

    def sampler(doc_len, train_len, target_len, rng, **options):
        calls.append((doc_len, train_len, target_len, options))
        SAMPLERS['pose'](doc_len, train_len, target_len, rng, **options)
    t0 = time.process_time()
    r = draws_per_second(sampler, 64, 1024, seconds=0.05, num_chunks=3)
    cpu = time.process_time() - t0
    n = len(calls)
    assert n > 0 and n / cpu <= r <= n / 0.05
    assert all(c == (1024, 64, 1024, {'num_chunks': 3}) for c in calls)  # doc_len: target_len
    for name in SAMPLERS:
        assert 0 < draws_per_second(name, 64, 1024, seconds=0.01) < math.inf


# ----------------------------------------------------------------------------- CLI

def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'sample_positions.py'), *args],
                          cwd=cwd, capture_output=True, text=True)


def test_cli_table_and_plot(tmp_path):
    png = tmp_path / 'coverage.png'
    proc = run_cli('--train_len=16', '--target_len=96', '--draws=100', '--speed_seconds=0.02',
                   f'--plot={png}', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for word in ('N=1', 'N=2', 'N=3', 'RandPos', '[1, 16)', '[80, 96)', 'draws/s', '99%'):
        assert word in proc.stdout, word
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert sorted(os.listdir(tmp_path)) == ['coverage.png']  # no temp file left behind


@pytest.mark.parametrize("args,word", [(['--train_len=64', '--target_len=32'], 'target_len=32'),
                                       (['--draws=0'], 'draws=0'), (['--plot=x.jpg'], 'x.jpg')])
def test_cli_bad_input(args, word):
    proc = run_cli(*args)
    assert proc.returncode == 2 and proc.stderr.startswith('error:') \
        and word in proc.stderr, proc.stderr
