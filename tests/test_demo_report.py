"""demo/mini_report.py: the base check and selection stages, and the report stage (passkey counts
with 95% Wilson intervals, paired tests of PoSE vs Contiguous, claims) on hand-made eval JSONs whose
expected figures are computed here by hand: Wilson intervals as the roots of their defining
quadratic, exact McNemar and Wilcoxon p-values counted out over the binomial / sign patterns."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from demo import mini_report  # noqa: E402  (runs nothing on import: tests set its config)
from errors import UserError  # noqa: E402
Z = 1.96  # the 95% normal quantile of a Wilson interval


def wilson_roots(k, n):
    """The 95% Wilson interval from its definition: the p with (k/n - p)^2 = Z^2 p (1 - p) / n."""
    ph = k / n
    lo, hi = sorted(np.roots([1 + Z * Z / n, -(2 * ph + Z * Z / n), ph * ph]).real)
    return lo, hi


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f)


def passkey_json(by_length, seed=7):
    """eval_passkey's JSON from {L: (passes, key log-likelihoods)}: trial i of every length has key
    10000 + i and depth i / 10, so two methods' JSONs hold the same (paired) trials."""
    trials = [{'length': L, 'key': str(10000 + i), 'depth_requested': i / 10, 'pass': bool(p),
               'key_logprob': lp}
              for L, (ps, lps) in by_length.items() for i, (p, lp) in enumerate(zip(ps, lps))]
    return {'accuracy': {str(L): sum(ps) / len(ps) for L, (ps, _) in by_length.items()},
            'trials': trials, 'settings': {'seed': seed, 'num_trials': 10}}


ALL, NONE = [1] * 10, [0] * 10
FLAT = [-1.0] * 10
PAST = (256, 384, 512)  # the lengths past L_c = 128
# seed 1 past L_c: PoSE passes 9 of 10, Contiguous 3 (trials 6-8); discordant 6 vs 0. Key
# log-likelihoods d = PoSE - Contiguous = 1, 2, 3, 4, 5, 6, 0, 0, 0, 0
POSE1 = ([1] * 9 + [0], [-1.0] * 9 + [-5.0])
CONTIG1 = ([0] * 6 + [1, 1, 1, 0], [-2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -1.0, -1.0, -1.0, -5.0])
# seed 2 past L_c: PoSE passes trials 0-2, Contiguous trial 9; discordant 3 vs 1;
# d = 1, 2, 3, 4, 5, -6, 0, 0, 0, 0
POSE2 = ([1, 1, 1] + [0] * 7, [-1.0] * 5 + [-7.0] + [-3.0] * 4)
CONTIG2 = ([0] * 9 + [1], [-2.0, -3.0, -4.0, -5.0, -6.0, -1.0] + [-3.0] * 4)
# exact two-sided p-values by hand
P_MCNEMAR_6_0 = 2 * 1 / 2 ** 6  # B(6, 1/2): P(X <= 0), doubled
P_MCNEMAR_3_1 = 2 * (1 + 4) / 2 ** 4  # B(4, 1/2): P(X <= 1), doubled
P_MCNEMAR_9_1 = 2 * (1 + 10) / 2 ** 10  # pooled: B(10, 1/2): P(X <= 1), doubled
P_WILCOXON_ALL_POSITIVE_6 = 2 * 1 / 2 ** 6  # ranks 1..6 all positive: T+ = 21, the one such pattern
# ranks 1..5 positive, 6 negative: T+ = 15; subsets of {1..6} with sum >= 15 = those with sum <= 6
# (complements): {}, 6 singletons, {1,2} {1,3} {1,4} {1,5} {2,3} {2,4}, {1,2,3} = 14 of 64, doubled
P_WILCOXON_T15 = 2 * 14 / 2 ** 6


