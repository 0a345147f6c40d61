# prepare_data.py against independent references: the raw sentencepiece / tokenizers libraries
# re-tokenising every document by brute force, and the documents' own text.
import gzip
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
import zstandard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data_format  # noqa: E402
import prepare_data as pd  # noqa: E402
from conftest import make_hf_tokenizer, word_docs  # noqa: E402
from data_format import open_split, read_meta  # noqa: E402
from errors import UserError  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

STDLIB = sysconfig.get_paths()['stdlib']


def stdlib_texts(names):
    return [open(os.path.join(STDLIB, n), encoding='utf-8').read() for n in names]


# real text: a handful of stdlib modules of very different sizes (incl. an empty one)
DOC_FILES = ['json/__init__.py', 'json/decoder.py', 'json/encoder.py', 'json/scanner.py',
             'json/tool.py', 'colorsys.py', 'bisect.py', 'keyword.py', 'this.py', 'glob.py',
             'fnmatch.py', 'shlex.py', 'textwrap.py', 'string.py', 'numbers.py', 'heapq.py',
             'queue.py', 'sched.py', 'copy.py', 'stat.py', 'contextvars.py', 'struct.py',
             'token.py', 'email/mime/__init__.py']
DOCS = stdlib_texts(DOC_FILES)


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
    """A small sentencepiece model trained (in the test) on other real stdlib source."""
    path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.model')
    train = stdlib_texts(['argparse.py', 'collections/__init__.py', 'pathlib.py', 'difflib.py'])
    pd.train_sentencepiece(iter(train), 512, path, 'bpe', sample_mb=0.5)
    return path


def ref_encode(model_path, docs, bos=True, eos=False):
    sp = spm.SentencePieceProcessor(model_file=model_path)
    return [([1] if bos else []) + sp.encode(d) + ([2] if eos else []) for d in docs]


def split_docs(data_dir, split):
    tokens, offsets = open_split(data_dir, split)
    return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def write_jsonl(path, docs, key='text', opener=open):
    with opener(path, 'wt', encoding='utf-8') as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({'id': i, key: d}) + '\n')
    return str(path)


DEFAULTS = {k: getattr(pd, k) for k in pd.config_keys}


def run(tmp_path, name='out', **kw):
    """prepare_data.py's main() with the config keys kw (the others at their defaults, shuffle off)
    -> out_dir."""
    out = str(tmp_path / name)
    assert set(kw) <= set(DEFAULTS), set(kw) - set(DEFAULTS)
    vars(pd).update(DEFAULTS, out_dir=out, shuffle=False)
    vars(pd).update(kw)
    try:
        pd.main()
    finally:
        vars(pd).update(DEFAULTS)
    return out


def test_sentencepiece_roundtrip_on_real_source(sp_model):
    tok = load_tokenizer(sp_model)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)  # Llama's layout
    docs = DOCS + stdlib_texts(['tokenize.py', 'inspect.py']) + ['  leading spaces\n\n\ttabs\r\n',
                                                                 'émoji 😀 中文 123456']
    for doc in docs:
        ids = tok.encode(doc)
        assert ids[0] == 1 and max(ids) < 512
        assert tok.decode(ids) == doc
    assert tok.encode('x', bos=False, eos=True)[-1] == 2 and tok.encode('x', bos=False)[0] != 1


def test_counts_and_offsets_match_brute_force(tmp_path, sp_model):
    out = run(tmp_path, input=write_jsonl(tmp_path / 'a.jsonl', DOCS), tokenizer=sp_model)
    # the empty module is dropped
    expected = [ids for ids in ref_encode(sp_model, DOCS) if len(ids) > 1]
    assert split_docs(out, 'train') == expected
    meta = read_meta(out)
    tokens, offsets = open_split(out, 'train')
    assert tokens.dtype == np.uint16 and offsets.dtype == np.int64 and offsets[0] == 0
    assert meta['splits']['train']['docs'] == len(expected) == len(DOCS) - 1
    assert meta['splits']['train']['tokens'] == sum(map(len, expected)) == len(tokens)
    assert meta['splits']['train']['dropped_empty'] == 1 and list(meta['splits']) == ['train']
    assert meta['tokenizer'] == os.path.abspath(sp_model) and meta['vocab_size'] == 512
    assert meta['bos_id'] == 1 and meta['dtype'] == 'uint16'
    import hashlib
    assert meta['tokenizer_sha256'] == hashlib.sha256(open(sp_model, 'rb').read()).hexdigest()
    assert sorted(os.listdir(out)) == ['meta.json', 'train.bin', 'train.idx']


