# nanoGPT's "poor man's configurator", hardened. Not a module to import: an entry script runs
#   exec(open('configurator.py').read())
# after defining its config globals. Then
#   python train.py config/pose_16k.py --batch_size=4 --rope_scaling="{'rope_type': 'yarn', ...}"
# runs the config file (plain Python; it may only assign keys the script already has) and then the
# --key=value overrides. A typo is an error that names the key (inside a config file too); a value
# of the wrong type is an error naming key, value and expected type (int -> float is allowed). A key
# takes its default's type (a dict key also None), so --seed=None is refused; a key whose default is
# None takes None or the type(s) the script declares in a dict CONFIG_TYPES = {key: type or tuple of
# types} above the exec line (undeclared: anything). Helper variables in a config file start with
# '_'. Only rank 0 prints, so torchrun logs stay readable. Only the script being run reads the
# command line: a script imported by another (eval_passkey.py imports eval_ppl.py) keeps its
# defaults.
import ast as _ast
import builtins as _builtins  # scripts have a `compile` config key that shadows the builtin
import os as _os
import sys as _sys


def _cfg_say(msg):
    if int(_os.environ.get('RANK', '0')) == 0:
        print(msg)


def _cfg_fail(msg):
    # one clear line, no traceback: this is the user's input, not our bug; every torchrun rank reads
    # the same input, so rank 0 alone says it
    if int(_os.environ.get('RANK', '0')) == 0:
        _sys.stderr.write(f"error: {msg}\n")
    raise SystemExit(2)


def _cfg_types(key):
    # the types a key takes: those the script declares for it in CONFIG_TYPES, else its default's
    # (a dict key may also be None: no dict, e.g. rope_scaling=None = the model's own); None: any
    default, declared = globals()[key], globals().get('CONFIG_TYPES', {}).get(key)
    want = declared if declared is not None else None if default is None else \
        (dict, type(None)) if isinstance(default, dict) else type(default)
    return want if want is None or isinstance(want, tuple) else (want,)


def _cfg_check(key, value, where):
    """Validate one assignment against the script's defaults; returns the (maybe widened) value."""
    if key not in globals() or key.startswith('_') or key.isupper() or key == 'config_keys':
        _cfg_fail(f"unknown config key '{key}' ({where})")
    want = _cfg_types(key)
    if want is None or (value is None and globals()[key] is None):  # undeclared, or the default
        return value
    if float in want and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # --learning_rate=1 means 1.0
    if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
        names = ' or '.join('None' if t is type(None) else t.__name__ for t in want)
        _cfg_fail(f"{key}={value!r} ({where}): expected {names}, got {type(value).__name__}")
    return value


_cfg_argv = _sys.argv[1:] if __name__ == '__main__' else []

if any(_a in ('-h', '--help') for _a in _cfg_argv):
    # the config keys are the first assignments of the script's current globals above the line
    # that runs us (module level, or in `if __name__ == '__main__':`); show each with its comment
    with open(_sys.argv[0]) as _f:
        _src = _f.read()
    _lines, _shown = _src.splitlines(), set()
    _stop = next(_i for _i, _l in enumerate(_lines, 1) if 'configurator.py' in _l and 'exec(' in _l)
    _cfg_say(f"usage: python {_sys.argv[0]} [config/file.py ...] [--key=value ...]\n"
             f"keys (default  # meaning):")
    _body = _ast.parse(_src).body
    _body += [_n for _s in _body if isinstance(_s, _ast.If) for _n in _s.body]
    _assigns = [_n for _n in _body if isinstance(_n, _ast.Assign) and _n.lineno < _stop]
    for _n in sorted(_assigns, key=lambda _n: _n.lineno):
        _k = _n.targets[0].id if isinstance(_n.targets[0], _ast.Name) else ''
        if _k and not _k.startswith('_') and not _k.isupper() and _k != 'config_keys' \
                and _k not in _shown and _k in globals() \
                and type(globals()[_k]).__name__ not in ('module', 'function', 'type'):
            _shown.add(_k)
            _cfg_say('  ' + _lines[_n.lineno - 1].strip())
    raise SystemExit(0)

for _arg in _cfg_argv:
    if not _arg.startswith('--'):
        # a config file: run it in a scratch namespace, then apply only what it assigned
        if not _os.path.isfile(_arg):
            _cfg_fail(f"config file not found: {_arg}")
        _cfg_say(f"Overriding config with {_arg}:")
        try:
            with open(_arg, encoding='utf-8') as _f:
                _src = _f.read()
        except (OSError, UnicodeDecodeError) as _e:  # a directory, unreadable, not text
            _cfg_fail(f"{_arg}: unreadable config file ({type(_e).__name__}: {_e})")
        _cfg_say(_src)
        _ns = {}
        try:
            exec(_builtins.compile(_src, _arg, 'exec'), _ns)
        except Exception as _e:  # a broken config file is the user's input: name it
            _cfg_fail(f"{_arg}: {type(_e).__name__}: {_e}")
        for _k, _v in _ns.items():
            if _k.startswith('_') or type(_v).__name__ == 'module' or callable(_v):
                continue  # imports, helpers and dunders of the config file are not config
            globals()[_k] = _cfg_check(_k, _v, _arg)
    else:
        if '=' not in _arg:
            _cfg_fail(f"expected --key=value, got '{_arg}'")
        _key, _val = _arg[2:].split('=', 1)
        # a str key takes the text as is (--out_dir=123); so does one declared str (None: default)
        if _key not in globals() or _cfg_types(_key) != (str,) \
                or (globals()[_key] is None and _val == 'None'):
            try:
                _val = _ast.literal_eval(_val)  # numbers, bools, None, lists, dicts ...
            except (SyntaxError, ValueError):
                pass  # ... else a plain string
        globals()[_key] = _cfg_check(_key, _val, f"--{_key}")
        _cfg_say(f"Overriding: {_key} = {_val!r}")
