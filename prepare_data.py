"""
Text corpora -> token memmap + document index, for PoSE training and evaluation.

    python prepare_data.py --input=pile/*.jsonl.zst --tokenizer=/models/Llama-2-7b-hf --min_tokens=2048
    python prepare_data.py --corpus=python_stdlib --train_tokenizer=2048 --out_dir=data-demo

PoSE samples its chunks inside ONE document, so documents stay whole and separate: out_dir gets
{split}.bin (tokens), {split}.idx (document offsets) and meta.json for split in train / val -- the format
is data_format.py's, which also holds the readers train.py / eval_*.py use (`open_split`, `read_meta`).
Everything is written under temp names and renamed at the end, meta.json last. Tokenizing uses
tokenizer.py's `load_tokenizer`, as train and eval do.

Inputs (files, directories searched recursively, or glob patterns): .jsonl / .jsonl.gz /
.jsonl.zst (one JSON object per line, text under `text_key`), .parquet (column `text_key`),
.txt or any other explicitly named file (the whole file is one document). Reading streams, so
memory stays flat on a multi-GB .jsonl.zst.
"""
import glob
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import sysconfig
import time
from collections import deque

import numpy as np
from tqdm import tqdm

from data_format import SplitWriter, shuffle_split, split_paths
from errors import UserError, is_disk_full, remove, run, writing
from tokenizer import Tokenizer, resolve_tokenizer, sha256_file

# -----------------------------------------------------------------------------
# config (nanoGPT style: python prepare_data.py [config.py] [--key=value ...])
input = None  # files / dirs / globs: a list, or a comma-separated string (None: use `corpus`)
corpus = ''  # an embedded corpus instead of `input`: 'python_stdlib' (this Python's stdlib .py files)
val_input = None  # separate validation files (same forms as `input`); else `val_fraction` of `input`
val_fraction = 0.0  # fraction of documents sent to the val split (a seeded per-document coin)
out_dir = 'data'  # where {split}.bin / {split}.idx / meta.json go
tokenizer = ''  # sentencepiece .model, HF tokenizer.json, or an HF model directory holding either
train_tokenizer = 0  # >0: train a sentencepiece model of this vocab size on the inputs and use it
tokenizer_type = 'bpe'  # for train_tokenizer: 'bpe' or 'unigram'
tokenizer_sample_mb = 20.0  # for train_tokenizer: train on the first this-many MB of the train documents
text_key = 'text'  # the field holding the text in .jsonl / .parquet
min_tokens = 0  # drop documents shorter than this (tokens incl. BOS/EOS; the paper keeps >= 2048)
max_tokens = 0  # truncate documents to this many tokens (0 = no limit; official PoSE code: 5 * L_c)
max_docs = 0  # keep at most this many documents from each input stream (0 = all)
add_bos = True  # prepend BOS to each document when the tokenizer's model uses one (Llama does)
add_eos = False  # append EOS to each document
dtype = ''  # '' = uint16 when vocab_size <= 65536 else uint32; or force 'uint16' / 'uint32'
shuffle = True  # seeded permutation of each split's documents (an extra pass over the .bin: data_format.shuffle_split)
seed = 1337  # for val_fraction and shuffle
num_proc = 1  # tokenizer worker processes (output order is the input order regardless)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, list, type(None)))]

PLAIN_EXTS = ('.txt',)  # picked up from directories; an explicitly named file of any extension is plain text
JSONL_EXTS = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.jsonl.zstd')
PARQUET_EXTS = ('.parquet',)