def test_filters_min_max_tokens_max_docs(tmp_path, sp_model):
    src = write_jsonl(tmp_path / 'a.jsonl', DOCS)
    full = [ids for ids in ref_encode(sp_model, DOCS, eos=True) if len(ids) > 2]
    lens = sorted(map(len, full))
    lo, hi = lens[len(lens) // 3], lens[2 * len(lens) // 3]
    out = run(tmp_path, input=src, tokenizer=sp_model, min_tokens=lo, max_tokens=hi, add_eos=True)
    expected = [ids[:hi] for ids in full if len(ids) >= lo]
    assert split_docs(out, 'train') == expected
    st = read_meta(out)['splits']['train']
    assert st['dropped_short'] == sum(len(x) < lo for x in full)
    assert st['truncated'] == sum(len(x) > hi for x in full) and st['truncated'] > 0
    assert all(x[-1] == 2 for x in expected if len(x) < hi)  # EOS on untruncated docs
    out = run(tmp_path, 'out2', input=src, tokenizer=sp_model, min_tokens=lo, max_docs=3)
    assert split_docs(out, 'train') \
        == [ids for ids in ref_encode(sp_model, DOCS) if len(ids) >= lo][:3]


def test_val_split_fraction_seeded_and_val_input(tmp_path, sp_model):
    docs = [f'document number {i}\n' * (1 + i % 5) for i in range(200)]
    src = write_jsonl(tmp_path / 'a.jsonl', docs)
    ref = [tuple(x) for x in ref_encode(sp_model, docs)]
    parts = {}
    for seed in (1, 1, 2):
        out = run(tmp_path, f'o{seed}', input=src, tokenizer=sp_model, val_fraction=0.25, seed=seed)
        train, val = [list(map(tuple, split_docs(out, s))) for s in ('train', 'val')]
        assert sorted(train + val) == sorted(ref)  # a partition of all documents (all distinct)
        assert 25 <= len(val) <= 75  # ~50 expected
        assert train == [x for x in ref if x in set(train)]  # stream order kept inside a split
        parts.setdefault(seed, []).append(val)
    assert parts[1][0] == parts[1][1] and parts[1][0] != parts[2][0]
    vsrc = write_jsonl(tmp_path / 'v.jsonl', DOCS[:3])
    out = run(tmp_path, 'ov', input=src, val_input=vsrc, tokenizer=sp_model)
    assert split_docs(out, 'train') == [list(x) for x in ref] \
        and split_docs(out, 'val') == ref_encode(sp_model, DOCS[:3])


def test_shuffle_is_a_seeded_permutation(tmp_path, sp_model):
    src = write_jsonl(tmp_path / 'a.jsonl', DOCS)
    plain = split_docs(run(tmp_path, 'p', input=src, tokenizer=sp_model), 'train')
    a = split_docs(run(tmp_path, 'a', input=src, tokenizer=sp_model, shuffle=True, seed=3), 'train')
    b = split_docs(run(tmp_path, 'b', input=src, tokenizer=sp_model, shuffle=True, seed=3), 'train')
    c = split_docs(run(tmp_path, 'c', input=src, tokenizer=sp_model, shuffle=True, seed=4), 'train')
    assert sorted(a) == sorted(plain) and a != plain and a == b and c != a


def test_all_input_formats_round_trip(tmp_path, sp_model):
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = DOCS[:8]
    expected = [x for x in ref_encode(sp_model, docs) if len(x) > 1]
    (tmp_path / 'txt' / 'sub').mkdir(parents=True)
    # a directory, recursive, sorted by name; non-.txt files there ignored
    for i, d in enumerate(docs):
        (tmp_path / 'txt' / ('sub' if i >= 4 else '') / f'{i:02d}.txt').write_text(d,
                                                                                   encoding='utf-8')
    (tmp_path / 'txt' / 'notes.md').write_text('ignored')
    zst = tmp_path / 'a.jsonl.zst'
    with open(zst, 'wb') as f, zstandard.ZstdCompressor().stream_writer(f) as w:
        w.write(''.join(json.dumps({'body': d}) + '\n\n' for d in docs).encode())
    pq.write_table(pa.table({'body': docs, 'n': list(range(len(docs)))}), tmp_path / 'a.parquet',
                   row_group_size=3)
    sources = {'jsonl': write_jsonl(tmp_path / 'a.jsonl', docs, 'body'),
               'gz': write_jsonl(tmp_path / 'a.jsonl.gz', docs, 'body', gzip.open), 'zst': str(zst),
               'parquet': str(tmp_path / 'a.parquet'), 'txt': str(tmp_path / 'txt')}
    for name, src in sources.items():
        out = run(tmp_path, name, input=src, tokenizer=sp_model, text_key='body')
        assert split_docs(out, 'train') == expected, name
    both = run(tmp_path, 'both', input=f"{sources['zst']},{tmp_path}/a.parq*", tokenizer=sp_model,
               text_key='body')
    assert split_docs(both, 'train') == expected + expected  # comma list + glob, in the order given


def test_hf_tokenizer_json_bos_from_tokenizer_config(tmp_path):
    folder = str(tmp_path / 'llama3ish')
    ref = make_hf_tokenizer(folder, 1000, ('<|begin_of_text|>', '<|end_of_text|>', '<s>', '</s>'))
    json.dump({'bos_token': '<|begin_of_text|>', 'eos_token': {'content': '<|end_of_text|>'}},
              open(os.path.join(folder, 'tokenizer_config.json'), 'w'))
    tok = load_tokenizer(folder)  # a model directory
    bos, eos = ref.token_to_id('<|begin_of_text|>'), ref.token_to_id('<|end_of_text|>')
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (bos, eos, ref.get_vocab_size())
    assert sorted(map(os.path.basename, tok.files)) == ['tokenizer.json', 'tokenizer_config.json']
    docs = word_docs(1000)
    out = run(tmp_path, input=write_jsonl(tmp_path / 'a.jsonl', docs), tokenizer=folder,
              add_eos=True)
    assert split_docs(out, 'train') \
        == [[bos] + ref.encode(d, add_special_tokens=False).ids + [eos] for d in docs]
    assert tok.decode(tok.encode(docs[0])) == docs[0]
    # Qwen2-style: bos_token null in tokenizer_config beats config.json's bos_token_id -> no BOS
    json.dump({'bos_token': None, 'eos_token': '</s>'},
              open(os.path.join(folder, 'tokenizer_config.json'), 'w'))
    json.dump({'bos_token_id': bos}, open(os.path.join(folder, 'config.json'), 'w'))
    tok = load_tokenizer(os.path.join(folder, 'tokenizer.json'))
    assert tok.bos_id is None and tok.eos_id == ref.token_to_id('</s>')
    assert tok.encode(docs[0]) == ref.encode(docs[0], add_special_tokens=False).ids
    # no configs: BOS from the tokenizer's post-processor template (as Llama 2/3's tokenizer.json)
    for n in ('tokenizer_config.json', 'config.json'):
        os.remove(os.path.join(folder, n))
    ref.post_processor = tokenizers.processors.TemplateProcessing(
        single='<|begin_of_text|> $A', special_tokens=[('<|begin_of_text|>', bos)])
    ref.save(os.path.join(folder, 'tokenizer.json'))
    assert load_tokenizer(folder).bos_id == bos


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    folder = str(tmp_path / 'big')
    ref = make_hf_tokenizer(folder, 70000)
    docs = word_docs(70000) + ['w69999 w65536 w0']
    src = write_jsonl(tmp_path / 'a.jsonl', docs)
    out = run(tmp_path, input=src, tokenizer=folder)
    tokens, _ = open_split(out, 'train')
    expected = [[ref.token_to_id('<s>')] + ref.encode(d, add_special_tokens=False).ids
                for d in docs]
    assert tokens.dtype == np.uint32 and max(map(max, expected)) > 65535
    assert split_docs(out, 'train') == expected
    with pytest.raises(ValueError, match=r'dtype=uint16 .*vocab_size=70003'):
        run(tmp_path, 'o16', input=src, tokenizer=folder, dtype='uint16')
    assert not os.path.exists(tmp_path / 'o16')  # nothing written, not even the directory
    out = run(tmp_path, 'o32', input=write_jsonl(tmp_path / 'b.jsonl', DOCS[:3]), tokenizer=folder,
              dtype='uint32')
    assert read_meta(out)['dtype'] == 'uint32'  # a forced uint32 with a small vocab


def test_num_proc_2_is_byte_identical(tmp_path, sp_model, monkeypatch):
    monkeypatch.setattr(pd, 'BATCH_DOCS', 2)  # many small batches: ordering across workers matters
    src = write_jsonl(tmp_path / 'a.jsonl', DOCS)
    a = run(tmp_path, 'p1', input=src, tokenizer=sp_model, val_fraction=0.3, num_proc=1,
            shuffle=True)
    b = run(tmp_path, 'p2', input=src, tokenizer=sp_model, val_fraction=0.3, num_proc=2,
            shuffle=True)
    for name in ('train.bin', 'train.idx', 'val.bin', 'val.idx'):
        assert open(os.path.join(a, name), 'rb').read() \
            == open(os.path.join(b, name), 'rb').read(), name
    c = run(tmp_path, 'p3', input=src, tokenizer=sp_model, num_proc=2, max_docs=5)
    assert split_docs(c, 'train') == [x for x in ref_encode(sp_model, DOCS) if len(x) > 1][:5]


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, sp_model, monkeypatch):
    src = write_jsonl(tmp_path / 'a.jsonl', DOCS)
    old = run(tmp_path, input=src, tokenizer=sp_model)  # a complete dataset from an earlier run
    before = {n: open(os.path.join(old, n), 'rb').read() for n in os.listdir(old)}
    real = data_format.read_documents

    def dying(path, text_key='text', lenient=False):  # the stream dies after a few documents
        for i, doc in enumerate(real(path, text_key, lenient)):
            if i == 10:
                raise KeyboardInterrupt
            yield doc
    monkeypatch.setattr(data_format, 'read_documents', dying)
    monkeypatch.setattr(pd, 'BATCH_DOCS', 3)  # some batches are written before the interrupt
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, input=src, tokenizer=sp_model, val_fraction=0.2)
    # untouched
    assert {n: open(os.path.join(old, n), 'rb').read() for n in os.listdir(old)} == before
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 'fresh', input=src, train_tokenizer=300, tokenizer_sample_mb=0.2, num_proc=2)
    # no .bin, no .idx, no meta.json, no tokenizer, no .tmp, no empty dir
    assert not os.path.exists(tmp_path / 'fresh')


