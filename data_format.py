"""
The prepared-data format: what prepare_data.py writes and train.py / eval_ppl.py read. PoSE samples
its chunks inside ONE document, so documents stay whole and separate; a data_dir holds, per split
(train / val):

  {split}.bin   all tokens of the split back to back (uint16 when the vocab fits, else uint32)
  {split}.idx   int64 offsets, n_docs+1 of them: doc i = tokens[offsets[i]:offsets[i+1]]
  meta.json     tokenizer (path, sha256, vocab, BOS/EOS ids), dtype, per-split counts,
                filters, sources

Everything is written under temp names and renamed at the end, meta.json last: a directory with
meta.json is complete, an interrupted run leaves nothing that looks complete.

Every reader lives here, so nobody imports the pipeline script prepare_data.py (inputs -> tokens ->
these files; its process pool and sentencepiece trainer): the readers of the input text files
(find_files, read_documents: .txt, .jsonl[.gz/.zst], .parquet; also eval_ppl.py's --input and the
demos' corpora), the split writer's pieces (the layout stated once, so writer and readers cannot
drift) and the readers of a prepared data_dir (read_meta, open_split: train.py, eval_ppl.py).
"""
import glob
import gzip
import io
import json
import os
import sysconfig

import numpy as np

from errors import UserError, read_json


def split_paths(data_dir, split):
    return os.path.join(data_dir, f'{split}.bin'), os.path.join(data_dir, f'{split}.idx')


# ----------------------------------------------------------------------------- writing a data_dir
# prepare_data.py's
class SplitWriter:
    """Appends documents to {split}.bin.tmp / {split}.idx.tmp; the caller renames them when the run
    is complete."""

    def __init__(self, data_dir, split):
        self.bin_path, self.idx_path = split_paths(data_dir, split)
        self.bin_tmp, self.idx_tmp = self.bin_path + '.tmp', self.idx_path + '.tmp'
        self.n_tokens = 0
        self.bin = open(self.bin_tmp, 'wb')
        self.idx = open(self.idx_tmp, 'wb')
        self.idx.write(np.zeros(1, np.int64).tobytes())  # offsets[0] = 0

    def add(self, tokens):
        """One document's tokens: a numpy array of the split's dtype."""
        self.bin.write(tokens.tobytes())
        self.n_tokens += len(tokens)
        self.idx.write(np.int64(self.n_tokens).tobytes())  # offsets[i + 1]

    def close(self):
        # a full disk fails the final flush of .bin: .idx is closed all the same
        try:
            self.bin.close()
        finally:
            self.idx.close()


def shuffle_split(bin_path, idx_path, np_dtype, rng, tmps):
    """Permute the documents of a finished split (uniform, seeded). A stream cannot be shuffled in
    constant memory, so this is a second pass: the offsets (8 B/doc) in memory, each document's
    tokens read (seek + read: no memmap pages piling up in RSS) in the permuted order into a new
    file."""
    offsets = np.fromfile(idx_path, dtype=np.int64)
    n = len(offsets) - 1
    if n < 2:
        return
    perm = rng.permutation(n)
    new_offsets = np.concatenate([[0], np.cumsum(np.diff(offsets)[perm])]).astype(np.int64)
    tmps += [bin_path + '.shuf', idx_path + '.shuf']
    starts, sizes = offsets[:-1] * np_dtype.itemsize, np.diff(offsets) * np_dtype.itemsize
    with open(bin_path, 'rb') as src, open(bin_path + '.shuf', 'wb', buffering=16 << 20) as f:
        for i in perm.tolist():
            src.seek(starts[i])
            f.write(src.read(sizes[i]))
    new_offsets.tofile(idx_path + '.shuf')
    os.replace(bin_path + '.shuf', bin_path)
    os.replace(idx_path + '.shuf', idx_path)


# ----------------------------------------------------------------------------- reading inputs
# the text files prepare_data.py tokenizes (and eval_ppl.py's --input, the demos' corpora)
# found in directories: .txt (an explicitly named file of any other extension is plain text too)
PLAIN_EXTS = ('.txt',)
JSONL_EXTS = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.jsonl.zstd')
PARQUET_EXTS = ('.parquet',)

