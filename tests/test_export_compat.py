"""Our exports read alike in the transformers lines people run: every RoPE type we write, saved by
our save_pretrained and loaded by transformers 4.45.2 (its own venv, .venv-hf445, in a subprocess)
and by the installed 5.x, gives our model's logits (< TOL, fp32) at positions past the original
window. The reference is transformers; export_lint's claims are checked against what the two lines
really do. (vLLM is reasoned from its source only: README, "Exported RoPE configs".)"""
import json
import os
import shutil
import subprocess

import pytest
import torch

from hf_logits import hf_logits
from hf_checkpoint import save_pretrained
from model import ModelArgs, Transformer
from rope import export_lint
from conftest import TOL, VOCAB, idx_for, positions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIG, MPE = 32, 128  # the original window, and 4x it
LONG, SHORT = [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0], [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]
CASES = {  # name: (our rope_scaling, max_position_embeddings)
    'default': (None, MPE),
    'linear': ({'rope_type': 'linear', 'factor': 4.0}, MPE),
    # grows past max_position_embeddings
    'dynamic': ({'rope_type': 'dynamic', 'factor': 4.0}, ORIG),
    'ntk': ({'rope_type': 'ntk', 'factor': 4.0}, ORIG),
    'yarn': ({'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': ORIG}, MPE),
    'yarn_attn': ({'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': ORIG,
                   'attention_factor': 1.3, 'beta_fast': 16, 'beta_slow': 2}, MPE),
    # 5.x-only keys
    'yarn_mscale': ({'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': ORIG,
                     'mscale': 1.0, 'mscale_all_dim': 0.5, 'truncate': False}, MPE),
    'yarn_pose': ({'rope_type': 'yarn_pose', 'factor': 4.0,
                   'original_max_position_embeddings': ORIG}, MPE),
    'llama3': ({'rope_type': 'llama3', 'factor': 4.0, 'low_freq_factor': 1.0,
                'high_freq_factor': 4.0, 'original_max_position_embeddings': ORIG}, MPE),
    'longrope': ({'rope_type': 'longrope', 'original_max_position_embeddings': ORIG,
                  'short_factor': SHORT, 'long_factor': LONG}, MPE),
    # factor != mpe / original
    'longrope_factor': ({'rope_type': 'longrope', 'original_max_position_embeddings': ORIG,
                         'factor': 2.0, 'short_factor': SHORT, 'long_factor': LONG}, MPE),
}
POSITIONS = {  # [B, T] position ids
    'past': torch.arange(112)[None],  # contiguous, well past the original window
    'mixed': positions('mixed'),  # a contiguous row + a skip-wise row (max 107)
    'inside': torch.arange(24)[None],  # inside the original window
}
# guards: configs we do not write, the exported weights under them: the harness must see the lines
# part
GUARDS = {  # name: (exported case, its rope_scaling rewritten)
    'yarn_as_yarn': ('yarn', lambda rs: dict(CASES['yarn'][0], type='yarn')),  # our old yarn export
    # attention factor left to
    'longrope_unpinned': ('longrope_factor', lambda rs: {k: v for k, v in rs.items()
                                                         if k not in ('attention_factor',
                                                                      'short_mscale',
                                                                      'long_mscale')}),
}


def tiny_model(rope, mpe):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=VOCAB,
                     rope_scaling=rope, max_position_embeddings=mpe)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        # large weights: sharp attention, so wrong angles move the logits a lot
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.copy_(1 + 0.1 * torch.randn_like(p))
    return model.eval()


def hf445_python():
    py = os.environ.get('HF445_PYTHON') or os.path.join(ROOT, '.venv-hf445', 'bin', 'python')
    if not os.path.exists(py):
        if os.environ.get('HF445_PYTHON'):  # `make test` sets it: there the check must run
            pytest.fail(f'HF445_PYTHON={py}: not found')
        pytest.skip('no .venv-hf445 (`make test` builds it): transformers 4.45 not checked')
    return py