def test_errors_are_one_line_and_write_nothing(tmp_path, sp_model):
    good = write_jsonl(tmp_path / 'good.jsonl', DOCS[:3])
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"text": "ok"}\n\n{"text": broken}\n')
    nokey = tmp_path / 'nokey.jsonl'
    nokey.write_text('{"text": "ok"}\n{"content": "x"}\n')
    (tmp_path / 'empty').mkdir()
    cases = [
        (dict(input=str(tmp_path / 'nope.jsonl'), tokenizer=sp_model), UserError,
         'input not found: .*nope.jsonl'),
        (dict(input=str(tmp_path / 'empty'), tokenizer=sp_model), UserError,
         'no input files found in .*empty'),
        (dict(input=str(bad), tokenizer=sp_model), ValueError, r'bad\.jsonl:3: invalid JSON'),
        (dict(input=f'{good},{nokey}', tokenizer=sp_model), ValueError,
         r"nokey\.jsonl:2: no text key 'text'"),
        (dict(input=good, tokenizer=str(tmp_path / 'missing.model')), UserError,
         'tokenizer not found: .*missing.model'),
        (dict(input=good, tokenizer=str(tmp_path / 'empty')), UserError,
         'tokenizer not found: no tokenizer.model'),
        (dict(input=good, tokenizer=good), ValueError, 'not a sentencepiece model'),
        (dict(input=good), UserError, 'tokenizer not found'),
        (dict(input=good, tokenizer=sp_model, min_tokens=10 ** 9), ValueError,
         'no training documents kept'),
    ]
    for i, (kw, exc, pattern) in enumerate(cases):
        with pytest.raises(exc, match=pattern) as e:
            run(tmp_path, f'o{i}', **kw)
        assert '\n' not in str(e.value)
        assert not os.path.exists(tmp_path / f'o{i}'), kw
    with pytest.raises(UserError, match='no meta.json'):
        open_split(str(tmp_path / 'empty'), 'train')
    with pytest.raises(ValueError, match="no split 'val'"):
        open_split(run(tmp_path, input=good, tokenizer=sp_model), 'val')



