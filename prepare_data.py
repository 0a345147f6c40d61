"""
Text corpora -> token memmap + document index, for PoSE training and evaluation.

    python prepare_data.py --input=pile/*.jsonl.zst --tokenizer=/models/Llama-2-7b-hf \
        --min_tokens=2048
    python prepare_data.py --corpus=python_stdlib --train_tokenizer=2048 --out_dir=data-demo

PoSE samples its chunks inside ONE document, so documents stay whole and separate: out_dir gets
{split}.bin (tokens), {split}.idx (document offsets) and meta.json for split in train / val -- the
format is data_format.py's, which also holds every reader (of these inputs, and of out_dir for
train.py / eval_*.py), so no other script imports this one. Everything is written under temp names
and renamed at the end, meta.json last; temp files a killed run left behind are removed by the next
run. Tokenizing uses tokenizer.py's `load_tokenizer`, as train and eval do.

Inputs (files, directories searched recursively, or glob patterns): .jsonl / .jsonl.gz /
.jsonl.zst (one JSON object per line, text under `text_key`), .parquet (column `text_key`),
.txt or any other explicitly named file (the whole file is one document). Reading streams, so
memory stays flat on a multi-GB .jsonl.zst.
"""
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

from data_format import (SplitWriter, corpus_files, find_files, iter_documents, shuffle_split,
                         split_paths)
from errors import UserError, check_writable, is_disk_full, remove, run
from tokenizer import Tokenizer, resolve_tokenizer, sha256_file