def find_files(paths, what='input'):
    """Expand files / directories (recursive, sorted) / globs into a sorted-per-entry list of
    files."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(',') if p.strip()]
    if not paths:
        raise UserError(f"no {what} given (set {what}=FILES or corpus=python_stdlib)")
    files = []
    for p in paths:
        p = os.path.expanduser(p.strip())
        if glob.has_magic(p):
            matches = sorted(glob.glob(p, recursive=True))
        else:
            matches = [p] if os.path.exists(p) else []
        if not matches:
            raise UserError(f"{what} not found: {p}")
        for m in matches:
            if os.path.isdir(m):
                found = []
                for d, dirs, names in os.walk(m):
                    dirs[:] = sorted(x for x in dirs if not x.startswith('.'))
                    found += [os.path.join(d, n) for n in sorted(names) if not n.startswith('.')
                              and n.endswith(PLAIN_EXTS + JSONL_EXTS + PARQUET_EXTS)]
                if not found:
                    exts = ', '.join(PLAIN_EXTS + JSONL_EXTS + PARQUET_EXTS)
                    raise UserError(f"no input files found in {m} (looked for {exts})")
                files += found
            else:
                files.append(m)
    return files


def corpus_files(name):
    """An embedded corpus: real text present on every machine without a download."""
    if name != 'python_stdlib':
        raise UserError(f"unknown corpus '{name}' (available: python_stdlib)")
    root = sysconfig.get_paths()['stdlib']
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith('.')
                         and x not in ('site-packages', 'dist-packages', '__pycache__'))
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith('.py')]
    if not files:
        raise UserError(f"corpus python_stdlib: no .py files under {root}")
    return files


def _zstandard(path):
    try:
        import zstandard
    except ImportError:
        raise UserError(f"{path}: reading .zst needs zstandard (pip install zstandard)") from None
    return zstandard


def _open_text(path):
    if path.endswith('.gz'):
        return gzip.open(path, 'rt', encoding='utf-8')
    if path.endswith(('.zst', '.zstd')):  # streaming: the decompressed file never sits in memory
        stream = _zstandard(path).ZstdDecompressor().stream_reader(open(path, 'rb'))
        return io.TextIOWrapper(stream, encoding='utf-8')
    return open(path, encoding='utf-8')


def read_documents(path, text_key='text', lenient=False):
    """Yield the documents of one file, streaming. lenient: skip a plain file that is not UTF-8
    (corpus)."""
    if path.endswith(JSONL_EXTS):
        yield from _read_jsonl(path, text_key)
    elif path.endswith(PARQUET_EXTS):
        yield from _read_parquet(path, text_key)
    else:
        try:
            with open(path, encoding='utf-8') as f:
                text = f.read()
        except UnicodeDecodeError as e:
            if lenient:
                return
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:  # unreadable (permissions, a directory named as a file ...)
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        yield text


def _read_jsonl(path, text_key):
    # what a truncated / corrupt compressed file (or the disk) raises while it is read; gzip's
    # BadGzipFile is an OSError
    unreadable = (OSError, EOFError)
    if path.endswith(('.zst', '.zstd')):
        unreadable += (_zstandard(path).ZstdError,)
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    why = getattr(e, 'msg', e)
                    raise UserError(f"{path}:{lineno}: invalid JSON ({why})") from None
                if not isinstance(obj, dict) or text_key not in obj:
                    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                    raise UserError(f"{path}:{lineno}: no text key '{text_key}' (found: {keys}; "
                                    f"set text_key=...)")
                if not isinstance(obj[text_key], str):
                    kind = type(obj[text_key]).__name__
                    raise UserError(f"{path}:{lineno}: '{text_key}' is {kind}, not a string")
                yield obj[text_key]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno + 1}: not UTF-8 ({e.reason})") from None
    except unreadable as e:
        raise UserError(f"{path}:{lineno + 1}: unreadable ({type(e).__name__}: {e})") from None


def _read_parquet(path, text_key):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    # not parquet / corrupt: ArrowInvalid; unreadable: OSError
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: unreadable parquet ({e})") from None
    if text_key not in pf.schema_arrow.names:
        raise UserError(f"{path}: no text key '{text_key}' (columns: {pf.schema_arrow.names[:8]}; "
                        f"set text_key=...)")
    kind = pf.schema_arrow.field(text_key).type
    if str(kind) not in ('string', 'large_string', 'string_view'):
        raise UserError(f"{path}: column '{text_key}' holds {kind}, not strings (set text_key=...)")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            yield text if text is not None else ''


def iter_documents(files, text_key='text', lenient=False):
    for path in files:
        yield from read_documents(path, text_key, lenient)


# ----------------------------------------------------------------------------- reading a data_dir
# train.py's and the evals'
def read_meta(data_dir):
    """meta.json of a prepared dataset, checked: a broken one is named here, not deep inside a
    reader."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise UserError(f"{data_dir}: no meta.json, not a (complete) prepared dataset: "
                        f"run prepare_data.py")
    meta = read_json(path)
    splits, vocab = meta.get('splits'), meta.get('vocab_size')
    for bad, msg in [
            (meta.get('dtype') not in ('uint16', 'uint32'),
             f"dtype={meta.get('dtype')!r}: expected 'uint16' or 'uint32'"),
            (not isinstance(vocab, int) or vocab < 1,
             f"vocab_size={vocab!r}: expected a positive integer"),
            (not isinstance(splits, dict) or not all(
                isinstance(v, dict) and isinstance(v.get('docs'), int) for v in splits.values()),
             f"splits={splits!r}: expected {{split: {{'docs': n, ...}}}}")]:
        if bad:
            raise UserError(f"{path}: {msg}")
    return meta


def open_split(data_dir, split):
    """-> (tokens: np.memmap of meta['dtype'], offsets: int64 [n_docs+1]);
    doc i = tokens[offsets[i]:offsets[i+1]]"""
    meta = read_meta(data_dir)
    if split not in meta['splits']:
        raise UserError(f"{data_dir}: no split '{split}' (has: {', '.join(meta['splits'])})")
    bin_path, idx_path = split_paths(data_dir, split)
    for p in (bin_path, idx_path):
        if not os.path.isfile(p):
            raise UserError(f"{p}: missing (meta.json lists split '{split}')")
    offsets = np.fromfile(idx_path, dtype=np.int64)
    n_tokens = os.path.getsize(bin_path) // np.dtype(meta['dtype']).itemsize
    if len(offsets) != meta['splits'][split]['docs'] + 1 or offsets[-1] != n_tokens \
            or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise UserError(f"{data_dir}: {split}.idx / {split}.bin do not match meta.json "
                        f"(a mix of two runs?)")
    if not n_tokens:
        return np.zeros(0, meta['dtype']), offsets
    tokens = np.memmap(bin_path, dtype=meta['dtype'], mode='r')
    return tokens, offsets
