"""
One error idiom for every entry script (train.py, prepare_data.py, eval_*.py, sample_positions.py,
bench.py, demo/convert_gguf.py, the demos):

- input that cannot be used (a file, key or value), or a machine that refuses (a full disk), is
  raised as UserError('one line naming the culprit') where it enters; `run(main)` catches it once,
  prints `error: ...` and exits with e.code (2; 1 for faults of the run or the machine), no
  traceback;
- Ctrl-C: one line, exit 130; whoever was writing removes their temp files on the way out
  (`writing`);
- anything else is a bug and keeps its traceback.

And the ways a script's output goes wrong without it being a bug, each stopped here: an output path
that cannot be written, found only after the work (`check_writable`, before it); two runs writing
one result (`claim`); a half-written file (`atomic_path`: write a temp name beside the file, renamed
when complete; write_text_atomic / write_json_atomic / write_jsonl_atomic / save_figure use it); a
missing optional dependency (`pyplot`: matplotlib, needed for plots only).
"""
import atexit
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
PLOT_EXTS = ('.png', '.pdf', '.svg')  # figure formats matplotlib writes with no extra package


class UserError(ValueError):
    """The user's input (or the machine) stops the run: one line, no traceback. A ValueError, so
    library callers that catch ValueError keep working."""

    def __init__(self, msg, code=2):
        super().__init__(msg)
        self.code = code


def wrapped(e):
    """e and every exception it wraps: its cause / context, and a torch.distributed.checkpoint
    CheckpointException's failure per rank (dcp turns even a Ctrl-C inside a save into one of
    those)."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__]
        failures = getattr(x, 'failures', None)  # {rank: (exception, traceback)}
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def is_disk_full(e):
    """e, or what it wraps (incl. the message of a writer in Rust such as safetensors), is a full
    disk."""
    return any(isinstance(x, OSError) and x.errno in DISK_FULL
               or 'No space left on device' in str(x) or 'os error 28' in str(x)
               for x in wrapped(e))


def is_interrupt(e):
    return any(isinstance(x, KeyboardInterrupt) for x in wrapped(e))


def remove(path):
    """Remove a file or a directory tree if it exists; never raises (it runs while another error
    unwinds)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


@contextmanager
def writing(path, temps=()):
    """Wrap the writing of `path` (a file or a directory): if anything fails or Ctrl-C arrives, the
    temp paths in `temps` (a list that may grow inside) are removed first; a full disk becomes one
    line naming `path`."""
    try:
        yield
    except BaseException as e:
        for p in list(temps):
            remove(p)
        if is_interrupt(e) and not isinstance(e, KeyboardInterrupt):
            # unwrapped (dcp's CheckpointException is a BaseException)
            raise KeyboardInterrupt from None
        if not isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)) and is_disk_full(e):
            raise UserError(f'no space left on device writing {path}', code=1) from None
        raise


@contextmanager
def atomic_path(path):
    """Yields `path + '.tmp'` (in path's directory, created if missing) to write to; when the block
    completes it is renamed to `path`, so `path` is never half-written. On failure or Ctrl-C the
    temp file is removed and a full disk is one line naming `path` (`writing`). Not for directories
    (checkpoints have their own rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with writing(path, temps=[tmp]):
        yield tmp
        os.replace(tmp, path)
    release(path)


_claims = {}  # absolute path -> (fd, lock path) of every result name this process has claimed


def claim(path, key='out'):
    """Claim the result name `path` (config key `key`) for this process, before its work: an
    exclusive flock on path + '.lock', which the OS drops when the process ends however it ends, so
    a second run started with the same path is refused while this one runs, and a lock file a killed
    run left behind blocks nobody. The claim ends when the result is written (atomic_path) or the
    process exits."""
    if os.path.abspath(path) in _claims:
        return path
    lock = path + '.lock'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # not a lock file its holder removed meanwhile
        held = os.stat(lock).st_ino == os.fstat(fd).st_ino
    except (BlockingIOError, FileNotFoundError):
        held = False
    if not held:
        os.close(fd)
        raise UserError(f"{key}={path!r}: another run is writing it now (it holds {lock})")
    _claims[os.path.abspath(path)] = (fd, lock)
    return path


def release(path):
    """End this process's claim on `path`, if it holds one: the lock file goes, then the lock."""
    fd, lock = _claims.pop(os.path.abspath(path), (None, None))
    if fd is None:
        return
    try:
        if os.stat(lock).st_ino == os.fstat(fd).st_ino:
            os.remove(lock)
    except OSError:
        pass
    os.close(fd)