def test_corrupt_inputs_and_tokenizers_are_one_line_user_errors(tmp_path, sp_model):
    """Each library's own exception for a broken file (gzip's OSError, zstandard's ZstdError,
    pyarrow's ArrowInvalid, tokenizers' bare Exception, sentencepiece's RuntimeError) becomes one
    line naming the file."""
    good = write_jsonl(tmp_path / 'good.jsonl', DOCS[:3])
    gz = tmp_path / 'cut.jsonl.gz'
    gz.write_bytes(gzip.compress(open(good, 'rb').read())[:-20])  # truncated
    zst = tmp_path / 'bad.jsonl.zst'
    zst.write_bytes(b'\x28\xb5\x2f\xfd garbage after the zstd magic')
    pq = tmp_path / 'bad.parquet'
    pq.write_bytes(b'not parquet at all')
    (tmp_path / 'tokjson').mkdir()
    (tmp_path / 'tokjson' / 'tokenizer.json').write_text('{"not": "a tokenizer"}')
    (tmp_path / 'bad.model').write_text('not a model')
    cases = [(dict(input=str(gz), tokenizer=sp_model), rf'{gz}:\d+: unreadable'),
             (dict(input=str(zst), tokenizer=sp_model), rf'{zst}:\d+: unreadable \(ZstdError'),
             (dict(input=str(pq), tokenizer=sp_model), f'{pq}: unreadable parquet'),
             (dict(input=good, tokenizer=str(tmp_path / 'tokjson')),
              'tokenizer.json: not a tokenizers tokenizer.json'),
             (dict(input=good, tokenizer=str(tmp_path / 'bad.model')),
              'bad.model: not a sentencepiece model')]
    for i, (kw, pattern) in enumerate(cases):
        with pytest.raises(UserError, match=pattern) as e:
            run(tmp_path, f'o{i}', **kw)
        assert '\n' not in str(e.value) and not os.path.exists(tmp_path / f'o{i}')