def make_fixture(root, seed2=True):
    """Two extension seeds (1 and 2) of every method on one base; L_c = 128 -> L_t = 512."""
    pk_base = {'original': {128: (ALL, FLAT), **{L: (NONE, [-9.0] * 10) for L in PAST}},
               'pi': {L: (NONE, [-9.0] * 10) for L in (128,) + PAST}}
    for m, d in pk_base.items():
        write(os.path.join(root, f'passkey-{m}.json'), passkey_json(d))
    write(os.path.join(root, 'ppl-original.json'), {'ppl': {'128': 10.0, '512': 40.0}})
    write(os.path.join(root, 'ppl-pi.json'), {'ppl': {'128': 30.0, '512': 30.0}})
    write(os.path.join(root, 'base.json'),
          {'model': '/x/original/hf', 'sha256': 'ab' * 32, 'pretrain_seed': 3})
    write(os.path.join(root, 'probe-passkey.json'),
          {'passed': {'128': 9}, 'count': {'128': 10}, 'settings': {'seed': 1007}})
    probe = {'passed': 5, 'count': 10, 'accuracy': 0.5, 'wilson95': list(wilson_roots(5, 10))}
    write(os.path.join(root, 'selection.json'),
          {'min_probe': 0.9, 'retrieves': True, 'chosen': root,
           'candidates': [{'dir': '/other', 'pretrain_seed': None, 'probe': probe},
                          {'dir': root, 'pretrain_seed': 3, 'probe': {**probe, 'passed': 9}}]})
    seeds = {1: (POSE1, CONTIG1, {'128': 10.5, '512': 10.4}, {'128': 10.0, '512': 30.0}, NONE),
             2: (POSE2, CONTIG2, {'128': 14.4, '512': 10.4}, {'128': 10.0, '512': 9.0},
                 [1] + [0] * 9)}
    for s, (pose, contig, ppl_pose, ppl_contig, randpos512) in seeds.items():
        if s == 2 and not seed2:
            continue
        d = os.path.join(root, f'seed-{s}')
        pk = {'pose': {128: (ALL, FLAT), **{L: pose for L in PAST}},
              'contig': {128: (ALL, FLAT), **{L: contig for L in PAST}},
              'full': {L: (ALL, FLAT) for L in (128,) + PAST},
              'randpos': {**{L: (NONE, FLAT) for L in (128, 256, 384)}, 512: (randpos512, FLAT)}}
        for m in pk:
            write(os.path.join(d, f'passkey-{m}.json'), passkey_json(pk[m]))
        ppl = {'pose': ppl_pose, 'contig': ppl_contig, 'full': {'128': 11.0, '512': 10.0},
               'randpos': {'128': 14.0, '512': 16.0}}
        for m in ppl:
            write(os.path.join(d, f'ppl-{m}.json'), {'ppl': ppl[m]})


def stage(monkeypatch, capsys, **config):
    """Run one stage of mini_report in this process with `config` set; its stdout."""
    for k, v in config.items():
        monkeypatch.setattr(mini_report, k, v)
    mini_report.main()
    return capsys.readouterr().out


def report(monkeypatch, capsys, root, seeds):
    return stage(monkeypatch, capsys, stage='report', out_dir=str(root), seeds=seeds, train_len=128,
                 target_len=512)


def verdicts(lines):
    """{claim: marks} from the report's claim lines."""
    ends = ('seed', 'unmeasured', 'holds', 'fails')
    return {line[8:].split('  ')[0].strip(): line.split()[0] for line in lines
            if line.startswith('  ') and line.rstrip().endswith(ends)}


