"""demo_report.py's report stage: per-cell mean (min-max) over seeds and the claims verdicts, checked on
hand-made eval JSONs whose expected figures are computed here by hand."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f)


def passkey(acc):
    trials = [{'length': int(L), 'answer_ids': [1, 2], 'pred_ids': [1, 2] if a == 1.0 else [1, 9]}
              for L, a in acc.items()]
    return {'accuracy': acc, 'trials': trials, 'settings': {'num_trials': 1}}


def test_report_mean_minmax_and_claims(tmp_path):
    # seed 1: every claim holds; seed 2: PoSE misses 0.9 at 512 and its ppl at L_c is 20% above the Original
    pk = {1: {'original': {'128': 1.0, '512': 0.0}, 'pi': {'128': 0.0, '512': 0.0}, 'randpos': {'128': 0.0, '512': 0.0},
              'full': {'128': 1.0, '512': 1.0}, 'pose': {'128': 1.0, '512': 1.0}},
          2: {'original': {'128': 1.0, '512': 0.0}, 'pi': {'128': 0.0, '512': 0.0}, 'randpos': {'128': 0.0, '512': 0.0},
              'full': {'128': 1.0, '512': 1.0}, 'pose': {'128': 1.0, '512': 0.0}}}
    ppl = {1: {'original': {'128': 10.0, '512': 40.0}, 'pi': {'128': 30.0, '512': 30.0},
               'randpos': {'128': 14.0, '512': 16.0}, 'full': {'128': 11.0, '512': 10.0},
               'pose': {'128': 10.5, '512': 10.4}},
           2: {'original': {'128': 12.0, '512': 50.0}, 'pi': {'128': 30.0, '512': 30.0},
               'randpos': {'128': 14.0, '512': 16.0}, 'full': {'128': 11.0, '512': 10.0},
               'pose': {'128': 14.4, '512': 10.4}}}
    for s in (1, 2):
        for m in pk[s]:
            write(str(tmp_path / f'seed-{s}' / f'passkey-{m}.json'), passkey(pk[s][m]))
            write(str(tmp_path / f'seed-{s}' / f'ppl-{m}.json'), {'ppl': ppl[s][m]})
    out = subprocess.run([sys.executable, 'demo_report.py', '--stage=report', f'--out_dir={tmp_path}',
                          '--seeds=1 2', '--train_len=128', '--target_len=512'],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    row = next(line for line in lines if line.startswith('Original') and '(' in line)  # the ppl table comes first
    assert '11.00 (10.00-12.00)' in row and '45.00 (40.00-50.00)' in row  # mean (min-max) of 10/12 and 40/50
    pose_pk = [line for line in lines if line.startswith('PoSE')][1]  # second PoSE row: passkey accuracy
    assert '0.50 (0.00-1.00)' in pose_pk
    verdict = {line[8:].split('  ')[0].strip(): line.split()[0] for line in lines if line.startswith('  ') and
               ('holds' in line or 'fails' in line or 'unmeasured' in line)}
    assert verdict['Original passkey >= 0.9 at L_c'] == '++'
    assert verdict['PoSE passkey >= 0.9 at every length up to L_t'] == '+-'
    assert verdict['PoSE ppl at L_c within 10% of Original'] == '+-'  # 10.5 <= 11.0; 14.4 > 13.2
    assert verdict['PoSE ppl at L_t within 5% of Full-length'] == '++'  # 10.4 <= 10.5
    assert verdict['RandPos passkey at L_t <= PoSE - 0.3'] == '+-'  # 0 <= 1 - 0.3; 0 > 0 - 0.3
    assert verdict['Original ppl rises past L_c (L_t > L_c)'] == '++'
    assert json.load(open(tmp_path / 'results.json'))['seeds'] == [1, 2]


# ---- the pure functions, imported (demo_report runs nothing on import), against hand-computed values ----
sys.path.insert(0, ROOT)
import demo_report  # noqa: E402


def test_cell_is_the_mean_then_min_max():
    assert demo_report.cell([10.0, 12.0, 17.0], '.2f', True) == '13.00 (10.00-17.00)'  # (10 + 12 + 17) / 3
    assert demo_report.cell([0.25], '.2f', False) == '0.25'
    assert demo_report.cell([812.4, 790.0], '.0f', False) == '801'  # one seed's layout: the mean only
    assert demo_report.cell([], '.2f', True) == '-'


def test_verdict_of_the_marks():
    assert demo_report.verdict('+++') == 'holds for every seed'
    assert demo_report.verdict('+-+') == demo_report.verdict('-?') == 'fails for some seed'
    assert demo_report.verdict('+?') == demo_report.verdict('??') == 'unmeasured'


def test_claims_by_hand(monkeypatch):
    """L_c = 128, L_t = 512: a passkey length counts for L when 0.95 L < length <= L (509 does, 480 does not)."""
    monkeypatch.setattr(demo_report, 'train_len', 128)
    monkeypatch.setattr(demo_report, 'target_len', 512)
    run = {'original': {'passkey': {127: 0.9, 509: 0.2}, 'ppl': {128: 10.0, 512: 10.01}},
           'pi': {'passkey': {480: 0.0}},  # no length near 512: not measured
           'randpos': {'passkey': {127: 1.0, 509: 0.5}, 'ppl': {128: 11.0, 512: 12.0}},
           'full': {'passkey': {127: 1.0, 509: 0.89}, 'ppl': {512: 10.0}},
           'pose': {'passkey': {127: 1.0, 509: 0.9}, 'ppl': {128: 11.5, 512: 10.5}}}
    got = dict(demo_report.claims(run))
    assert got == {
        'Original passkey >= 0.9 at L_c': True,                    # 0.9 >= 0.9
        'PoSE passkey >= 0.9 at every length up to L_t': True,     # min(1.0, 0.9)
        'Full-length passkey >= 0.9 at every length': False,       # 0.89
        'Original passkey <= 0.2 at L_t': True,                    # 0.2
        'YaRN-only (no training) passkey <= 0.2 at L_t': None,     # 480 is not near 512
        'RandPos passkey at L_t <= PoSE - 0.3': True,              # 0.5 <= 0.9 - 0.3
        'Original ppl rises past L_c (L_t > L_c)': True,           # 10.01 > 10.0
        'PoSE ppl at L_t within 5% of Full-length': True,          # 10.5 <= 10.5
        'RandPos ppl at L_t above PoSE': True,                     # 12 > 10.5
        'PoSE ppl at L_c within 10% of Original': False,           # 11.5 > 1.1 * 10.0
    }


def test_report_lines_by_hand(monkeypatch):
    monkeypatch.setattr(demo_report, 'train_len', 128)
    monkeypatch.setattr(demo_report, 'target_len', 512)
    runs = {1: {'original': {'ppl': {128: 10.0, 512: 40.0}}, 'pose': {'ppl': {128: 9.0}, 'step_ms': {0: 100.0}}},
            2: {'original': {'ppl': {128: 14.0}}, 'pose': {'ppl': {128: 11.0, 512: 20.0}, 'step_ms': {0: 300.0}}}}
    lines, per_seed = demo_report.report_lines(runs, ['original', 'pose'])
    assert lines[0] == 'nanoPoSE demo, L_c = 128 -> L_t = 512, 2 seeds (1 2): mean (min-max)'
    orig = lines[lines.index('Perplexity on held-out stdlib files (eval_ppl.py), window length L:') + 2]
    assert orig.split() == ['Original', '12.00', '(10.00-14.00)', '40.00', '(40.00-40.00)']  # 512: seed 1 only
    pose_ms = [line for line in lines if line.startswith('PoSE')][-1]
    assert pose_ms.split() == ['PoSE', '200', '(100-300)']
    assert not any(line.startswith('Passkey') for line in lines)  # no passkey JSONs: no passkey sections
    claim = next(line for line in lines if 'Original ppl rises past L_c' in line)
    assert claim.split()[0] == '+?' and claim.endswith('unmeasured')  # seed 2 has no ppl at 512
    assert set(per_seed) == {1, 2}


def test_claims_over_the_seeds_whose_original_retrieves(monkeypatch):
    """Seed 1's Original retrieves at L_c, seed 2's does not: the claims are listed once over both seeds and once
    over seed 1 alone; when every seed (or none) retrieves, there is no second list."""
    monkeypatch.setattr(demo_report, 'train_len', 128)
    monkeypatch.setattr(demo_report, 'target_len', 512)
    pk = lambda a, b: {'passkey': {128: a, 512: b}}  # noqa: E731
    runs = {1: {'original': pk(0.95, 0.0), 'pose': pk(1.0, 0.9)}, 2: {'original': pk(0.1, 0.0), 'pose': pk(0.2, 0.1)}}
    lines, _ = demo_report.report_lines(runs, ['original', 'pose'])
    head = 'Claims over the seeds whose Original retrieves at L_c (passkey >= 0.9): 1'
    assert lines.count(head) == 1
    pose = [line.split()[0] for line in lines if 'PoSE passkey >= 0.9 at every length' in line]
    assert pose == ['+-', '+']  # both seeds; then seed 1 alone
    after = lines[lines.index(head) + 1:]
    assert not any('Original passkey >= 0.9 at L_c' in line for line in after)  # true by selection: not repeated
    runs[2] = runs[1]
    assert not any(line.startswith('Claims over') for line in demo_report.report_lines(runs, ['original', 'pose'])[0])