def test_cli_embedded_corpus_and_error_exit(tmp_path):
    out = str(tmp_path / 'demo')
    cmd = [sys.executable, os.path.join(ROOT, 'prepare_data.py'), '--corpus=python_stdlib',
           f'--out_dir={out}', '--train_tokenizer=400', '--tokenizer_sample_mb=0.3',
           '--max_docs=12', '--val_fraction=0.2']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = read_meta(out)
    assert meta['tokenizer'] == os.path.join(out, 'tokenizer.model') and meta['vocab_size'] == 400
    assert sorted(os.listdir(out)) == ['meta.json', 'tokenizer.model', 'tokenizer_config.json',
                                       'train.bin', 'train.idx', 'val.bin', 'val.idx']
    tok = load_tokenizer(out)
    sources = {open(p, encoding='utf-8').read() for p in meta['sources']['input'][:40]}
    kept = split_docs(out, 'train') + split_docs(out, 'val')
    # whole stdlib files the trained tokenizer + its tokenizer_config.json load in transformers
    # (what an HF export carries)
    assert len(kept) == 12 and all(tok.decode(d) in sources and d[0] == 1 for d in kept)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(out)
    for text in DOCS[:6] + ['def f(x):\n    return x  # 123\n',
                            'The pass key is 48213. Remember it.']:
        assert hf(text)['input_ids'] == tok.encode(text), text
    bad = tmp_path / 'bad.jsonl.gz'
    with gzip.open(bad, 'wt') as f:
        f.write('{"text": "a"}\n{"text": 1\n')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare_data.py'), f'--input={bad}',
                        f'--out_dir={tmp_path / "x"}', f'--tokenizer={out}'], capture_output=True,
                        text=True, timeout=60)
    last = r.stderr.strip().splitlines()[-1]  # after the progress bar
    assert r.returncode == 2 and last.startswith(f'error: {bad}:2: invalid JSON') \
        and r.stderr.count('error') == 1
    assert not os.path.exists(tmp_path / 'x')  # not even an empty out_dir