# ----------------------------------------------------------------------------- reading documents
def find_files(paths, what='input'):
    """Expand files / directories (recursive, sorted) / globs into a sorted-per-entry list of files."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(',') if p.strip()]
    if not paths:
        raise UserError(f"no {what} given (set {what}=FILES or corpus=python_stdlib)")
    files = []
    for p in paths:
        p = os.path.expanduser(p.strip())
        matches = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p] if os.path.exists(p) else []
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
                    raise UserError(f"no input files found in {m} (looked for {', '.join(PLAIN_EXTS + JSONL_EXTS + PARQUET_EXTS)})")
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
        dirs[:] = sorted(x for x in dirs if x not in ('site-packages', 'dist-packages', '__pycache__') and not x.startswith('.'))
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
        return io.TextIOWrapper(_zstandard(path).ZstdDecompressor().stream_reader(open(path, 'rb')), encoding='utf-8')
    return open(path, encoding='utf-8')


def read_documents(path, text_key='text', lenient=False):
    """Yield the documents of one file, streaming. lenient: skip a plain file that is not UTF-8 (corpus)."""
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
    # what a truncated / corrupt compressed file (or the disk) raises while it is read; gzip's BadGzipFile is an OSError
    unreadable = (OSError, EOFError) + ((_zstandard(path).ZstdError,) if path.endswith(('.zst', '.zstd')) else ())
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({getattr(e, 'msg', e)})") from None
                if not isinstance(obj, dict) or text_key not in obj:
                    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                    raise UserError(f"{path}:{lineno}: no text key '{text_key}' (found: {keys}; set text_key=...)")
                if not isinstance(obj[text_key], str):
                    raise UserError(f"{path}:{lineno}: '{text_key}' is {type(obj[text_key]).__name__}, not a string")
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
    except (pa.ArrowException, OSError) as e:  # not parquet / corrupt: ArrowInvalid; unreadable: OSError
        raise UserError(f"{path}: unreadable parquet ({e})") from None
    if text_key not in pf.schema_arrow.names:
        raise UserError(f"{path}: no text key '{text_key}' (columns: {pf.schema_arrow.names[:8]}; set text_key=...)")
    kind = pf.schema_arrow.field(text_key).type
    if str(kind) not in ('string', 'large_string', 'string_view'):
        raise UserError(f"{path}: column '{text_key}' holds {kind}, not strings (set text_key=...)")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            yield text if text is not None else ''


def iter_documents(files, text_key='text', lenient=False):
    for path in files:
        yield from read_documents(path, text_key, lenient)


def is_val(index, seed, fraction):
    """Seeded per-document coin: stream-friendly, independent of num_proc and of everything else."""
    h = hashlib.blake2b(f'{seed}:{index}'.encode(), digest_size=8).digest()
    return int.from_bytes(h, 'little') < fraction * 2 ** 64


# ----------------------------------------------------------------------------- tokenizing (ordered, parallel)
_worker_tok = None


def _init_worker(tok_path):
    global _worker_tok
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process, which stops us cleanly
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # one core per worker: num_proc is the parallelism
    _worker_tok = Tokenizer(tok_path)


def _encode_worker(texts, bos, eos):
    return _pack(_worker_tok.encode_batch(texts, bos, eos))


def _pack(lists):
    # one flat array + lengths: cheap to send between processes
    lens = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum()))  # C loop, ~0.1 us/token
    return flat, lens


BATCH_DOCS, BATCH_CHARS = 256, 1 << 20  # a unit of work for one tokenizer call / worker


def _batches(docs):
    batch, chars = [], 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_documents(docs, tok_path, num_proc=1, bos=True, eos=False):
    """Tokenize an iterable of texts -> yields (flat int64 ids, per-doc lengths) per batch, in input
    order. num_proc > 1: a process pool with a bounded queue (Pool.imap would read ahead without
    limit). Also the piece bench.py times against the bare tokenizer."""
    if num_proc <= 1:
        tok = Tokenizer(tok_path)
        for batch in _batches(docs):
            yield _pack(tok.encode_batch(batch, bos, eos))
        return
    pool = mp.get_context('fork' if sys.platform == 'linux' else 'spawn').Pool(num_proc, _init_worker, (tok_path,))
    pending = deque()
    try:
        for batch in _batches(docs):
            pending.append(pool.apply_async(_encode_worker, (batch, bos, eos)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    except BaseException:  # incl. GeneratorExit (the caller stopped early: max_docs) and Ctrl-C
        for r in pending:  # let the <= 2 * num_proc in-flight batches finish: Pool.terminate() can
            r.wait()  # hang for good while a large task is half-written into a worker's pipe
        pool.close()
        raise
    finally:
        pool.join()


# ----------------------------------------------------------------------------- training a tokenizer
def train_sentencepiece(docs, vocab_size, model_path, model_type='bpe', sample_mb=20.0):
    """Train a Llama-style sentencepiece model (unk=0, bos=1, eos=2, byte fallback) on at most
    sample_mb MB of `docs`, written to model_path. Normalization is off (identity, no whitespace
    folding, no dummy prefix) so decode(encode(text)) == text for code and any text without '▁'."""
    import sentencepiece as spm

    failed = []  # an error inside the iterator would reach us as sentencepiece's RuntimeError: keep it

    def pieces():  # <= 4 KB pieces cut at line ends: sentencepiece skips over-long "sentences"
        try:
            yield from _pieces()
        except BaseException as e:
            failed.append(e)

    def _pieces():
        budget = int(sample_mb * 2 ** 20)
        for text in docs:
            buf = ''
            for line in text.splitlines(keepends=True):
                if buf and len(buf) + len(line) > 4000:
                    yield buf
                    budget -= len(buf.encode())
                    buf = ''
                buf += line
            if buf:
                yield buf
                budget -= len(buf.encode())
            if budget <= 0:
                return

    model = io.BytesIO()
    # the trainer's sentence shuffle and sampling draw from its own generator: seeded, the same docs give the
    # same tokenizer whatever the thread count (checked: three trainings, one sha256)
    spm.set_random_generator_seed(1337)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=pieces(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=0.9995, split_digits=True,
            normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, user_defined_symbols=['\n'],  # newline: always its own piece
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16,
            input_sentence_size=1 << 20, shuffle_input_sentence=True, num_threads=min(8, os.cpu_count() or 1),
            minloglevel=2)
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        raise UserError(f"train_tokenizer={vocab_size}: sentencepiece failed: {str(e).strip().splitlines()[-1]}") from None
    if failed:
        raise failed[0]
    with open(model_path, 'wb') as f:
        f.write(model.getvalue())


LLAMA_TOKENIZER_CONFIG = {  # lets transformers load a trained tokenizer.model as a LlamaTokenizer
    'tokenizer_class': 'LlamaTokenizer', 'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>',
    'pad_token': None, 'add_bos_token': True, 'add_eos_token': False, 'add_prefix_space': False,
    'legacy': False, 'clean_up_tokenization_spaces': False, 'model_max_length': 1 << 30}

# ----------------------------------------------------------------------------- the pipeline
# The settings (the config keys) reach the steps below as keyword arguments: each step names the ones it
# uses and takes the rest as **_, so prepare() can hand every step the same dict.
def check_settings(input, corpus, val_input, val_fraction, out_dir, tokenizer, train_tokenizer, tokenizer_type,
                   min_tokens, max_tokens, max_docs, dtype, num_proc, **_):
    """Everything checkable before anything is written -> (files, val_files or None, splits, tokenizer path or
    None when it is to be trained)."""
    if bool(input) == bool(corpus):
        raise UserError("set exactly one of input=FILES or corpus=python_stdlib")
    files = corpus_files(corpus) if corpus else find_files(input)
    val_files = find_files(val_input, 'val_input') if val_input else None
    for bad, msg in [(not 0.0 <= val_fraction < 1.0, f"val_fraction={val_fraction}: must be in [0, 1)"),
                     (val_files and val_fraction, "set val_input or val_fraction, not both"),
                     (min(min_tokens, max_tokens, max_docs) < 0, "min_tokens, max_tokens, max_docs must be >= 0"),
                     (num_proc < 1, f"num_proc={num_proc}: must be >= 1"),
                     (max_tokens and min_tokens > max_tokens, f"min_tokens={min_tokens} > max_tokens={max_tokens}"),
                     (dtype not in ('', 'uint16', 'uint32'), f"dtype={dtype!r}: use '', 'uint16' or 'uint32'"),
                     (tokenizer and train_tokenizer, "set tokenizer=PATH or train_tokenizer=VOCAB, not both"),
                     (tokenizer_type not in ('bpe', 'unigram'), f"tokenizer_type={tokenizer_type!r}: use 'bpe' or 'unigram'")]:
        if bad:
            raise UserError(msg)
    tok_path = None if train_tokenizer else resolve_tokenizer(tokenizer)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir={out_dir!r} is a file, not a directory")
    return files, val_files, ['train', 'val'] if (val_files or val_fraction) else ['train'], tok_path


def train_tokenizer_into(files, out_dir, tmps, corpus, text_key, val_fraction, seed, train_tokenizer, tokenizer_type,
                         tokenizer_sample_mb, **_):
    """Train a sentencepiece model on the train documents (never on val ones) into out_dir: tokenizer.model and
    tokenizer_config.json, under temp names (outputs like the .bin: renamed at the commit) -> the temp .model."""
    path = os.path.join(out_dir, 'tokenizer.model.tmp')
    tmps += [path, os.path.join(out_dir, 'tokenizer_config.json.tmp')]
    sample = (t for i, t in enumerate(iter_documents(files, text_key, bool(corpus)))
              if not (val_fraction and is_val(i, seed, val_fraction)))
    train_sentencepiece(sample, train_tokenizer, path, tokenizer_type, tokenizer_sample_mb)
    with open(tmps[-1], 'w') as f:
        json.dump(LLAMA_TOKENIZER_CONFIG, f, indent=2)
    return os.path.abspath(path)


def tokenize_stream(docs, fixed_split, writers, stats, tok, tok_path, np_dtype, bos, eos, bar, min_tokens, max_tokens,
                    max_docs, num_proc, val_fraction, seed, **_):
    """Tokenize one stream of documents into the split writers, filtered. Each document goes to fixed_split, or
    (fixed_split None) to val or train by its seeded coin. Counts go to stats[split]; returns the documents read."""
    n_special = int(bos) + int(eos)
    index, kept, n_tok, t0 = 0, 0, 0, time.time()
    batches = encode_documents(docs, tok_path, num_proc, bos, eos)
    for flat, lens in batches:
        if flat.size and flat.max() > np.iinfo(np_dtype).max:
            raise UserError(f"token id {flat.max()} does not fit {np_dtype} (vocab_size {tok.vocab_size})")
        flat, starts = flat.astype(np_dtype), np.cumsum(lens) - lens
        for j, n in enumerate(lens.tolist()):
            s = fixed_split or ('val' if val_fraction and is_val(index, seed, val_fraction) else 'train')
            index += 1
            st = stats[s]
            if n <= n_special or n < min_tokens:
                st['dropped_empty' if n <= n_special else 'dropped_short'] += 1
                continue
            if max_tokens and n > max_tokens:
                st['truncated'] += 1
                n = max_tokens  # keep the head (BOS included; EOS is cut off)
            writers[s].add(flat[starts[j]:starts[j] + n])
            st['docs'], st['tokens'] = st['docs'] + 1, st['tokens'] + n
            kept, n_tok = kept + 1, n_tok + n
            if max_docs and kept >= max_docs:
                break
        bar.update(j + 1)
        bar.set_postfix_str(f'{n_tok / max(time.time() - t0, 1e-9):,.0f} tok/s', refresh=False)
        if max_docs and kept >= max_docs:
            batches.close()  # stops the worker pool; the rest of the input is not read
            break
    return index


def tokenize_splits(files, val_files, splits, writers, handles, tok, tok_path, np_dtype, bos, eos, text_key, corpus,
                    progress, **cfg):
    """The input files (then the val_input files, if any) through tokenize_stream -> (stats per split, docs read per
    stream)."""
    stats = {s: dict(docs=0, tokens=0, dropped_short=0, dropped_empty=0, truncated=0) for s in splits}
    docs_read = {}
    streams = [('train', files), ('val', val_files)] if val_files else [(None, files)]
    for fixed_split, stream_files in streams:
        name = fixed_split or '+'.join(splits)
        bar = tqdm(desc=f'tokenizing {name}', unit=' docs', disable=not progress, mininterval=0.5)
        handles.append(bar)  # closed on error too, so the error line is the last thing on stderr
        docs = iter_documents(stream_files, text_key, bool(corpus))
        docs_read[name] = tokenize_stream(docs, fixed_split, writers, stats, tok, tok_path, np_dtype, bos, eos, bar, **cfg)
        bar.close()
    return stats, docs_read


def make_meta(tok, tok_path, tok_final, np_dtype, bos, eos, stats, docs_read, files, val_files, corpus, text_key,
              min_tokens, max_tokens, max_docs, val_fraction, shuffle, seed, train_tokenizer, tokenizer_type,
              tokenizer_sample_mb, **_):
    return dict(
        tokenizer=tok_final, tokenizer_sha256=sha256_file(tok_path),
        vocab_size=tok.vocab_size, dtype=np_dtype.name, bos_id=tok.bos_id if bos else None,
        eos_id=tok.eos_id, add_bos=bos, add_eos=eos, splits=stats, docs_read=docs_read,
        filters=dict(min_tokens=min_tokens, max_tokens=max_tokens, max_docs=max_docs, val_fraction=val_fraction,
                     shuffle=shuffle, seed=seed),
        sources=dict(corpus=corpus or None, text_key=text_key, input=[os.path.abspath(p) for p in files],
                     val_input=[os.path.abspath(p) for p in val_files] if val_files else None),
        trained_tokenizer=dict(vocab_size=train_tokenizer, type=tokenizer_type, sample_mb=tokenizer_sample_mb) if train_tokenizer else None,
        created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))


def commit(out_dir, splits, meta, tmps, trained):
    """Temp names -> final names. meta.json goes away first and comes back last: at no moment does a directory
    holding a mix of two runs look complete."""
    meta_path = os.path.join(out_dir, 'meta.json')
    tmps.append(meta_path + '.tmp')
    with open(meta_path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=1)
    for stale in [meta_path] + ([] if 'val' in splits else list(split_paths(out_dir, 'val'))):
        if os.path.exists(stale):
            os.remove(stale)
    finals = [p for s in splits for p in split_paths(out_dir, s)]
    finals += [os.path.join(out_dir, n) for n in ('tokenizer.model', 'tokenizer_config.json')] if trained else []
    for p in finals + [meta_path]:
        os.replace(p + '.tmp', p)


def prepare(input=None, corpus='', val_input=None, val_fraction=0.0, out_dir='data', tokenizer='',
            train_tokenizer=0, tokenizer_type='bpe', tokenizer_sample_mb=20.0, text_key='text', min_tokens=0,
            max_tokens=0, max_docs=0, add_bos=True, add_eos=False, dtype='', shuffle=True, seed=1337,
            num_proc=1, progress=True):
    """Run the whole pipeline (the config keys are its arguments); returns the meta dict written."""
    cfg = dict(locals())
    # 1) check everything we can before writing anything
    files, val_files, splits, tok_path = check_settings(**cfg)
    made_out_dir = not os.path.exists(out_dir)  # removed again if we fail (when still empty)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"out_dir={out_dir!r}: cannot create it ({e.strerror})") from None
    tmps, handles = [], []  # removed / closed if anything fails
    try:
        # 2) the tokenizer (trained ones are outputs too: temp names until the end)
        tok_final = tok_path
        if train_tokenizer:
            tok_path = train_tokenizer_into(files, tmps=tmps, **cfg)
            tok_final = tok_path.removesuffix('.tmp')  # its name after the commit
        tok = Tokenizer(tok_path)
        if dtype == 'uint16' and tok.vocab_size > 2 ** 16:
            raise UserError(f"dtype=uint16 cannot hold vocab_size={tok.vocab_size} ({tok_final}): use dtype=uint32 or ''")
        np_dtype = np.dtype(dtype or ('uint16' if tok.vocab_size <= 2 ** 16 else 'uint32'))
        bos, eos = add_bos and tok.bos_id is not None, add_eos and tok.eos_id is not None

        # 3) stream documents -> tokens -> {split}.bin.tmp / {split}.idx.tmp
        writers = {}
        for s in splits:
            tmps.extend(p + '.tmp' for p in split_paths(out_dir, s))
            writers[s] = SplitWriter(out_dir, s)
            handles.append(writers[s])
        stats, docs_read = tokenize_splits(files, val_files, splits, writers, handles, tok, tok_path, np_dtype, bos, eos, **cfg)
        for h in handles:
            h.close()
        if not stats['train']['docs']:
            raise UserError(f"no training documents kept: {stats['train']} (check min_tokens / inputs)")

        # 4) optional seeded permutation, then commit
        if shuffle:
            for k, s in enumerate(splits):
                shuffle_split(writers[s].bin_tmp, writers[s].idx_tmp, np_dtype, np.random.default_rng([seed, k]), tmps)
        meta = make_meta(tok, tok_path, tok_final, np_dtype, bos, eos, stats, docs_read, files, val_files, **cfg)
        commit(out_dir, splits, meta, tmps, trained=bool(train_tokenizer))
        return meta
    except BaseException as e:  # incl. Ctrl-C: nothing half-written stays, then one line naming what failed
        for h in handles:
            try:
                h.close()
            except OSError:  # a full disk fails the final flush again: the temp files go anyway
                pass
        for p in tmps:
            remove(p)
        if made_out_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)
        if not isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)) and is_disk_full(e):
            raise UserError(f"no space left on device writing {out_dir}", code=1) from None
        raise


def write_jsonl_atomic(path, texts):
    """texts as a .jsonl file of {"text": ...} lines (this script's input format, read back by read_documents),
    written under a temp name."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with writing(path, [path + '.tmp']), open(path + '.tmp', 'w', encoding='utf-8') as f:
        for t in texts:
            f.write(json.dumps({'text': t}) + '\n')
    os.replace(path + '.tmp', path)
    print(f"wrote {path} ({len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB)")


def main():
    t0 = time.time()
    meta = prepare(**{k: globals()[k] for k in config_keys})
    print(f"{'split':<6} {'docs':>10} {'tokens':>14} {'mean len':>9} {'short':>8} {'empty':>7} {'truncated':>9}")
    for s, st in meta['splits'].items():
        print(f"{s:<6} {st['docs']:>10,} {st['tokens']:>14,} {st['tokens'] / max(st['docs'], 1):>9.0f} "
              f"{st['dropped_short']:>8,} {st['dropped_empty']:>7,} {st['truncated']:>9,}")
    print(f"wrote {out_dir} ({meta['dtype']}, vocab {meta['vocab_size']}, tokenizer {meta['tokenizer']}) in {time.time() - t0:.1f}s")


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run(main, interrupted='interrupted: nothing written')