# -----------------------------------------------------------------------------
# config (nanoGPT style: python prepare_data.py [config.py] [--key=value ...])
input = None  # files / dirs / globs: a list, or a comma-separated string (None: use `corpus`)
corpus = ''  # an embedded corpus instead of `input`: 'python_stdlib' (this Python's stdlib .py)
val_input = None  # separate validation files (same forms as `input`); else val_fraction of input
val_fraction = 0.0  # fraction of documents sent to the val split (a seeded per-document coin)
out_dir = 'data'  # where {split}.bin / {split}.idx / meta.json go
tokenizer = ''  # sentencepiece .model, HF tokenizer.json, or an HF model directory holding either
train_tokenizer = 0  # >0: train a sentencepiece model of this vocab size on the inputs and use it
tokenizer_type = 'bpe'  # for train_tokenizer: 'bpe' or 'unigram'
tokenizer_sample_mb = 20.0  # for train_tokenizer: train on the first this-many MB of train docs
text_key = 'text'  # the field holding the text in .jsonl / .parquet
min_tokens = 0  # drop documents shorter than this (tokens incl. BOS/EOS; the paper keeps >= 2048)
max_tokens = 0  # truncate documents to this many tokens (0 = no limit; official PoSE code: 5 * L_c)
max_docs = 0  # keep at most this many documents from each input stream (0 = all)
add_bos = True  # prepend BOS to each document when the tokenizer's model uses one (Llama does)
add_eos = False  # append EOS to each document
dtype = ''  # '' = uint16 when vocab_size <= 65536 else uint32; or force 'uint16' / 'uint32'
shuffle = True  # seeded permutation of each split's documents (a second pass over the .bin)
seed = 1337  # for val_fraction and shuffle
num_proc = 1  # tokenizer worker processes (output order is the input order regardless)
# the types of the keys whose default is None (configurator.py)
CONFIG_TYPES = {'input': (str, list), 'val_input': (str, list)}
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and not k.isupper()
               and isinstance(v, (int, float, bool, str, list, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------


def is_val(index, seed, fraction):
    """Seeded per-document coin: stream-friendly, independent of num_proc and of everything else."""
    h = hashlib.blake2b(f'{seed}:{index}'.encode(), digest_size=8).digest()
    return int.from_bytes(h, 'little') < fraction * 2 ** 64


# ----------------------------------------------------------------------------- tokenizing
# ordered and parallel
_worker_tok = None


def _init_worker(tok_path):
    global _worker_tok
    # Ctrl-C is for the main process, which stops us cleanly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # one core per worker: num_proc is the parallelism
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
    _worker_tok = Tokenizer(tok_path)


def _encode_worker(texts, bos, eos):
    return _pack(_worker_tok.encode_batch(texts, bos, eos))


def _pack(lists):
    # one flat array + lengths: cheap to send between processes
    lens = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    # C loop, ~0.1 us/token
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum()))
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
    context = mp.get_context('fork' if sys.platform == 'linux' else 'spawn')
    pool = context.Pool(num_proc, _init_worker, (tok_path,))
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

    # an error inside the iterator would reach us as sentencepiece's RuntimeError: keep it
    failed = []

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
    # the trainer's sentence shuffle and sampling draw from its own generator: seeded, the same docs
    # give the same tokenizer whatever the thread count
    spm.set_random_generator_seed(1337)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=pieces(), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=0.9995, split_digits=True,
            normalization_rule_name='identity', remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            # newline: always its own piece
            allow_whitespace_only_pieces=True, user_defined_symbols=['\n'],
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16,
            input_sentence_size=1 << 20, shuffle_input_sentence=True,
            num_threads=min(8, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        why = str(e).strip().splitlines()[-1]
        raise UserError(f"train_tokenizer={vocab_size}: sentencepiece failed: {why}") from None
    if failed:
        raise failed[0]
    with open(model_path, 'wb') as f:
        f.write(model.getvalue())


# lets transformers load a trained tokenizer.model as a LlamaTokenizer
LLAMA_TOKENIZER_CONFIG = {
    'tokenizer_class': 'LlamaTokenizer', 'bos_token': '<s>', 'eos_token': '</s>',
    'unk_token': '<unk>', 'pad_token': None, 'add_bos_token': True, 'add_eos_token': False,
    'add_prefix_space': False, 'legacy': False, 'clean_up_tokenization_spaces': False,
    'model_max_length': 1 << 30}


# ----------------------------------------------------------------------------- the pipeline
# main() below runs the steps in order; each step gets what it uses as arguments.
# every temp name a run writes
TEMP_NAMES = [f'{s}.{ext}.tmp{shuf}' for s in ('train', 'val') for ext in ('bin', 'idx')
              for shuf in ('', '.shuf')]
TEMP_NAMES += ['meta.json.tmp', 'tokenizer.model.tmp', 'tokenizer_config.json.tmp']


def check_config():
    """The config, checked before anything is written -> (files, val_files or None, splits,
    tokenizer path or None when it is to be trained)."""
    if bool(input) == bool(corpus):
        raise UserError("set exactly one of input=FILES or corpus=python_stdlib")
    files = corpus_files(corpus) if corpus else find_files(input)
    val_files = find_files(val_input, 'val_input') if val_input else None
    for bad, msg in [
            (not 0.0 <= val_fraction < 1.0, f"val_fraction={val_fraction}: must be in [0, 1)"),
            (val_files and val_fraction, "set val_input or val_fraction, not both"),
            (min(min_tokens, max_tokens, max_docs) < 0,
             "min_tokens, max_tokens, max_docs must be >= 0"),
            (num_proc < 1, f"num_proc={num_proc}: must be >= 1"),
            (max_tokens and min_tokens > max_tokens,
             f"min_tokens={min_tokens} > max_tokens={max_tokens}"),
            (dtype not in ('', 'uint16', 'uint32'),
             f"dtype={dtype!r}: use '', 'uint16' or 'uint32'"),
            (tokenizer and train_tokenizer,
             "set tokenizer=PATH or train_tokenizer=VOCAB, not both"),
            (tokenizer_type not in ('bpe', 'unigram'),
             f"tokenizer_type={tokenizer_type!r}: use 'bpe' or 'unigram'")]:
        if bad:
            raise UserError(msg)
    tok_path = None if train_tokenizer else resolve_tokenizer(tokenizer)
    check_writable(out_dir, 'out_dir', directory=True)
    splits = ['train', 'val'] if (val_files or val_fraction) else ['train']
    return files, val_files, splits, tok_path


@contextmanager
def removed_on_failure(out_dir, made_out_dir, tmps, handles):
    """If the block fails or Ctrl-C arrives: the writers and bars in `handles` are closed, the temp
    files in `tmps` removed (and out_dir when this run made it and it is still empty), then a full
    disk is one line."""
    try:
        yield
    except BaseException as e:
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


def train_tokenizer_into(docs, out_dir, tmps, vocab_size, model_type, sample_mb):
    """Train a sentencepiece model on `docs` (the train documents, never val ones) into out_dir:
    tokenizer.model and tokenizer_config.json, under temp names (outputs like the .bin: renamed at
    the commit) -> the temp .model."""
    path = os.path.join(out_dir, 'tokenizer.model.tmp')
    tmps += [path, os.path.join(out_dir, 'tokenizer_config.json.tmp')]
    train_sentencepiece(docs, vocab_size, path, model_type, sample_mb)
    with open(tmps[-1], 'w') as f:
        json.dump(LLAMA_TOKENIZER_CONFIG, f, indent=2)
    return os.path.abspath(path)


def tokenize_stream(batches, split_of, writers, stats, np_dtype, n_special, min_tokens, max_tokens,
                    max_docs, bar):
    """Encoded batches (encode_documents) into the split writers, filtered: document i goes to
    split_of(i). Counts go to stats[split]; returns the documents read."""
    index, kept, n_tok, t0 = 0, 0, 0, time.time()
    for flat, lens in batches:
        if flat.size and flat.max() > np.iinfo(np_dtype).max:
            raise UserError(f"token id {flat.max()} does not fit {np_dtype}")
        flat, starts = flat.astype(np_dtype), np.cumsum(lens) - lens
        for j, n in enumerate(lens.tolist()):
            s = split_of(index)
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


def commit(out_dir, splits, meta, tmps, trained):
    """Temp names -> final names. meta.json goes away first and comes back last: at no moment does a
    directory holding a mix of two runs look complete."""
    meta_path = os.path.join(out_dir, 'meta.json')
    tmps.append(meta_path + '.tmp')
    with open(meta_path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=1)
    for stale in [meta_path] + ([] if 'val' in splits else list(split_paths(out_dir, 'val'))):
        if os.path.exists(stale):
            os.remove(stale)
    finals = [p for s in splits for p in split_paths(out_dir, s)]
    if trained:
        finals += [os.path.join(out_dir, n) for n in ('tokenizer.model', 'tokenizer_config.json')]
    for p in finals + [meta_path]:
        os.replace(p + '.tmp', p)


def main():
    t0 = time.time()
    # 1) check everything we can before writing anything; a killed run's temp files go
    files, val_files, splits, tok_path = check_config()
    made_out_dir = not os.path.exists(out_dir)  # removed again if we fail (when still empty)
    os.makedirs(out_dir, exist_ok=True)
    for name in TEMP_NAMES:
        remove(os.path.join(out_dir, name))
    tmps, handles = [], []  # removed / closed if anything fails
    with removed_on_failure(out_dir, made_out_dir, tmps, handles):
        # 2) the tokenizer (a trained one is an output too: temp names until the commit)
        tok_final = tok_path
        if train_tokenizer:
            train_docs = (t for i, t in enumerate(iter_documents(files, text_key, bool(corpus)))
                          if not (val_fraction and is_val(i, seed, val_fraction)))
            tok_path = train_tokenizer_into(train_docs, out_dir, tmps, train_tokenizer,
                                            tokenizer_type, tokenizer_sample_mb)
            tok_final = tok_path.removesuffix('.tmp')  # its name after the commit
        tok = Tokenizer(tok_path)
        if dtype == 'uint16' and tok.vocab_size > 2 ** 16:
            raise UserError(f"dtype=uint16 cannot hold vocab_size={tok.vocab_size} ({tok_final}): "
                            f"use dtype=uint32 or ''")
        np_dtype = np.dtype(dtype or ('uint16' if tok.vocab_size <= 2 ** 16 else 'uint32'))
        bos, eos = add_bos and tok.bos_id is not None, add_eos and tok.eos_id is not None

        # 3) stream documents -> tokens -> {split}.bin.tmp / {split}.idx.tmp: the train inputs
        # (every document to train, or each to val / train by its seeded coin), then val_input's
        writers = {}
        for s in splits:
            tmps.extend(p + '.tmp' for p in split_paths(out_dir, s))
            writers[s] = SplitWriter(out_dir, s)
            handles.append(writers[s])
        stats = {s: dict(docs=0, tokens=0, dropped_short=0, dropped_empty=0, truncated=0)
                 for s in splits}
        def coin(i):
            return 'val' if val_fraction and is_val(i, seed, val_fraction) else 'train'
        streams = [('train', files, lambda i: 'train'), ('val', val_files, lambda i: 'val')] \
            if val_files else [('+'.join(splits), files, coin)]
        docs_read = {}
        for name, stream, split_of in streams:
            bar = tqdm(desc=f'tokenizing {name}', unit=' docs', mininterval=0.5)
            # closed on error too, so the error line is the last thing on stderr
            handles.append(bar)
            batches = encode_documents(iter_documents(stream, text_key, bool(corpus)), tok_path,
                                       num_proc, bos, eos)
            docs_read[name] = tokenize_stream(batches, split_of, writers, stats, np_dtype,
                                              int(bos) + int(eos), min_tokens, max_tokens, max_docs,
                                              bar)
            bar.close()
        for h in handles:
            h.close()
        if not stats['train']['docs']:
            raise UserError(f"no training documents kept: {stats['train']} "
                            f"(check min_tokens / inputs)")

        # 4) optional seeded permutation, then commit
        if shuffle:
            for k, s in enumerate(splits):
                shuffle_split(writers[s].bin_tmp, writers[s].idx_tmp, np_dtype,
                              np.random.default_rng([seed, k]), tmps)
        meta = dict(
            tokenizer=tok_final, tokenizer_sha256=sha256_file(tok_path),
            vocab_size=tok.vocab_size, dtype=np_dtype.name, bos_id=tok.bos_id if bos else None,
            eos_id=tok.eos_id, add_bos=bos, add_eos=eos, splits=stats, docs_read=docs_read,
            filters=dict(min_tokens=min_tokens, max_tokens=max_tokens, max_docs=max_docs,
                         val_fraction=val_fraction, shuffle=shuffle, seed=seed),
            sources=dict(corpus=corpus or None, text_key=text_key,
                         input=[os.path.abspath(p) for p in files],
                         val_input=[os.path.abspath(p) for p in val_files] if val_files else None),
            trained_tokenizer=dict(vocab_size=train_tokenizer, type=tokenizer_type,
                                   sample_mb=tokenizer_sample_mb) if train_tokenizer else None,
            created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
        commit(out_dir, splits, meta, tmps, trained=bool(train_tokenizer))

    print(f"{'split':<6} {'docs':>10} {'tokens':>14} {'mean len':>9} {'short':>8} {'empty':>7} "
          f"{'truncated':>9}")
    for s, st in meta['splits'].items():
        mean = st['tokens'] / max(st['docs'], 1)
        print(f"{s:<6} {st['docs']:>10,} {st['tokens']:>14,} {mean:>9.0f} "
              f"{st['dropped_short']:>8,} {st['dropped_empty']:>7,} {st['truncated']:>9,}")
    print(f"wrote {out_dir} ({meta['dtype']}, vocab {meta['vocab_size']}, tokenizer "
          f"{meta['tokenizer']}) in {time.time() - t0:.1f}s")


if __name__ == '__main__':
    run(main, interrupted='interrupted: nothing written')