def run_hf445(jobs, tmp):
    torch.save(jobs, tmp / 'jobs.pt')
    r = subprocess.run([hf445_python(), os.path.join(ROOT, 'tests', 'hf_logits.py'),
                        str(tmp / 'jobs.pt'), str(tmp / 'out.pt')],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(tmp / 'out.pt')


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    """Export every case once; logits from us, transformers 5.x (here) and 4.45.2 (subprocess)."""
    tmp = tmp_path_factory.mktemp('export_compat')
    ours, jobs, lint = {}, {}, {}
    for case, (rope, mpe) in CASES.items():
        model = tiny_model(rope, mpe)
        save_pretrained(model, tmp / case, tokenizer_dir=None)
        lint[case] = export_lint(json.load(open(tmp / case / 'config.json')))
        for kind, pos in POSITIONS.items():
            idx = idx_for(pos)
            with torch.no_grad():
                ours[case, kind] = model(idx, pos)[0]
            jobs[f'{case}/{kind}'] = (str(tmp / case), idx, pos)
    for guard, (case, rewrite) in GUARDS.items():
        shutil.copytree(tmp / case, tmp / guard)
        cfg = json.load(open(tmp / guard / 'config.json'))
        cfg['rope_scaling'] = rewrite(cfg['rope_scaling'])
        if cfg['rope_scaling']['rope_type'] != 'longrope':
            cfg.pop('original_max_position_embeddings')
        json.dump(cfg, open(tmp / guard / 'config.json', 'w'))
        lint[guard] = export_lint(cfg)
        for kind in ('past', 'mixed'):
            ours[guard, kind] = ours[case, kind]
            jobs[f'{guard}/{kind}'] = (str(tmp / guard), idx_for(POSITIONS[kind]), POSITIONS[kind])
    old445 = run_hf445(jobs, tmp)
    assert old445['version'] == '4.45.2'
    return {'ours': ours, 'lint': lint, '4.45': old445['logits'], '5': hf_logits(jobs),
            'version5': __import__('transformers').__version__}


def diff(results, line, case, kind):
    return (results[line][f'{case}/{kind}'] - results['ours'][case, kind]).abs().max().item()


@pytest.mark.parametrize('case', list(CASES))
def test_export_reads_alike_in_445_and_5(results, case):
    assert results['version5'].startswith('5.')
    for line in ('4.45', '5'):
        for kind in ('past', 'mixed'):
            assert diff(results, line, case, kind) < TOL, (line, case, kind,
                                                           diff(results, line, case, kind))
    # inside the original window too, except where the lint says the lines differ (longrope short !=
    # long)
    assert diff(results, '5', case, 'inside') < TOL
    version_dependent = any('transformers 4.45' in note for note in results['lint'][case])
    assert version_dependent == case.startswith('longrope'), results['lint'][case]
    if version_dependent:  # the lint's claim, checked: 4.45 uses long_factor even inside the window
        assert diff(results, '4.45', case, 'inside') > 100 * TOL
    else:
        assert diff(results, '4.45', case, 'inside') < TOL


def test_guards_the_lines_part_on(results):
    """Configs we do not write: a `yarn` config with original_max_position_embeddings (our old
    export) is right in 5.x and wrong in 4.45 (which takes the window from max_position_embeddings);
    a longrope config whose attention factor is left to the reader (factor 2 !=
    max_position_embeddings / original) too. The harness sees both, and the lint names both."""
    for guard in GUARDS:
        for kind in ('past', 'mixed'):
            assert diff(results, '5', guard, kind) < TOL, guard
            assert diff(results, '4.45', guard, kind) > 100 * TOL, guard
    # each lint names the reader that differs and the key it reads differently
    lint = results['lint']
    assert any('4.45' in n and 'original_max_position_embeddings' in n
               for n in lint['yarn_as_yarn'])
    assert any('4.45' in n and 'attention factor' in n for n in lint['longrope_unpinned']), lint


def test_export_config_and_log(tmp_path, capsys):
    """yarn is written as longrope (short = long) with the attention factor for both transformers
    and vLLM, both `type` and `rope_type`; the lint's one finding is the length vLLM must be
    given (its longrope default is the original window)."""
    model = tiny_model(*CASES['yarn_attn'])
    save_pretrained(model, tmp_path / 'out', tokenizer_dir=None)
    capsys.readouterr()
    cfg = json.load(open(tmp_path / 'out' / 'config.json'))
    lint = export_lint(cfg)
    assert len(lint) == 1 and 'vLLM' in lint[0] and str(cfg['max_position_embeddings']) in lint[0]
    rs = cfg['rope_scaling']
    assert rs['rope_type'] == rs['type'] == 'longrope' and rs['short_factor'] == rs['long_factor']
    assert rs['attention_factor'] == rs['short_mscale'] == rs['long_mscale'] == 1.3
    assert cfg['original_max_position_embeddings'] == rs['original_max_position_embeddings'] == ORIG


def test_lint_findings():
    """export_lint on hand-written configs (foreign checkpoints): each disagreement named once."""
    base = {'max_position_embeddings': 128}
    assert export_lint(dict(base, rope_scaling=None)) == []
    lint = export_lint(dict(base,
                            rope_scaling={'rope_type': 'linear', 'type': 'yarn', 'factor': 4.0}))
    assert any("'linear'" in n and "'yarn'" in n for n in lint)  # the two names that disagree
    llama3 = {'rope_type': 'llama3', 'type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
              'high_freq_factor': 4.0, 'original_max_position_embeddings': 32}
    assert export_lint(dict(base, rope_scaling=dict(llama3, factor=4.0))) == []
    lint = export_lint(dict(base, rope_scaling=llama3))  # 128 != 8 x 32: one finding, both lengths
    assert len(lint) == 1 and '128' in lint[0] and '8.0 x 32' in lint[0], lint
    longrope = {'rope_type': 'longrope', 'type': 'longrope', 'factor': 2.0, 'short_factor': LONG,
                'long_factor': LONG, 'original_max_position_embeddings': 32}  # no attention_factor
    lint = export_lint(dict(base, rope_scaling=longrope))
    assert any('vLLM' in n and "['factor']" in n for n in lint)  # a key vLLM ignores for longrope
    def window(lint):  # 4.45 reads the original window from the top-level key only
        return [n for n in lint if '4.45' in n and 'original_max_position_embeddings' in n]
    assert len(window(lint)) == 1, lint
    lint = export_lint(dict(base, rope_scaling=longrope, original_max_position_embeddings=32))
    assert window(lint) == []  # given at the top level: no finding
    attn = [n for n in lint if 'attention factor' in n]  # derived from 128 / 32 = 4 vs factor = 2
    assert len(attn) == 1 and '= 4' in attn[0] and '= 2' in attn[0], lint
