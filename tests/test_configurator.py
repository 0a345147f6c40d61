"""configurator.py: overrides apply, typos and wrong types are one-line errors naming the key."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
batch_size = 4  # int
learning_rate = 3e-4  # float
out_dir = 'out'  # str
compile = False  # bool
rope_scaling = None  # dict or None
exec(open('configurator.py').read())
print('RESULT', repr((batch_size, learning_rate, out_dir, compile, rope_scaling)))
"""


def run(tmp_path, *args, config=None):
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT)
    argv = [sys.executable, str(script)]
    if config is not None:
        cfg = tmp_path / 'cfg.py'
        cfg.write_text(config)
        argv.append(str(cfg))
    argv += list(args)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)


def result(proc):
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][0]
    return eval(line[len('RESULT '):])


def test_overrides_and_config_file(tmp_path):
    cfg = ("import math\n_n = 3\nbatch_size = _n * 2\n"
           "rope_scaling = {'rope_type': 'linear', 'factor': 8.0}\n")
    proc = run(tmp_path, '--learning_rate=1', '--out_dir=123', '--compile=True', config=cfg)
    assert result(proc) == (6, 1.0, '123', True, {'rope_type': 'linear', 'factor': 8.0})
    assert isinstance(result(proc)[1], float)


def test_value_with_equals_sign(tmp_path):
    assert result(run(tmp_path, '--out_dir=a=b'))[2] == 'a=b'


def test_unknown_key_is_named(tmp_path):
    proc = run(tmp_path, '--batchsize=8')
    assert proc.returncode != 0 and "batchsize" in proc.stderr and 'Traceback' not in proc.stderr
    proc = run(tmp_path, config="lerning_rate = 1e-3\n")
    assert proc.returncode != 0 and "lerning_rate" in proc.stderr and 'cfg.py' in proc.stderr


def test_wrong_type_is_named(tmp_path):
    proc = run(tmp_path, '--batch_size=0.5')
    assert proc.returncode != 0 and 'batch_size' in proc.stderr and 'int' in proc.stderr
    proc = run(tmp_path, '--compile=1')
    assert proc.returncode != 0 and 'compile' in proc.stderr


def test_missing_config_file(tmp_path):
    proc = run(tmp_path, 'config/nope.py')
    assert proc.returncode != 0 and 'config/nope.py' in proc.stderr


def test_help_lists_keys_with_comments(tmp_path):
    proc = run(tmp_path, '--help')
    assert proc.returncode == 0 and 'RESULT' not in proc.stdout
    assert 'batch_size = 4  # int' in proc.stdout \
        and 'rope_scaling = None  # dict or None' in proc.stdout


TYPED = """
seed = 1337  # int
rope_scaling = {'rope_type': 'linear'}  # dict, or None (no scaling)
lengths = None  # None = a protocol's; else a list
tokenizer = None  # None = the model's; else a path
anything = None  # undeclared: anything goes
CONFIG_TYPES = {'lengths': list, 'tokenizer': str}
exec(open('configurator.py').read())
print('RESULT', repr((seed, rope_scaling, lengths, tokenizer, anything)))
"""


def test_none_and_declared_types(tmp_path):
    """None is refused where the default is a number (it would pass every later check unseen); a
    dict may be None; a key whose default is None takes None or the type the script declares in
    CONFIG_TYPES."""
    script = tmp_path / 'typed.py'
    script.write_text(TYPED)

    def typed(*args):
        return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True,
                              text=True)
    # a str key takes the text as is
    got = result(typed('--rope_scaling=None', '--lengths=[64]', '--tokenizer=123', '--anything=5'))
    assert got == (1337, None, [64], '123', 5)
    assert result(typed('--lengths=None', '--tokenizer=None')) == \
        (1337, {'rope_type': 'linear'}, None, None, None)
    for arg, needle in [('--seed=None', 'seed=None (--seed): expected int, got NoneType'),
                        ('--lengths=5', 'lengths=5 (--lengths): expected list, got int'),
                        ('--lengths=abc', "lengths='abc' (--lengths): expected list, got str"),
                        ('--CONFIG_TYPES={}', "unknown config key 'CONFIG_TYPES' "
                                              "(--CONFIG_TYPES)")]:
        proc = typed(arg)
        assert proc.returncode == 2 and proc.stderr == f'error: {needle}\n', (arg, proc.stderr)