atexit.register(lambda: [release(p) for p in list(_claims)])


def check_writable(path, key, exts=(), directory=False):
    """Before any work: the output `path` given as config key `key` can be written -- a file path
    with one of `exts` (when given) or, directory=True, a directory path -- and its nearest existing
    directory takes a new file (probed: permissions, a read-only filesystem). Returns path."""
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{key}={path!r} is a file, not a directory")
    if not directory and os.path.isdir(path):
        raise UserError(f"{key}={path!r} is a directory: give a file path")
    if exts and not directory and not path.lower().endswith(tuple(exts)):
        raise UserError(f"{key}={path!r}: expected a {' / '.join(exts)} file")
    d = os.path.abspath(path if directory else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UserError(f"{key}={path!r}: {d} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise UserError(f"{key}={path!r}: cannot write in {d} ({e.strerror})") from None
    return path


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)


def write_json_atomic(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=1)


def write_jsonl_atomic(path, texts):
    """texts as a .jsonl file of {"text": ...} lines (prepare_data.py's input format)."""
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            for t in texts:
                f.write(json.dumps({'text': t}) + '\n')
    print(f"wrote {path} ({len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB)")


def pyplot(what, required=True):
    """matplotlib.pyplot on the file-only Agg backend, for `what` (e.g. "plot='ppl.png'"). Without
    matplotlib: a UserError naming `what` when the user asked for that plot (required: the eval
    scripts call this before their work), else one `note:` line and None (bench / demo reports: the
    plot is a by-product of results already written, not worth failing a long run at its end)."""
    try:
        import matplotlib
    except ImportError:
        msg = f"{what} needs matplotlib (pip install matplotlib)"
        if required:
            raise UserError(msg) from None
        print(f"note: {msg}: no plot")
        return None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=120):
    """fig as `path` (format from its extension, png when none), written atomically; the figure is
    closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1].lstrip('.') or 'png', dpi=dpi)
    import matplotlib.pyplot as plt
    plt.close(fig)


def say_error(msg):
    """One line on stderr: rank 0 as is, other torchrun ranks prefixed with their rank."""
    rank = int(os.environ.get('RANK', 0))
    print(f"{f'[rank {rank}] ' if rank else ''}{msg}", file=sys.stderr, flush=True)


def run(main, cleanup=None,
        interrupted='interrupted (Ctrl-C): stopped, no partial results written'):
    """The scripts' entry point: main(); UserError -> one line, exit e.code; Ctrl-C -> the line
    `interrupted`, exit 130; anything else propagates with its traceback. cleanup() runs in every
    case (e.g. to destroy the process group). `interrupted` may be a function: the line is what it
    returns at the Ctrl-C."""
    code = 0
    try:
        main()
    except UserError as e:
        say_error(f'error: {e}')
        code = e.code
    # Ctrl-C, also when a library wrapped it (dcp); anything else keeps its traceback
    except BaseException as e:
        if not is_interrupt(e):
            raise
        say_error(interrupted() if callable(interrupted) else interrupted)
        code = 130
    finally:
        if cleanup is not None:
            cleanup()
    sys.exit(code)


def read_json(path):
    """A JSON object from a file the user gave us; unreadable -> one line naming the file."""
    try:
        with open(path, encoding='utf-8') as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