def test_report_counts_intervals_paired_tests_and_claims(tmp_path, monkeypatch, capsys):
    make_fixture(str(tmp_path))
    out = report(monkeypatch, capsys, tmp_path, '1 2')
    lines = out.splitlines()
    assert 'ab' * 32 in out and 'pretraining seed 3' in out
    lo, hi = wilson_roots(9, 10)
    assert f'eval_passkey seed 1007): 9/10 = 0.90 [95% Wilson {lo:.2f}-{hi:.2f}]' in out
    assert 'eval_passkey seed 7 for every method' in out
    assert 'chosen of 2 candidates, the first with a probe >= 0.9:' in out
    assert '/other (pretraining seed ?): 5/10 = 0.50 [95% Wilson' in out
    # the pooled passkey table: the base's trials once (10), an extension method's over 2 seeds (20)
    table = lines[next(i for i, line in enumerate(lines) if line.startswith('Passkey retrieval')):]
    orig = next(line for line in table if line.startswith('Original'))
    lo, hi = wilson_roots(10, 10)
    assert f'10/10 [{lo:.2f}-{hi:.2f}]' in orig and '0/10 [' in orig
    pose = next(line for line in table if line.startswith('PoSE'))
    lo, hi = wilson_roots(12, 20)  # 9 + 3 passes at 256
    assert pose.split('  ')[0] == 'PoSE' and f'12/20 [{lo:.2f}-{hi:.2f}]' in pose
    assert 'PoSE s2' in out
    # ppl: a base row's one value, an extension row's mean (min-max) over the seeds
    ppl = lines[next(i for i, line in enumerate(lines) if line.startswith('Perplexity')) + 2:]
    assert ppl[0].split() == ['Original', '10.00', '40.00']
    pose_ppl = next(line for line in ppl if line.startswith('PoSE'))
    assert '12.45 (10.50-14.40)' in pose_ppl  # (10.5 + 14.4) / 2
    v = verdicts(lines)
    assert v['Base (Original) passkey >= 0.9 at L_c'] == '++'
    assert v['PoSE passkey >= 0.9 at every length up to 3 L_c'] == '+-'  # 0.9; 0.3
    # p 0.031; 0.63 and 0.44
    assert v['PoSE above Contiguous at each length past L_c (p < 0.05)'] == '+-'
    assert v['... the same, pooled over the seeds'] == '+'  # McNemar 9 vs 1: p 0.021
    at = next(i for i, line in enumerate(lines) if 'PoSE above Contiguous at each' in line)
    assert '... the same, pooled over the seeds' in lines[at + 1]  # under the claim it pools
    assert v['Full-length passkey >= 0.9 at every length'] == '++'
    assert v['RandPos passkey at L_t <= PoSE - 0.3'] == '+-'  # 0 <= 0.9 - 0.3; 0.1 > 0.3 - 0.3
    assert v['Contiguous ppl at L_t above PoSE'] == '+-'  # 30 > 10.4; 9 < 10.4
    assert v['PoSE ppl at L_c within 10% of Original'] == '+-'  # 10.5 <= 11; 14.4 > 11
    assert v['Original ppl rises past L_c (L_t > L_c)'] == '++'
    res = json.load(open(tmp_path / 'results.json'))
    assert res['seeds'] == [1, 2] and res['base']['sha256'] == 'ab' * 32
    assert res['pooled']['pose']['passed']['256'] == 12
    assert res['pooled']['pose']['count']['256'] == 20
    assert res['pooled']['original']['count']['128'] == 10
    assert np.allclose(res['pooled']['pose']['wilson95']['256'], wilson_roots(12, 20))
    assert np.allclose(res['runs']['1']['contig']['wilson95']['384'], wilson_roots(3, 10))
    paired = res['paired_pose_vs_contig']
    for L in map(str, PAST):
        s1, s2, pooled = paired['1'][L], paired['2'][L], paired['pooled'][L]
        assert s1['passed'] == [9, 3] and s1['discordant'] == [6, 0] and s2['discordant'] == [3, 1]
        assert math.isclose(s1['mcnemar_p'], P_MCNEMAR_6_0)
        assert math.isclose(s2['mcnemar_p'], P_MCNEMAR_3_1)
        assert math.isclose(s1['wilcoxon_p'], P_WILCOXON_ALL_POSITIVE_6) and s1['wilcoxon_n'] == 6
        assert math.isclose(s2['wilcoxon_p'], P_WILCOXON_T15) and s2['wilcoxon_n'] == 6
        assert math.isclose(s1['mean_dlogp'], 21 / 10) and math.isclose(s2['mean_dlogp'], 9 / 10)
        assert pooled['discordant'] == [9, 1] and math.isclose(pooled['mcnemar_p'], P_MCNEMAR_9_1)
        assert pooled['wilcoxon_n'] == 12  # the 8 zero differences dropped
    assert '128' not in paired['1']  # L_c itself is not past L_c
    # PoSE vs Full-length (every trial passes, key log-lik. -1), pooled: passes 12 vs 20, so 8
    # discordant pairs all Full-length's; d = 0 except seed 1's trial 9 (-4), seed 2's trial 5 (-6)
    # and trials 6-9 (-2 each): 6 nonzero, sum -18
    full = res['paired_pose_vs_pooled']['full']
    for L in map(str, PAST):
        assert full[L]['passed'] == [12, 20] and full[L]['discordant'] == [0, 8]
        assert math.isclose(full[L]['mcnemar_p'], 2 / 2 ** 8)  # B(8, 1/2): P(X <= 0), doubled
        assert full[L]['wilcoxon_n'] == 6 and math.isclose(full[L]['mean_dlogp'], -18 / 20)
    row = next(line for line in lines if line.startswith('Full-length') and ' 512 ' in line)
    assert row.split()[1:6] == ['512', '12/20', '20/20', '0', '8']
    assert res['claim_pooled_pose_above_contig'] is True
    assert os.path.isfile(tmp_path / 'results.txt')


