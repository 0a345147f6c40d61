"""
The prepared-data format: what prepare_data.py writes and train.py / eval_ppl.py read. PoSE samples its
chunks inside ONE document, so documents stay whole and separate; a data_dir holds, per split (train / val):

  {split}.bin   all tokens of the split back to back (uint16 when the vocab fits, else uint32)
  {split}.idx   int64 offsets, n_docs+1 of them: doc i = tokens[offsets[i]:offsets[i+1]]
  meta.json     tokenizer (path, sha256, vocab, BOS/EOS ids), dtype, per-split counts, filters, sources

Everything is written under temp names and renamed at the end, meta.json last: a directory with meta.json
is complete, an interrupted run leaves nothing that looks complete.

The writer's pieces and the readers live here, in one small file, so the layout is stated once and the two
sides cannot drift; train and eval import this, not the pipeline script (its process pool, its sentencepiece
trainer, its input readers). The pipeline itself (inputs -> tokens -> these files) is prepare_data.py.
"""
import os

import numpy as np

from errors import UserError, read_json


def split_paths(data_dir, split):
    return os.path.join(data_dir, f'{split}.bin'), os.path.join(data_dir, f'{split}.idx')


# ----------------------------------------------------------------------------- writing
class SplitWriter:
    """Appends documents to {split}.bin.tmp / {split}.idx.tmp; the caller renames them when the run is complete."""

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
    tokens read (seek + read: no memmap pages piling up in RSS) in the permuted order into a new file."""
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


# ----------------------------------------------------------------------------- reading (train.py, eval_ppl.py)
def read_meta(data_dir):
    """meta.json of a prepared dataset, checked: a broken one is named here, not deep inside a reader."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise UserError(f"{data_dir}: no meta.json, not a (complete) prepared dataset: run prepare_data.py")
    meta = read_json(path)
    splits, vocab = meta.get('splits'), meta.get('vocab_size')
    for bad, msg in [(meta.get('dtype') not in ('uint16', 'uint32'), f"dtype={meta.get('dtype')!r}: expected 'uint16' or 'uint32'"),
                     (not isinstance(vocab, int) or vocab < 1, f"vocab_size={vocab!r}: expected a positive integer"),
                     (not isinstance(splits, dict) or not all(isinstance(v, dict) and isinstance(v.get('docs'), int)
                                                              for v in splits.values()),
                      f"splits={splits!r}: expected {{split: {{'docs': n, ...}}}}")]:
        if bad:
            raise UserError(f"{path}: {msg}")
    return meta


def open_split(data_dir, split):
    """-> (tokens: np.memmap of meta['dtype'], offsets: int64 [n_docs+1]); doc i = tokens[offsets[i]:offsets[i+1]]"""
    meta = read_meta(data_dir)
    if split not in meta['splits']:
        raise UserError(f"{data_dir}: no split '{split}' (has: {', '.join(meta['splits'])})")
    bin_path, idx_path = split_paths(data_dir, split)
    for p in (bin_path, idx_path):
        if not os.path.isfile(p):
            raise UserError(f"{p}: missing (meta.json lists split '{split}')")
    offsets = np.fromfile(idx_path, dtype=np.int64)
    n_tokens = os.path.getsize(bin_path) // np.dtype(meta['dtype']).itemsize
    if len(offsets) != meta['splits'][split]['docs'] + 1 or offsets[-1] != n_tokens or offsets[0] != 0 \
            or np.any(np.diff(offsets) < 0):
        raise UserError(f"{data_dir}: {split}.idx / {split}.bin do not match meta.json (a mix of two runs?)")
    tokens = np.memmap(bin_path, dtype=meta['dtype'], mode='r') if n_tokens else np.zeros(0, meta['dtype'])
    return tokens, offsets