def test_report_one_seed_and_unpaired_trials(tmp_path, monkeypatch, capsys):
    """One seed: no pooled rows; a Contiguous eval on other keys (another eval_passkey seed) is
    refused in one line (the script's own exit), since its trials cannot be paired with PoSE's."""
    make_fixture(str(tmp_path), seed2=False)
    out = report(monkeypatch, capsys, tmp_path, '1')
    assert 'pooled' not in out and 'PoSE s1' not in out
    row = next(line for line in out.splitlines() if line.startswith('1') and '256' in line)
    assert row.split()[:6] == ['1', '256', '9/10', '3/10', '6', '0']
    bad = passkey_json({256: CONTIG1})
    bad['trials'][0]['key'] = '99999'
    write(str(tmp_path / 'seed-1' / 'passkey-contig.json'), bad)
    out = subprocess.run([sys.executable, 'demo/mini_report.py', '--stage=report',
                          f'--out_dir={tmp_path}', '--seeds=1'],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and 'same passkey trials' in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and 'Traceback' not in out.stderr


def test_base_dir_named_by_sha256_and_checked(tmp_path, monkeypatch, capsys):
    model = tmp_path / 'base'
    model.mkdir()
    (model / 'config.json').write_text('{}')
    (model / 'model.safetensors').write_bytes(b'abc')
    sha = 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'  # SHA-256("abc")
    o = str(tmp_path / 'o')

    def base(**config):
        return stage(monkeypatch, capsys, stage='base', base=str(model), out_dir=o, **config)
    d = base(pretrain_seed=3).splitlines()[-1]
    assert d == os.path.join(o, f'base-{sha[:12]}')
    info = json.load(open(os.path.join(d, 'base.json')))
    assert info == {'model': str(model), 'sha256': sha, 'pretrain_seed': 3}
    base(pretrain_seed=-1)  # the same weights, their seed not given: the known one is kept
    assert json.load(open(os.path.join(d, 'base.json')))['pretrain_seed'] == 3
    (model / 'model.safetensors.sha256').write_text(f'{sha}  model.safetensors\n')  # sha256sum
    assert base().splitlines()[-1] == d
    (model / 'model.safetensors').write_bytes(b'abd')  # the weights changed under their checksum
    with pytest.raises(UserError, match=sha):
        base()
    with pytest.raises(UserError, match='not a model dir'):
        stage(monkeypatch, capsys, base=str(tmp_path / 'nothing'))


def candidate(root, name, passed, count=30, seed=1007):
    d = os.path.join(root, name)
    write(os.path.join(d, 'base.json'),
          {'model': f'/m/{name}', 'sha256': name * 32, 'pretrain_seed': 1})
    write(os.path.join(d, 'probe-passkey.json'),
          {'passed': {'128': passed}, 'count': {'128': count}, 'settings': {'seed': seed}})
    return d


def test_select_the_first_base_that_retrieves(tmp_path, monkeypatch, capsys):
    def select(dirs):
        return stage(monkeypatch, capsys, stage='select', base_dirs=' '.join(dirs), eval_seed=7)
    dirs = [candidate(str(tmp_path), n, k) for n, k in (('aa', 20), ('bb', 28), ('cc', 30))]
    out = select(dirs)
    assert out.splitlines()[-1] == f'selected: {dirs[1]}'  # 28/30 = 0.93 >= 0.9 comes before 30/30
    lo, hi = wilson_roots(20, 30)
    assert f'20/30 = 0.67 [95% Wilson {lo:.2f}-{hi:.2f}]' in out
    sel = json.load(open(os.path.join(dirs[1], 'selection.json')))
    assert sel['retrieves'] and [c['dir'] for c in sel['candidates']] == dirs
    low = [candidate(str(tmp_path), n, k) for n, k in (('dd', 5), ('ee', 12), ('ff', 12))]
    out = select(low)
    assert out.splitlines()[-1] == f'selected: {low[1]}'  # none retrieves: the best, first of ties
    assert 'warning: no base reaches' in out
    assert not json.load(open(os.path.join(low[1], 'selection.json')))['retrieves']
    with pytest.raises(UserError, match='eval_passkey seed 7'):  # a probe on the evaluation's keys
        select([candidate(str(tmp_path), 'gg', 30, seed=7)])
    with pytest.raises(UserError, match='no base.json'):  # a dir that stage base never made
        select([str(tmp_path)])


def test_rehearsal_takes_the_leading_passkey_prompts_at_the_share(tmp_path, monkeypatch, capsys):
    """9 stdlib pieces, 4 passkey prompts then 2 drills: a share of 1/4 is 3 prompts (3 of 12
    drawn documents), the first three; a share that needs more prompts than lead is refused."""
    src = str(tmp_path)
    python = [f'def f{i}(): pass' for i in range(9)]
    prompts = [f'the pass key is {k}. What is the pass key? {k}' for k in range(4)]
    for name, texts in (('python_short', python), ('passkey_short', prompts + ['a b a b'] * 2)):
        with open(os.path.join(src, name + '.jsonl'), 'w') as f:
            f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
    stage(monkeypatch, capsys, stage='rehearsal', src_dir=src, ext_passkey=0.25)
    with open(os.path.join(src, 'passkey_ext.jsonl')) as f:
        assert [json.loads(line)['text'] for line in f] == prompts[:3]
    for share in (0.5, 0.0):  # 9 prompts: the drills lead after 4; 0: nothing to write
        with pytest.raises(UserError, match=f'ext_passkey={share}'):
            stage(monkeypatch, capsys, stage='rehearsal', src_dir=src, ext_passkey=share)


def test_missing_input_is_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    """Stage passkey before stage sources: one line naming the missing file, exit 2; a report with
    no results of its rows: one line. A bad file's contents that the code does not check (a ppl
    JSON without 'ppl') is a traceback."""
    def script(*args):
        return subprocess.run([sys.executable, 'demo/mini_report.py', *args], cwd=ROOT,
                              capture_output=True, text=True)
    out = script('--stage=passkey', f'--src_dir={tmp_path}', '--tokenizer=' + __file__)
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    assert 'python_train.jsonl not found' in out.stderr
    write(str(tmp_path / 'ppl-pose.json'), {'settings': {}})
    out = script('--stage=report', f'--out_dir={tmp_path}', '--seeds=1', '--methods=original')
    assert out.returncode == 2 and 'Traceback' not in out.stderr  # no results of the rows asked
    write(str(tmp_path / 'ppl-original.json'), {'settings': {}})
    out = script('--stage=report', f'--out_dir={tmp_path}', '--seeds=1', '--methods=original')
    assert out.returncode == 1 and 'Traceback' in out.stderr and "KeyError: 'ppl'" in out.stderr


# ---- the pure functions against hand-computed values ----


def test_cell_is_the_mean_then_min_max():
    assert mini_report.cell([10.0, 12.0, 17.0], '.2f', True) == '13.00 (10.00-17.00)'  # 39 / 3
    assert mini_report.cell([0.25], '.2f', False) == '0.25'
    assert mini_report.cell([812.4, 790.0], '.0f', False) == '801'  # one seed's layout: the mean
    assert mini_report.cell([], '.2f', True) == '-'


def test_passkey_cell_counts_and_wilson():
    ts = [{'pass': p} for p in [True] * 4 + [False]]
    lo, hi = wilson_roots(4, 5)
    assert mini_report.passkey_cell(ts) == f'4/5 [{lo:.2f}-{hi:.2f}]'
    assert mini_report.passkey_cell(ts) == '4/5 [0.38-0.96]'  # the interval quoted for 4/5 trials
    assert mini_report.passkey_cell([]) == '-'


def test_verdict_of_the_marks():
    assert mini_report.verdict('+++') == 'holds for every seed'
    assert mini_report.verdict('+-+') == mini_report.verdict('-?') == 'fails for some seed'
    assert mini_report.verdict('+?') == mini_report.verdict('??') == 'unmeasured'


def test_pose_above_needs_direction_and_significance():
    t = {'discordant': [6, 0], 'mcnemar_p': P_MCNEMAR_6_0}
    assert mini_report.pose_above(t)
    # Contiguous above
    assert not mini_report.pose_above({'discordant': [0, 6], 'mcnemar_p': P_MCNEMAR_6_0})
    assert not mini_report.pose_above({'discordant': [3, 1], 'mcnemar_p': P_MCNEMAR_3_1})
    # verdicts tied, log-likelihoods apart: either test counts
    assert mini_report.pose_above({'discordant': [0, 0], 'mcnemar_p': 1.0, 'mean_dlogp': 2.1,
                                   'wilcoxon_p': P_WILCOXON_ALL_POSITIVE_6})
    assert not mini_report.pose_above({'discordant': [0, 0], 'mcnemar_p': 1.0, 'mean_dlogp': -2.1,
                                       'wilcoxon_p': P_WILCOXON_ALL_POSITIVE_6})
    assert mini_report.above({}) is None


def test_claims_by_hand(monkeypatch):
    """L_c = 128, L_t = 512: a passkey length counts for L when 0.95 L < length <= L (509 does, 480
    does not)."""
    monkeypatch.setattr(mini_report, 'train_len', 128)
    monkeypatch.setattr(mini_report, 'target_len', 512)
    run = {'original': {'passkey': {127: 0.9, 509: 0.2}, 'ppl': {128: 10.0, 512: 10.01}},
           'pi': {'passkey': {480: 0.0}},  # no length near 512: not measured
           'randpos': {'passkey': {127: 1.0, 509: 0.5}, 'ppl': {128: 11.0, 512: 12.0}},
           'contig': {'ppl': {512: 10.5}},
           'full': {'passkey': {127: 1.0, 509: 0.89}, 'ppl': {512: 10.0}},
           'pose': {'passkey': {127: 1.0, 255: 0.95, 383: 0.9, 509: 0.5},
                    'ppl': {128: 11.5, 512: 10.5}}}
    sig = {'discordant': [6, 0], 'mcnemar_p': P_MCNEMAR_6_0}
    got = dict(mini_report.claims(run, {255: sig, 383: sig, 509: {'discordant': [3, 1],
                                                                   'mcnemar_p': P_MCNEMAR_3_1}}))
    assert got == {
        'Base (Original) passkey >= 0.9 at L_c': True,                   # 0.9 >= 0.9
        'PoSE passkey >= 0.9 at every length up to 3 L_c': True,         # min(1.0, 0.95, 0.9)
        'PoSE above Contiguous at each length past L_c (p < 0.05)': False,  # 509: p = 0.625
        'PoSE passkey >= 0.9 at every length up to L_t': False,          # 0.5 at 509
        'Full-length passkey >= 0.9 at every length': False,             # 0.89
        'Original passkey <= 0.2 at L_t': True,                          # 0.2
        'YaRN-only (no training) passkey <= 0.2 at L_t': None,           # 480 is not near 512
        'RandPos passkey at L_t <= PoSE - 0.3': False,                   # 0.5 > 0.5 - 0.3
        'Original ppl rises past L_c (L_t > L_c)': True,                 # 10.01 > 10.0
        'Contiguous ppl at L_t above PoSE': False,                       # 10.5 = 10.5
        'PoSE ppl at L_t within 5% of Full-length': True,                # 10.5 <= 10.5
        'RandPos ppl at L_t above PoSE': True,                           # 12 > 10.5
        'PoSE ppl at L_c within 10% of Original': False,                 # 11.5 > 1.1 * 10.0
    }


def test_report_refuses_a_dir_without_results(tmp_path):
    """A mistyped out_dir (missing, or holding no eval JSONs): one line, exit 2, no report."""
    for d in (tmp_path / 'missing', tmp_path):
        r = subprocess.run([sys.executable, 'demo/mini_report.py', '--stage=report',
                            f'--out_dir={d}'], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and str(d) in r.stderr
        assert not os.path.exists(os.path.join(d, 'results.txt'))
