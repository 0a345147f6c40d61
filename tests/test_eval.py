"""eval_ppl.py and eval_passkey.py against independent references: transformers' own Llama on the
same tiny random checkpoint (perplexity by a token-by-token brute force, greedy decoding step by
step), the paper's prompt template written out by hand, and a real (sentencepiece) tokenizer trained
here."""
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from itertools import product
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval_passkey  # noqa: E402
import model  # noqa: E402
import eval_ppl  # noqa: E402
from errors import UserError  # noqa: E402
from hf_checkpoint import load_pretrained  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
ENGLISH = """It was a bright cold day in April, and the clocks were striking thirteen.
The quick brown fox jumps over the lazy dog while the farmer sleeps under the old oak tree.
Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.
In a hole in the ground there lived a hobbit, not a nasty dirty wet hole filled with worms.
What is the pass key? The pass key is a number that you must remember until the end of the text.
Remember it well, because I will ask you about it, and you will answer with the number only.
Numbers such as 12345, 67890, 24680 and 13579 appear in reports, tables and long documents.
There is an important info hidden inside a lot of irrelevant text, find it and memorize them.
"""
MAX_POS = 256


def hf_llama(tmp, name, vocab, rope_scaling=None, seed=0):
    """A tiny random transformers Llama saved as an HF dir (weights large enough that context
    matters)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                      rope_theta=10000.0, rope_scaling=rope_scaling, initializer_range=0.15,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(cfg).eval()
    path = str(tmp / name)
    hf.save_pretrained(path)
    return path, hf


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    import sentencepiece as spm
    tmp = tmp_path_factory.mktemp('eval')
    lines = ENGLISH.splitlines() + [FILLER, TASK] * 3
    # a Llama-style sentencepiece model: unk 0, bos 1, eos 2, digits split, byte fallback
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=400,
                                   model_type='bpe', split_digits=True, byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = sp.get_piece_size()
    plain, hf = hf_llama(tmp, 'llama', vocab)
    (tmp / 'llama' / 'tokenizer.model').write_bytes(buf.getvalue())
    from transformers import LlamaForCausalLM
    lin = {'rope_type': 'linear', 'factor': 2.0}
    scaled, hf_scaled = hf_llama(tmp, 'llama_linear', vocab, rope_scaling=lin)
    # the same weights, a linear-scaled RoPE in config.json
    hf_scaled.load_state_dict(hf.state_dict())
    hf_scaled.save_pretrained(scaled)
    hf_scaled = LlamaForCausalLM.from_pretrained(scaled).eval()
    # a prepared split in the documented format: docs start with BOS like prepare_data writes them
    rng = np.random.default_rng(0)
    lens = [40, 333, 100, 412, 300, 700]
    docs = [np.concatenate([[1], rng.integers(3, vocab, n - 1)]) for n in lens]
    data = tmp / 'data'
    data.mkdir()
    np.concatenate(docs).astype(np.uint16).tofile(data / 'val.bin')
    np.concatenate([[0], np.cumsum(lens)]).astype(np.int64).tofile(data / 'val.idx')
    meta = {'tokenizer': str(tmp / 'llama' / 'tokenizer.model'), 'tokenizer_sha256': '',
            'vocab_size': vocab, 'dtype': 'uint16', 'bos_id': 1, 'eos_id': 2,
            'splits': {'val': {'docs': len(lens), 'tokens': sum(lens)}}}
    (data / 'meta.json').write_text(json.dumps(meta))
    ours, ours_scaled = load_pretrained(plain), load_pretrained(scaled)
    # the eval forward in many row chunks (load_model: 512)
    ours.infer_chunk = ours_scaled.infer_chunk = 16
    return dict(tmp=tmp, plain=plain, scaled=scaled, hf=hf, hf_scaled=hf_scaled, data=str(data),
                docs=docs, tok=load_tokenizer(plain), ours=ours, ours_scaled=ours_scaled, lin=lin)


def scoring_window(n, L, stride, mode, add_bos):
    """Brute force, token by token: {j: the start b of the window that scores doc[j]}. The windows,
    as a set: every multiple of the stride whose window ends before the text's end, plus one window
    flush with the text's end (the whole text when it is shorter); only the first in 'truncate'.
    doc[j] goes to the first window whose input holds the token that predicts it (the BOS predicts
    doc[b])."""
    nbos = int(add_bos)
    n_doc, stride = L - nbos, stride or L
    starts = sorted({b for b in range(0, n, stride) if b + n_doc < n} | {max(n - n_doc, 0)})
    starts = starts[:1] if mode == 'truncate' else starts
    out = {}
    for j in range(1 - nbos, n):
        hits = [b for b in starts if b - nbos <= j - 1 < b + n_doc]
        if hits:
            out[j] = hits[0]
    return out


def test_window_spans_equals_the_brute_force_windows():
    for n, L, stride, mode, add_bos in product(range(1, 40), (2, 3, 5, 8), (None, 1, 2, 3, 5),
                                               ('sliding', 'truncate'), (False, True)):
        if stride is not None and stride > L or L - add_bos < 1:
            continue
        spans = eval_ppl.window_spans(n, L, stride, mode, add_bos)
        got = {j: b for b, first, end in spans for j in range(first, end)}
        assert got == scoring_window(n, L, stride, mode, add_bos), (n, L, stride, mode, add_bos)


@torch.no_grad()
def hf_nll(hf, doc, L, stride, mode, add_bos, bos=1):
    """doc[j] scored by its window (scoring_window); its log-prob from transformers' full logits of
    that window."""
    n, nbos = len(doc), int(add_bos)
    n_doc = L - nbos
    logp, total, count = {}, 0.0, 0
    for j, b in scoring_window(n, L, stride, mode, add_bos).items():
        if b not in logp:
            ids = torch.tensor(([bos] if nbos else []) + [int(t) for t in doc[b:b + n_doc]])[None]
            logp[b] = torch.log_softmax(hf(ids).logits[0].double(), -1)
        total -= logp[b][j - 1 - b + nbos, int(doc[j])].item()
        count += 1
    return total, count


def test_window_spans_by_hand():
    # n=10, L=4, stride 2: inputs doc[0:4], [2:6], [4:8], [6:10]; each scores what the last did not
    assert eval_ppl.window_spans(10, 4, 2) == [(0, 1, 5), (2, 5, 7), (4, 7, 9), (6, 9, 10)]
    # BOS + 3 doc tokens per window; the BOS predicts doc[b], so doc[0] is scored too
    assert eval_ppl.window_spans(10, 4, 2, add_bos=True) \
        == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    # disjoint; the last window is pulled back to doc[6:10] and scores only doc[9]
    assert eval_ppl.window_spans(10, 4) == [(0, 1, 5), (4, 5, 9), (6, 9, 10)]
    assert eval_ppl.window_spans(10, 4, 1, mode='truncate') == [(0, 1, 5)]
    assert eval_ppl.window_spans(3, 8) == [(0, 1, 3)]  # a document shorter than the window
    with pytest.raises(ValueError, match='stride'):
        eval_ppl.window_spans(10, 4, 5)  # would leave doc tokens no window predicts


@pytest.mark.parametrize('L,stride,mode,add_bos,which', [
    (64, 24, 'sliding', False, 'plain'),   # overlapping windows
    (48, 20, 'sliding', True, 'plain'),    # overlap, BOS per window, stride not dividing anything
    (64, None, 'sliding', True, 'plain'),  # disjoint
    (64, None, 'truncate', False, 'plain'),
    (100, 30, 'sliding', True, 'scaled'),  # the checkpoint's own rope_scaling
    # rope_scaling override on the unscaled weights (PI-only)
    (100, 30, 'sliding', True, 'override'),
])
def test_ppl_matches_transformers(env, L, stride, mode, add_bos, which):
    if which == 'override':
        ours = eval_ppl.load_model(env['plain'], rope_scaling=env['lin'])
    else:
        ours = env['ours_scaled'] if which == 'scaled' else env['ours']
    hf = env['hf'] if which == 'plain' else env['hf_scaled']
    docs = [d[1:] for d in env['docs'][1:4]]  # 332, 99 (< L for some cases), 411 tokens
    ours_sum, ours_n, ref_sum, ref_n = 0.0, 0, 0.0, 0
    for d in docs:
        s, c = eval_ppl.sliding_window_nll(ours, d, L, stride, mode, add_bos, bos_id=1)
        rs, rc = hf_nll(hf, d, L, stride, mode, add_bos)
        assert c == rc
        ours_sum, ours_n, ref_sum, ref_n = ours_sum + s, ours_n + c, ref_sum + rs, ref_n + rc
    if mode == 'sliding':  # every token once (doc[0] only when a BOS predicts it)
        assert ours_n == sum(len(d) - 1 + add_bos for d in docs)
    assert np.exp(ours_sum / ours_n) == pytest.approx(np.exp(ref_sum / ref_n), rel=1e-4)
    assert ours_sum == pytest.approx(ref_sum, rel=1e-4)


@torch.no_grad()
def official_ppl(hf, docs, L, step, truncate, bos=1):
    """dwzhu-pku/PoSE src/eval_ppl.py compute_perplexity (add_start_token=True), transcribed:
    transformers' own loss on labels masked to the window's last trg_len tokens, times trg_len."""
    max_tok = L - 1
    if truncate:
        docs, step = [d[:max_tok] for d in docs], max_tok
    total, count = 0.0, 0
    for d in docs:
        labels = torch.tensor(np.asarray(d, dtype=np.int64))[None]
        n, prev = labels.size(1), 0
        for begin in range(0, n, step):
            end = min(begin + max_tok, n)
            trg = end - prev
            inp = torch.cat([torch.tensor([[bos]]), labels[:, begin:end]], 1)
            tgt = inp.clone()
            tgt[:, :-trg] = -100
            total += hf(inp, labels=tgt).loss.double().item() * trg
            count += trg
            prev = end
            if end == n:
                break
    return total, count


@pytest.mark.parametrize('L,stride,mode',
                         [(64, 24, 'sliding'), (48, 47, 'sliding'), (64, None, 'sliding'),
                                           (48, None, 'truncate'), (300, 40, 'sliding')])
def test_official_windows_match_the_authors_code(env, L, stride, mode):
    docs = [d[1:] for d in env['docs'][1:5]]  # 332, 99, 411, 299 tokens: short last windows too
    ours_sum, ours_n = 0.0, 0
    for d in docs:
        s, c = eval_ppl.sliding_window_nll(env['ours'], d, L, stride, mode, True, bos_id=1,
                                           windows='official')
        ours_sum, ours_n = ours_sum + s, ours_n + c
    ref_sum, ref_n = official_ppl(env['hf'], docs, L, stride or L - 1, mode == 'truncate')
    assert ours_n == ref_n and ours_sum == pytest.approx(ref_sum, rel=1e-4)
    if mode == 'truncate':
        assert ours_n == (L - 1) * len([d for d in docs if len(d) >= L - 1]) \
            + sum(len(d) for d in docs if len(d) < L - 1)


def test_protocols_cli(env, tmp_path):
    """--protocol=official with window lengths the tiny data allows: the first docs in data order,
    the authors' windows, every setting recorded and printed; ppl = the authors' code on those
    docs."""
    out = str(tmp_path / 'official.json')
    proc = run('eval_ppl.py', f"--model={env['plain']}", f"--data_dir={env['data']}",
               '--protocol=official', '--lengths=[32,64]', '--min_doc_len=299', '--doc_tokens=299',
               '--num_docs=2', '--dtype=float32', '--device=cpu', f'--out={out}')
    assert proc.returncode == 0, proc.stderr
    r = json.load(open(out))
    lens = [len(d) - 1 for d in env['docs']]  # 39, 332, 99, 411, 299, 699 without the leading BOS
    assert r['doc_ids'] == [1, 3]  # the first two with >= 299 tokens, not a random draw
    assert r['protocol'] == 'official' and r['overridden'] == ['doc_tokens', 'dtype', 'lengths',
                                                               'min_doc_len', 'num_docs']
    st = r['settings']  # every setting recorded: the protocol's own where not overridden
    assert all(st[k] == eval_ppl.PROTOCOLS['official'][k]
               for k in eval_ppl.SETTING_KEYS if k not in r['overridden'])
    assert 'protocol official:' in proc.stdout and 'documents (2): [1, 3]' in proc.stdout \
        and 'windows=official' in proc.stdout
    for L in (32, 64):
        picked = [env['docs'][i][1:300] for i in (1, 3)]
        ref_sum, ref_n = official_ppl(env['hf'], picked, L, None, True)
        assert r['tokens'][str(L)] == ref_n == 2 * (L - 1)
        assert r['ppl'][str(L)] == pytest.approx(np.exp(ref_sum / ref_n), rel=1e-4)
    assert lens[1] >= 299 and lens[3] >= 299 and lens[2] < 299


@pytest.mark.parametrize('name', list(eval_ppl.PROTOCOLS))
def test_each_protocol_picks_and_scores_like_the_references(env, name):
    """Each protocol at toy scale (its lengths, document lengths and stride divided by one factor
    so that its longest window is 64 tokens; 2 documents): the documents it picks are the ones it
    names (long enough; the first ones or a seeded draw), and its NLL per length equals the
    brute-force windows scored by transformers (aligned) or the authors' code (official)."""
    full = eval_ppl.resolve_protocol(name, {})
    k = max(full['lengths']) // 64
    toy = {'lengths': sorted({max(2, L // k) for L in full['lengths']})[-2:], 'num_docs': 2,
           'stride': full['stride'] // k, 'min_doc_len': -(-full['min_doc_len'] // k),
           'doc_tokens': full['doc_tokens'] // k, 'dtype': 'float32'}
    st = eval_ppl.resolve_protocol(name, toy)
    docs = [d[1:] for d in env['docs']]  # without the BOS prepare_data writes (load_docs drops it)
    ids = eval_ppl.select_docs([len(d) for d in docs], st['min_doc_len'], 2, 1337, st['draw'])
    long_enough = [i for i, d in enumerate(docs) if len(d) >= st['min_doc_len']]
    assert len(ids) == 2 and set(ids) <= set(long_enough)
    if st['draw'] == 'first':
        assert ids == long_enough[:2]
    picked = [docs[i][:st['doc_tokens']] if st['doc_tokens'] else docs[i] for i in ids]
    _, nll, counts, _ = eval_ppl.evaluate(env['ours'], picked, st, st['add_bos'], 1)
    for L in st['lengths']:
        if st['windows'] == 'official':
            ref, n = official_ppl(env['hf'], picked, L, st['stride'] or L - 1,
                                  st['mode'] == 'truncate')
        else:
            ref, n = map(sum, zip(*(hf_nll(env['hf'], d, L, st['stride'] or None, st['mode'],
                                           st['add_bos']) for d in picked)))
        assert counts[str(L)] == n and nll[str(L)] == pytest.approx(ref, rel=1e-4), (name, L)


def test_protocols_resolve_refuses_bad_values():
    with pytest.raises(ValueError, match="'table1'"):
        eval_ppl.resolve_protocol('table1', {})
    with pytest.raises(ValueError, match="draw.*'last'"):
        eval_ppl.resolve_protocol('official', {'draw': 'last'})


def test_default_names_unique_and_no_overwrite(env, tmp_path):
    """Two train.py exports (both named hf) get two result files; a third run refuses, --overwrite
    replaces."""
    for run_dir in ('run-a', 'run-b'):
        shutil.copytree(env['plain'], tmp_path / run_dir / 'hf')
    names = {eval_ppl.default_out('ppl', str(tmp_path / r / 'hf'), None, 'nanopose')
             for r in ('run-a', 'run-b')}
    assert names == {os.path.join('out', 'ppl-run-a-nanopose.json'),
                     os.path.join('out', 'ppl-run-b-nanopose.json')}
    assert eval_ppl.default_out('passkey', str(tmp_path / 'run-a' / 'hf'), env['lin']) == \
        os.path.join('out',
                     'passkey-run-a-linearx2.0.json')  # PI-only next to the original: another file
    args = ['eval_passkey.py', f"--model={tmp_path / 'run-a' / 'hf'}", '--lengths=[300]',
            '--num_trials=1', '--device=cpu']
    env_cwd = dict(os.environ, OMP_NUM_THREADS='1')
    first = subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, env=env_cwd)
    assert first.returncode == 0, first.stderr
    path = tmp_path / 'out' / 'passkey-run-a.json'
    before = path.read_bytes()
    again = subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, env=env_cwd)
    assert again.returncode == 2 and again.stderr.strip().count('\n') == 0
    assert 'exists' in again.stderr and 'overwrite' in again.stderr and path.read_bytes() == before
    forced = subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:],
                             '--overwrite=True', '--seed=5'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env_cwd)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(path.read_text())['settings']['seed'] == 5


@pytest.mark.parametrize('chunk', [0, 7, 64, 1000])
def test_chunked_eval_forward_matches_transformers(env, chunk):
    """The row-chunked no-grad forward (x updated in place) == transformers' logits, batch 2,
    skip-wise position ids, T not a multiple of the chunk; and our chunk_nll == log_softmax's
    NLL."""
    ours, hf = eval_ppl.load_model(env['scaled']), env['hf_scaled']
    ours.infer_chunk = chunk
    idx = torch.from_numpy(np.stack([env['docs'][3][:100], env['docs'][4][:100]]).astype(np.int64))
    pos = torch.cat([torch.arange(40), torch.arange(40) + 90, torch.arange(20) + 200])
    pos = pos[None].repeat(2, 1)
    with torch.inference_mode():
        h = ours.forward_hidden(idx, pos)
        ref = hf(input_ids=idx, position_ids=pos).logits
        assert (ours.lm_head(h) - ref).abs().max() < 2e-4
        nll = eval_ppl.chunk_nll(h[0, :-1], ours.lm_head.weight, idx[0, 1:])
    lp = torch.log_softmax(ref[0, :-1].double(), -1)
    assert nll == pytest.approx(-lp.gather(1, idx[0, 1:, None]).sum().item(), rel=1e-5)


def test_select_docs_and_length_warnings():
    lens = [10, 500, 20, 800, 600, 30]
    ids = eval_ppl.select_docs(lens, 500, 2, seed=3)
    assert len(ids) == 2 and all(lens[i] >= 500 for i in ids) and ids == sorted(ids)
    assert ids == eval_ppl.select_docs(lens, 500, 2, seed=3)
    assert eval_ppl.select_docs(lens, 500, None, seed=3) == [1, 3, 4]
    assert eval_ppl.select_docs(lens, 500, 2, seed=3, draw='first') == [1, 3]
    with pytest.raises(ValueError, match=r'>= 1000 tokens \(the longest has 800\)'):
        eval_ppl.select_docs(lens, 1000, 2, seed=3)
    w = eval_ppl.length_warnings([128, 256, 512], 256)
    assert len(w) == 1 and '512' in w[0] and '256' in w[0]


def test_prompt_template():
    # round(6.8) = 7 words before
    text, n_before = eval_passkey.make_passkey_prompt(17, '40213', 0.4)
    assert n_before == 7
    assert text == (TASK + "\nThe grass is green. The sky is\n"
                    "The pass key is 40213. Remember it. 40213 is the pass key.\n"
                    "The grass is green. The sky is blue. The sun\n"
                    "What is the pass key? The pass key is")
    text, _ = eval_passkey.make_passkey_prompt(42, '1', 0.0)  # 19 words a repetition
    lines = text.split('\n')
    assert lines[1] == '' and lines[3] == FILLER + ' ' + FILLER + ' The grass is green.'


@pytest.mark.parametrize('length', [400, 1000, 6000])
def test_prompt_length_and_depth(env, length):
    tok = env['tok']
    for key, depth in [('12345', 0.0), ('98760', 0.37), ('55555', 1.0)]:
        ids, p, n, n_before = eval_passkey.build_passkey_prompt(tok, length, key, depth)
        assert 0.99 * length <= len(ids) <= length
        text, _ = eval_passkey.make_passkey_prompt(n, key, depth)
        assert ids == tok.encode(text + ' ' + key, bos=True)  # BOS + prompt + " key"
        assert ids[:p] == tok.encode(text, bos=True) and tok.decode(ids[p:]).strip() == key
        before = text.split('\n')[1]
        # filler words before the key line the key line sits at `depth` of the filler, measured in
        # tokens too
        assert len(before.split()) == n_before == round(depth * n)
        key_at = len(tok.encode(text[:text.index('The pass key is')], bos=True))
        rest = TASK + '\n\nThe pass key is 12345. Remember it. 12345 is the pass key.\n\n' \
            'What is the pass key? The pass key is 12345'
        filler_tokens = len(ids) - len(tok.encode(rest, bos=True))
        assert abs((key_at - len(tok.encode(TASK, bos=True))) / filler_tokens - depth) < 0.02


def test_prompt_within_one_percent_or_error(env):
    """Short lengths: an error exactly when no filler count lands in [0.99 L, L] (brute force over
    n)."""
    tok, n_err = env['tok'], 0
    base = len(eval_passkey.encode_trial(tok, 0, '24680', 0.3)[0])
    for L in range(base, base + 90, 3):
        sizes = [len(eval_passkey.encode_trial(tok, n, '24680', 0.3)[0])
                 for n in range(L - base + 1)]
        possible = any(0.99 * L <= x <= L for x in sizes)
        try:
            ids = eval_passkey.build_passkey_prompt(tok, L, '24680', 0.3)[0]
            assert possible and 0.99 * L <= len(ids) <= L
        except ValueError as e:
            assert not possible and 'within 1%' in str(e)
            n_err += 1
    assert 0 < n_err < 30
    with pytest.raises(ValueError, match='shorter than the passkey prompt'):
        eval_passkey.build_passkey_prompt(tok, 20, '12345', 0.5)


@torch.no_grad()
def official_verdict(next_token, prompt, key, tok, max_new_tokens=10):
    """The official script, written out plainly: greedy generation of up to max_new_tokens (stopping
    at EOS), the output decoded, int(first \\d+) == key, no number = fail. next_token(ids) -> the
    argmax."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(next_token(ids))
        if ids[-1] == tok.eos_id:
            break
    out = tok.decode(ids[len(prompt):])
    m = re.search(r'\d+', out)
    return m is not None and int(m.group()) == int(key), ids[len(prompt):]


def scripted_model(prompt, script, vocab, other):
    """A causal LM (our forward_hidden / lm_head interface) whose greedy continuation of `prompt` is
    `script` then `other` forever; off the script it predicts `other`. The prediction at position i
    reads ids[:i+1] only."""
    def next_token(prefix):
        k = len(prefix) - len(prompt)
        on_script = k >= 0 and prefix[:len(prompt)] == list(prompt) \
            and prefix[len(prompt):] == script[:k]
        return script[k] if on_script and k < len(script) else other

    # the cache's "keys" are the cached token ids: [1, S, 1, 1]
    def forward_hidden(idx, cache=None):
        past = [] if cache is None or cache.kv[0] is None else cache.kv[0][0].flatten().tolist()
        ids = past + idx[0].tolist()
        if cache is not None:
            cache.kv[0] = (torch.tensor(ids)[None, :, None, None],) * 2
        nxt = [next_token(ids[:i + 1]) for i in range(len(past), len(ids))]
        return F.one_hot(torch.tensor(nxt), vocab)[None].float()
    net = SimpleNamespace(forward_hidden=forward_hidden, lm_head=lambda h: h,
                          args=SimpleNamespace(n_layers=1))
    return net, next_token


@pytest.mark.parametrize('output,passes', [
    ('12345.', True),        # the key, then the number ends
    ('123456', False),       # the key's digits then one more: the number is 123456
    ('1234', False),         # stops short
    (' is: 12345', True),    # text before the number: the regex skips it
    ('\n12345\n', True),     # a newline first
    ('012345 is', True),     # int() drops leading zeros
    ('12 345', False),       # a space splits the number: the first one is 12
    ('abc def ghi jkl mno', False),  # no number in the budget
    ('x x x x x x x x 12345', False),  # the key only after max_new_tokens
])
def test_passkey_official_semantics(env, output, passes):
    """greedy_passkey == plain greedy generation + the official regex, on scripted outputs."""
    tok, key = env['tok'], '12345'
    ids, p, _ = eval_passkey.encode_trial(tok, 5, key, 0.5)
    prompt, guess = ids[:p], ids[p:]
    other = tok.encode(' the', bos=False)[-1]
    for script in (tok.encode(output, bos=False), tok.encode(output, bos=False) + [tok.eos_id]):
        net, next_token = scripted_model(prompt, script, env['ours'].args.vocab_size, other)
        ref, ref_gen = official_verdict(next_token, prompt, key, tok)
        ok, gen, _, _, n_fwd = eval_passkey.greedy_passkey(net, prompt, guess, key, tok.decode,
                                                            eos_id=tok.eos_id)
        assert ok == ref == passes, (output, tok.decode(ref_gen))
        # the same greedy tokens, stopped once the verdict is fixed
        assert gen == ref_gen[:len(gen)]
        assert n_fwd <= len(gen)
    if output == '12345.':
        assert n_fwd == 1  # the key and one more position: a single forward


def test_passkey_equals_greedy_decoding(env):
    """Our model + greedy_passkey vs transformers, token by token with full recompute, + the
    official regex: the same verdict and the same tokens, for keys greedy does write (pass) and keys
    it does not (fail)."""
    tok, hf, ours = env['tok'], env['hf'], env['ours']
    next_token = lambda ids: int(hf(torch.tensor(ids)[None]).logits[0, -1].argmax())  # noqa: E731
    n_pass = n_fail = 0
    for key, depth, n in [('12345', 0.1, 6), ('80808', 0.5, 9), ('31415', 0.9, 4),
                          ('27182', 0.0, 7)]:
        ids, p, _ = eval_passkey.encode_trial(tok, n, key, depth)
        prompt = ids[:p]
        ref_ok, ref_gen = official_verdict(next_token, prompt, key, tok)
        ok, gen, tf_pred, key_lp, _ = eval_passkey.greedy_passkey(ours, prompt, ids[p:], key,
                                                                  tok.decode, eos_id=tok.eos_id)
        assert ok == ref_ok and gen == ref_gen[:len(gen)]
        # the teacher-forced first prediction is greedy's first token the key's log-likelihood:
        # transformers' full forward over prompt + key, log-softmax summed
        assert tf_pred[0] == ref_gen[0]
        lp = hf(torch.tensor(ids)[None]).logits[0].detach().float().log_softmax(-1)
        ref_lp = sum(float(lp[i - 1, ids[i]]) for i in range(p, len(ids)))
        assert abs(key_lp - ref_lp) < 1e-3 * max(1.0, abs(ref_lp)), (key_lp, ref_lp)
        n_fail += not ok
        # the key = the first number greedy writes (when it writes one): a trial that must pass
        digits = [t for t in ref_gen if tok.decode([t]).strip().isdigit()]
        if digits:
            key2 = re.search(r'\d+', tok.decode(ref_gen)).group()
            ok2, gen2, *_ = eval_passkey.greedy_passkey(ours, prompt, ids[p:], key2, tok.decode,
                                                        eos_id=tok.eos_id)
            assert ok2 == official_verdict(next_token, prompt, key2, tok)[0] \
                and gen2 == ref_gen[:len(gen2)]
            n_pass += ok2
    assert n_fail == 4 and n_pass >= 1, n_pass  # a random model does not know the key


def test_passkey_prefix_reuse(env):
    """Trials run over one cache that keeps the prefix shared with the previous trial (extend_cache)
    give the verdicts, tokens and key log-likelihoods of trials that each start from an empty
    cache."""
    tok, ours = env['tok'], env['ours']
    cache, cached = model.KVCache(ours.args.n_layers), []
    for key, depth, n in [('12345', 0.5, 8), ('80808', 0.5, 8), ('31415', 0.2, 8),
                          ('31415', 0.2, 8)]:
        ids, p, _ = eval_passkey.encode_trial(tok, n, key, depth)
        prompt = ids[:p]
        fresh = eval_passkey.greedy_passkey(ours, prompt, ids[p:], key, tok.decode,
                                            eos_id=tok.eos_id)
        cached = eval_passkey.extend_cache(ours, cache, cached, prompt[:-1])
        assert len(cache) == len(prompt) - 1
        reused = eval_passkey.greedy_passkey(ours, prompt, ids[p:], key, tok.decode,
                                             eos_id=tok.eos_id, cache=cache)
        assert reused[:3] == fresh[:3] and abs(reused[3] - fresh[3]) < 1e-4


def test_trials_paired_and_nested():
    """The same seed gives every method the same trials; more trials extend fewer (per length and
    depth); adding a length leaves the others' trials alone; keys are 5-digit numbers."""
    few = eval_passkey.make_trials([100, 200], 2, [0.1, 0.9], seed=7)
    many = eval_passkey.make_trials([300, 200], 5, [0.1, 0.9], seed=7)
    for L in (200,):
        for d in (0.1, 0.9):
            a = [t for t in few if t[0] == L and t[1] == d]
            b = [t for t in many if t[0] == L and t[1] == d]
            assert len(a) == 2 and b[:2] == a
    keys = [k for *_, k in many]
    assert all(len(k) == 5 for k in keys) and len(set(keys)) > len(keys) // 2
    assert eval_passkey.make_trials([100], 3, None, 7) \
        == eval_passkey.make_trials([100], 3, None, 7)


def test_wilson_interval():
    """The Wilson interval's ends are the p where the score test just rejects: |k/n - p| = z
    sqrt(p(1-p)/n), found here by bisection on each side of k/n."""
    z = 1.96
    for k, n in [(0, 5), (4, 5), (5, 5), (31, 180), (116, 180), (1, 1)]:
        def f(q):
            return abs(k / n - q) - z * math.sqrt(q * (1 - q) / n)

        def root(lo, hi):  # f changes sign once on [lo, hi]
            s_lo = f(lo) > 0
            for _ in range(100):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if (f(mid) > 0) == s_lo else (lo, mid)
            return (lo + hi) / 2
        ends = (0.0 if k == 0 else root(0.0, k / n), 1.0 if k == n else root(k / n, 1.0))
        got = eval_passkey.wilson(k, n)
        assert abs(got[0] - ends[0]) < 1e-9 and abs(got[1] - ends[1]) < 1e-9, (k, n, got, ends)
    # the ends hold the proportion itself: an error bar from k/n to either end is never negative
    for k, n in [(90, 90), (0, 90), (7, 7), (0, 7), (45, 90)]:
        lo, hi = eval_passkey.wilson(k, n)
        assert lo <= k / n <= hi and (hi == 1.0) == (k == n) and (lo == 0.0) == (k == 0)


def test_paired_tests_brute_force():
    """Exact McNemar and Wilcoxon signed-rank p-values against enumerating every sign pattern."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 11))
        a, b = rng.random(n) < 0.6, rng.random(n) < 0.4
        disc = [(x, y) for x, y in zip(a, b) if x != y]
        m = len(disc)
        k = sum(1 for x, y in disc if x)
        # two-sided: patterns whose count of "a wins" is at least as far from m/2 as the observed
        # one
        extreme = sum(1 for bits in itertools.product([0, 1], repeat=m)
                      if abs(sum(bits) - m / 2) >= abs(k - m / 2))
        expected = extreme / 2 ** m if m else 1.0
        assert abs(eval_passkey.mcnemar_exact(list(a), list(b)) - expected) < 1e-12
        x = np.round(rng.normal(size=n), 1)  # rounding makes ties and zeros
        d = [v for v in x if v != 0]
        absd = [abs(v) for v in d]
        # mid-ranks by counting: 1 + #smaller + (#equal - 1) / 2
        ranks = [1 + sum(u < v for u in absd) + (sum(u == v for u in absd) - 1) / 2 for v in absd]
        t = sum(r for r, v in zip(ranks, d) if v > 0)
        mean = sum(ranks) / 2
        total = list(itertools.product([0, 1], repeat=len(d)))
        def positive_sum(bits):
            return sum(r for r, s in zip(ranks, bits) if s)
        extreme = sum(1 for bits in total
                      if abs(positive_sum(bits) - mean) >= abs(t - mean) - 1e-9)
        p, used = eval_passkey.wilcoxon_signed_rank(x, np.zeros(n))
        assert used == len(d)
        assert abs(p - (extreme / len(total) if d else 1.0)) < 1e-12, (x, p)


def test_compare_paired_against_brute_force_pairing():
    """compare_paired on a hand-made list: b in another order, one identity twice (two seeds'
    pooled trials), the same key at another length, and one unpaired trial on each side. The
    reference pairs by a plain scan (each a trial with b's first unused trial of the same length,
    depth and key) and counts by hand."""
    def t(L, d, key, ok, lp):
        return {'length': L, 'depth_requested': d, 'key': key, 'pass': ok, 'key_logprob': lp}
    a = [t(100, 0.1, '11111', True, -1.0), t(100, 0.5, '22222', True, -2.0),
         t(100, 0.5, '22222', False, -6.0), t(200, 0.1, '11111', True, -0.5),
         t(200, 0.9, '33333', False, -4.0), t(100, 0.9, '44444', True, -1.0)]
    b = [t(200, 0.9, '33333', True, -3.0), t(100, 0.5, '22222', False, -5.0),
         t(200, 0.1, '11111', False, -2.5), t(100, 0.1, '11111', True, -1.0),
         t(100, 0.5, '22222', False, -7.0), t(300, 0.1, '55555', True, -1.0)]
    used, pairs = set(), []
    for x in a:
        for j, y in enumerate(b):
            if j not in used and all(x[k] == y[k] for k in ('length', 'depth_requested', 'key')):
                used.add(j)
                pairs.append((x, y))
                break
    assert len(pairs) == 5  # a's 44444 and b's 55555 have no partner
    got = eval_passkey.compare_paired(a, b)
    va, vb = [x['pass'] for x, _ in pairs], [y['pass'] for _, y in pairs]
    d = sorted(x['key_logprob'] - y['key_logprob'] for x, y in pairs)
    assert d == [-1.0, 0.0, 1.0, 2.0, 3.0]  # the two 22222 trials paired in their order
    assert got['n'] == 5 and got['passed'] == [sum(va), sum(vb)] == [3, 2]
    assert got['discordant'] == [2, 1]  # 22222 at 0.5 and 11111 at 200 vs 33333 at 200
    assert got['mcnemar_p'] == eval_passkey.mcnemar_exact(va, vb) == 1.0  # B(3, 1/2): P(X <= 1) x2
    assert math.isclose(got['mean_dlogp'], 1.0) and got['median_dlogp'] == d[2] == 1.0
    # 4 non-zero d with |d| ranks 1.5, 1.5, 3, 4 (-1 and 1 tied); T+ = 8.5 of 10
    assert got['wilcoxon_n'] == 4
    sums = [sum(r for r, s in zip((1.5, 1.5, 3, 4), bits) if s)
            for bits in itertools.product([0, 1], repeat=4)]
    assert math.isclose(got['wilcoxon_p'], 2 * sum(x >= 8.5 for x in sums) / 16)
    del a[0]['key_logprob']  # a trial without its log-likelihood: verdicts only
    assert 'wilcoxon_p' not in eval_passkey.compare_paired(a, b)
    assert eval_passkey.compare_paired([], b)['n'] == 0


def test_accuracy_by_depth_bins():
    """Random depths: ten bins [0, .1), [.1, .2), ..., [.9, 1.0] of the realised depth, worked out
    by hand."""
    trials = [{'length': 100, 'depth': d, 'pass': ok} for d, ok in
              [(0.0, True), (0.05, False), (0.1, True), (0.55, True), (0.999, False), (1.0, True)]]
    rows = eval_passkey.accuracy_table(trials, [100, 200], None)
    assert list(rows) == [f'{i / 10:.1f}-{(i + 1) / 10:.1f}' for i in range(10)] + ['all']
    assert rows['0.0-0.1'][100] == 0.5 and rows['0.1-0.2'][100] == 1.0 \
        and rows['0.5-0.6'][100] == 1.0
    assert rows['0.9-1.0'][100] == 0.5 and rows['0.3-0.4'][100] is None \
        and rows['all'][100] == 4 / 6
    assert all(rows[r][200] is None for r in rows)


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def run_main(monkeypatch, module, **config):
    """The script's main() in this process with its config globals set (no torch import per run)."""
    for k, v in config.items():
        assert hasattr(module, k), k
        monkeypatch.setattr(module, k, v)
    module.main()


def test_eval_ppl_cli(env):
    tmp = env['tmp']
    out, png = str(tmp / 'ppl.json'), str(tmp / 'ppl.png')
    proc = run('eval_ppl.py', f"--model={env['plain']}", f"--data_dir={env['data']}",
               '--lengths=[50,300]', '--stride=40', '--num_docs=2', '--doc_tokens=0',
               '--device=cpu', f'--out={out}', f'--plot={png}')
    assert proc.returncode == 0, proc.stderr
    assert 'warning: length 300 > max_position_embeddings 256' in proc.stdout
    r = json.load(open(out))
    assert len(r['doc_ids']) == 2 and all(len(env['docs'][i]) > 300 for i in r['doc_ids'])
    for L in (50, 300):
        ref_sum, ref_n = 0.0, 0
        for i in r['doc_ids']:
            # leading BOS dropped
            s, c = hf_nll(env['hf'], env['docs'][i][1:], L, 40, 'sliding', True)
            ref_sum, ref_n = ref_sum + s, ref_n + c
        assert r['tokens'][str(L)] == ref_n
        assert r['ppl'][str(L)] == pytest.approx(np.exp(ref_sum / ref_n), rel=1e-4)
    assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_eval_ppl_raw_input_and_plot_only(env, monkeypatch, capsys):
    tmp = env['tmp']
    (tmp / 'raw').mkdir()
    (tmp / 'raw' / 'a.txt').write_text(ENGLISH * 3)
    (tmp / 'raw' / 'b.txt').write_text(FILLER)  # too short for the window: not chosen
    (tmp / 'raw' / 'c.jsonl').write_text(json.dumps({'text': FILLER}) + '\n'
                                         + json.dumps({'text': ENGLISH * 2}) + '\n')
    out = str(tmp / 'ppl_raw.json')
    run_main(monkeypatch, eval_ppl, model=env['plain'], input=str(tmp / 'raw' / '*'), lengths=[200],
             add_bos=False, device='cpu', out=out)
    ref_sum, ref_n = 0.0, 0
    for text in (ENGLISH * 3, ENGLISH * 2):
        doc = env['tok'].encode(text, bos=False)[:200]  # doc_tokens=None: cut to max(lengths)
        s, c = hf_nll(env['hf'], doc, 200, None, 'sliding', False)
        ref_sum, ref_n = ref_sum + s, ref_n + c
    r = json.load(open(out))
    assert r['data']['docs'] == [[str(tmp / 'raw' / 'a.txt'), 0], [str(tmp / 'raw' / 'c.jsonl'), 1]]
    assert r['ppl']['200'] == pytest.approx(np.exp(ref_sum / ref_n), rel=1e-4) \
        and r['tokens']['200'] == 2 * 199
    # overlay two result files in one plot, no model
    json.dump(dict(r, label='other', ppl={'64': 3.0, '200': 2.5}), open(tmp / 'other.json', 'w'))
    png = str(tmp / 'both.png')
    monkeypatch.setattr(eval_ppl, 'input', None)
    run_main(monkeypatch, eval_ppl, model='', plot_inputs=[out, str(tmp / 'other.json')], plot=png)
    assert 'other' in capsys.readouterr().out and open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_eval_passkey_cli(env):
    out, png = str(env['tmp'] / 'pk.json'), str(env['tmp'] / 'pk.png')
    proc = run('eval_passkey.py', f"--model={env['plain']}", '--lengths=[1000,2000]',
               '--num_trials=1', '--depths=[0.0,0.5,1.0]', '--max_new_tokens=4', '--device=cpu',
               f'--out={out}', f'--plot={png}')
    assert proc.returncode == 0, proc.stderr
    assert 'warning: length 1000 > max_position_embeddings 256' in proc.stdout
    r = json.load(open(out))
    assert len(r['trials']) == 2 * 3 * 1
    tok, hf = env['tok'], env['hf']
    next_token = lambda ids: int(hf(torch.tensor(ids)[None]).logits[0, -1].argmax())  # noqa: E731
    for t in r['trials']:
        assert 0.99 * t['length'] <= t['tokens'] <= t['length'] and len(t['key']) == 5
        text, _ = eval_passkey.make_passkey_prompt(t['n_filler'], t['key'], t['depth_requested'])
        ok, gen = official_verdict(next_token, tok.encode(text, bos=True), t['key'], tok,
                                   max_new_tokens=4)
        assert t['pass'] == ok and t['output_ids'] == gen[:len(t['output_ids'])]
    for L in ('1000', '2000'):
        hits = [t['pass'] for t in r['trials'] if str(t['length']) == L]
        assert r['accuracy'][L] == sum(hits) / len(hits)
        for d in (0.0, 0.5, 1.0):  # one row per requested depth
            hits = [t['pass'] for t in r['trials']
                    if str(t['length']) == L and t['depth_requested'] == d]
            assert r['accuracy_by_depth'][f'{d:.2f}'][L] == sum(hits) / len(hits)
    assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_passkey_extend_equals_one_run(env, monkeypatch):
    """extend=True keeps an earlier result's trials and runs only the new ones: the merged result
    equals a run of all trials at once; a result made with other settings is refused."""
    tmp, cfg = env['tmp'], dict(model=env['plain'], lengths=[300, 400], depths=[0.2, 0.8],
                                max_new_tokens=4, device='cpu', seed=11)
    run_main(monkeypatch, eval_passkey, num_trials=3, out=str(tmp / 'all.json'), **cfg)
    run_main(monkeypatch, eval_passkey, num_trials=1, out=str(tmp / 'ext.json'), **cfg)
    part = json.load(open(tmp / 'ext.json'))
    for t in part['trials']:
        t['kept'] = True  # a trial that is rerun loses this
    json.dump(part, open(tmp / 'ext.json', 'w'))
    run_main(monkeypatch, eval_passkey, num_trials=3, extend=True, out=str(tmp / 'ext.json'), **cfg)
    full, ext = json.load(open(tmp / 'all.json')), json.load(open(tmp / 'ext.json'))
    # forwards: the prefix reuse differs when trials are skipped
    drop = lambda t: {k: v for k, v in t.items() if k not in ('forwards', 'kept')}  # noqa: E731
    assert [drop(t) for t in ext['trials']] == [drop(t) for t in full['trials']]
    assert sum(t.get('kept', False) for t in ext['trials']) == len(part['trials']) == 4
    assert ext['passed'] == full['passed'] and ext['settings'] == full['settings']
    with pytest.raises(UserError, match='extend: .* seed=11.*not 12'):
        run_main(monkeypatch, eval_passkey, num_trials=4, extend=True, out=str(tmp / 'ext.json'),
                 **dict(cfg, seed=12))
    with pytest.raises(UserError, match='num_trials=3 > 2'):
        run_main(monkeypatch, eval_passkey, num_trials=2, extend=True, out=str(tmp / 'ext.json'),
                 **cfg)


@pytest.mark.parametrize('depths', [[0.0, 0.5, 1.0], None])
def test_passkey_accuracy_by_depth_is_an_independent_count(env, monkeypatch, depths):
    """accuracy and accuracy_by_depth against a count made here from what the model was really
    asked: every prompt is captured as it is built (its key, filler words and depth) and checked to
    be what the model saw; a scripted verdict (pass iff the key is not a multiple of 3) gives mixed
    outcomes. Rows: the requested depth (a grid) or ten bins of the realised depth round(depth n) /
    n (random depths, the paper)."""
    built, seen = [], []
    make = eval_passkey.make_passkey_prompt

    def capture(n_filler, key, depth):
        text, n_before = make(n_filler, key, depth)
        built.append((text, n_filler, key, depth))
        return text, n_before

    def verdict(net, prompt, guess, key, *args, **kwargs):
        text, n_filler, prompt_key, depth = built[-1]
        # the prompt just built
        assert prompt == env['tok'].encode(text, bos=True) and key == prompt_key
        length = next(L for L in (1000, 2000) if 0.99 * L <= len(prompt) + len(guess) <= L)
        words_before = len(text.split('\n')[1].split())
        assert words_before == round(depth * n_filler)
        seen.append((length, depth, words_before / n_filler, int(key) % 3 != 0))
        return int(key) % 3 != 0, [], [], -1.0, 1
    monkeypatch.setattr(eval_passkey, 'make_passkey_prompt', capture)
    monkeypatch.setattr(eval_passkey, 'greedy_passkey', verdict)
    out = str(env['tmp'] / f'pk-count-{depths is None}.json')
    run_main(monkeypatch, eval_passkey, model=env['plain'], lengths=[1000, 2000], num_trials=6,
             depths=depths, seed=5, device='cpu', out=out, overwrite=True)
    r = json.load(open(out))
    assert len(seen) == 2 * 6 * (3 if depths else 1)
    assert 0 < sum(ok for *_, ok in seen) < len(seen)  # mixed outcomes: a wrong count can show
    rows = {}  # label -> length -> [verdicts]
    for length, depth, realised, ok in seen:
        b = min(int(realised * 10), 9) / 10  # the realised depth's bin
        label = f'{depth:.2f}' if depths else f'{b:.1f}-{b + 0.1:.1f}'
        rows.setdefault(label, {}).setdefault(str(length), []).append(ok)
    for L in ('1000', '2000'):
        oks = [ok for length, *_, ok in seen if str(length) == L]
        assert r['accuracy'][L] == sum(oks) / len(oks)
    assert set(r['accuracy_by_depth']) >= set(rows)
    for label, by_len in r['accuracy_by_depth'].items():
        for L, acc in by_len.items():
            oks = rows.get(label, {}).get(L)
            assert acc == (sum(oks) / len(oks) if oks else None), (label, L, acc, oks)
    if depths:
        assert all(len(v) == 6 for by_len in rows.values() for v in by_len.values())


def test_bad_input(env, tmp_path, monkeypatch):
    missing = str(tmp_path / 'no_such_model')
    proc = run('eval_ppl.py', f'--model={missing}', f"--data_dir={env['data']}", '--device=cpu')
    assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0
    assert proc.stderr.startswith('error:') and missing in proc.stderr
    out = str(tmp_path / 'x.json')
    with pytest.raises(ValueError, match=r'no document has >= 5000 tokens \(the longest has 699\)'):
        run_main(monkeypatch, eval_ppl, model=env['plain'], data_dir=env['data'], lengths=[5000],
                 out=out)
    assert not os.path.exists(out)
    with pytest.raises(UserError, match='no_such_model'):
        run_main(monkeypatch, eval_passkey, model=missing)
    with pytest.raises(ValueError, match='length 20 is shorter than the passkey prompt'):
        run_main(monkeypatch, eval_passkey, model=env['plain'], lengths=[20], num_trials=1,
                 device='cpu', out=out)
    assert not os.path.exists(out)


# -----------------------------------------------------------------------------
# the needle tasks (multikey, multivalue, multiquery): the templates written out here, a plain
# greedy loop in transformers and a regex scorer as the references

NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
                "memorize it. I will quiz you about the numbers afterwards.")
NEEDLE_RE = re.compile(r'One of the special magic numbers for ([a-z]+) is: (\d{7})\.')
NEEDLE_TASKS = ('multikey', 'multivalue', 'multiquery')


def needle_question(task, words):
    if task == 'multikey':
        return (f"What is the special magic number for {words[0]} mentioned in the provided text? "
                f"The special magic number for {words[0]} mentioned in the provided text is")
    listed = words[0] if len(words) == 1 else ', '.join(words[:-1]) + ' and ' + words[-1]
    return (f"What are all the special magic numbers for {listed} mentioned in the provided text? "
            f"The special magic numbers for {listed} mentioned in the provided text are")


def needle_text(task, n, needles, asked_words):
    """The prompt by hand: the intro, then the filler (FILLER's words from the start again after
    each needle) with needle i after round(depth_i * n) words (ties in needle order), then the
    question."""
    words = FILLER.split()
    at = [round(d * n) for _, _, d in needles]
    lines, prev = [NEEDLE_INTRO], 0
    for i in sorted(range(len(needles)), key=lambda i: (at[i], i)):
        lines.append(' '.join(words[j % len(words)] for j in range(at[i] - prev)))
        lines.append(f"One of the special magic numbers for {needles[i][0]} is: {needles[i][1]}.")
        prev = at[i]
    lines.append(' '.join(words[j % len(words)] for j in range(n - prev)))
    return '\n'.join(lines + [needle_question(task, asked_words)])


def needle_verdict(task, output, values):
    """The scorer: multikey, int(first number) == the value; else every value among the numbers."""
    nums = [int(x) for x in re.findall(r'\d+', output)]
    if task == 'multikey':
        return bool(nums) and nums[0] == int(values[0])
    return all(int(v) in nums for v in values)


def greedy_reference(next_token, prompt, budget, eos_id):
    ids = list(prompt)
    for _ in range(budget):
        ids.append(next_token(ids))
        if ids[-1] == eos_id:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize('task', NEEDLE_TASKS)
def test_needle_prompts_length_depths_and_needles(env, task):
    """Prompts within 1% of the length; each needle exactly once, after round(d n) filler words at
    the depth it was given (so in depth order), the first at the trial's depth; the question asks
    for the asked words; the answer (asked values joined by ', ') is what follows the prompt."""
    tok = env['tok']
    trials = eval_passkey.make_needle_trials(task, [600, 1500], 2, [0.0, 0.5, 1.0], 3)
    trials += eval_passkey.make_needle_trials(task, [900], 3, None, 4)
    tied = [('comet', '1111111', 0.5), ('otter', '2222222', 0.0), ('maple', '3333333', 0.5),
            ('apple', '4444444', 0.5)]  # three needles at one depth: in their order
    if task == 'multivalue':
        tied = [('comet', v, d) for _, v, d in tied]
    trials.append((600, 0.5, tied, trials[0][3]))
    for L, depth, needles, asked in trials:
        k = len(needles)
        assert k == 4 and needles[0][2] == depth
        words = [w for w, _, _ in needles]
        assert len(set(words)) == (1 if task == 'multivalue' else k)
        values = [v for _, v, _ in needles]
        assert len(set(values)) == k and all(re.fullmatch(r'[1-9]\d{6}', v) for v in values)
        assert asked == {'multikey': [0], 'multivalue': [0, 1, 2, 3], 'multiquery': [0, 1]}[task]
        ids, p, n, _ = eval_passkey.build_needle_prompt(tok, task, L, needles, asked)
        assert 0.99 * L <= len(ids) <= L
        text = needle_text(task, n, needles, list(dict.fromkeys(words[i] for i in asked)))
        answer = ' ' + ', '.join(needles[i][1] for i in asked)
        assert ids == tok.encode(text + answer, bos=True) and ids[:p] == tok.encode(text, bos=True)
        assert tok.decode(ids[p:]).strip() == answer.strip()
        lines = text.split('\n')
        found = [(i, NEEDLE_RE.fullmatch(line)) for i, line in enumerate(lines)]
        found = [(i, m.groups()) for i, m in found if m]
        assert sorted(g for _, g in found) == sorted((w, v) for w, v, _ in needles)  # each once
        filler = [i for i in range(1, len(lines) - 1) if not NEEDLE_RE.fullmatch(lines[i])]
        assert sum(len(lines[i].split()) for i in filler) == n
        for line_no, (w, v) in found:  # filler words before the needle = round(depth n)
            d = next(d for w2, v2, d in needles if (w2, v2) == (w, v))
            assert sum(len(lines[i].split()) for i in filler if i < line_no) == round(d * n)
        before = [round(d * n) for _, _, d in needles]
        order = sorted(range(k), key=lambda i: (before[i], i))
        assert [g for _, g in found] == [needles[i][:2] for i in order]
        q = re.fullmatch(r'What (?:is|are all) the special magic numbers? for (.+?) mentioned .*',
                         lines[-1])
        assert q
        assert re.split(r', | and ', q.group(1)) == list(dict.fromkeys(words[i] for i in asked))


@pytest.mark.parametrize('task', NEEDLE_TASKS)
def test_needle_tasks_equal_greedy_and_regex(env, monkeypatch, task):
    """eval_passkey.py --task=<task> against the references: each trial's prompt rebuilt here from
    its recorded needles, transformers' greedy tokens (full recompute each step, up to the answer's
    tokens + 10) scored by the regex; the same verdicts and tokens, the answer's log-likelihood, and
    the per-length passed / count / Wilson interval counted from those verdicts."""
    tok, hf = env['tok'], env['hf']
    next_token = lambda ids: int(hf(torch.tensor(ids)[None]).logits[0, -1].argmax())  # noqa: E731
    out, png = str(env['tmp'] / f'{task}.json'), str(env['tmp'] / f'{task}.png')
    run_main(monkeypatch, eval_passkey, model=env['plain'], task=task, lengths=[500, 700],
             num_trials=2, depths=None, seed=9, device='cpu', out=out, overwrite=True, plot=png)
    r = json.load(open(out))
    assert r['settings']['task'] == task and r['settings']['seed'] == 9
    assert {'multikey': ['num_needles'], 'multivalue': ['num_values'],
            'multiquery': ['num_needles', 'num_queries']}[task] == \
        [k for k in r['settings'] if k.startswith('num_') and k != 'num_trials']
    verdicts = {}
    for i, t in enumerate(r['trials']):
        needles = [(x['word'], x['value'], x['depth']) for x in t['needles']]
        text = needle_text(task, t['n_filler'], needles, list(dict.fromkeys(t['asked'])))
        prompt = tok.encode(text, bos=True)
        answer = ' ' + ', '.join(t['expected'])
        assert prompt + t['answer_ids'] == tok.encode(text + answer, bos=True)
        assert 0.99 * t['length'] <= len(prompt) + len(t['answer_ids']) <= t['length']
        gen = greedy_reference(next_token, prompt, len(t['answer_ids']) + 10, tok.eos_id)
        ok = needle_verdict(task, tok.decode(gen), t['expected'])
        assert t['pass'] == ok and t['output_ids'] == gen[:len(t['output_ids'])]
        if task != 'multikey' and not ok:  # a missing value may still come: the whole budget is run
            assert t['output_ids'] == gen
        verdicts.setdefault(str(t['length']), []).append(ok)
        if i == 0:  # the answer's teacher-forced log-likelihood: one forward over prompt + answer
            ids = prompt + t['answer_ids']
            lp = hf(torch.tensor(ids)[None]).logits[0].detach().float().log_softmax(-1)
            ref = sum(float(lp[j - 1, ids[j]]) for j in range(len(prompt), len(ids)))
            assert abs(t['key_logprob'] - ref) < 1e-3 * max(1.0, abs(ref))
    for L, oks in verdicts.items():
        assert r['passed'][L] == sum(oks) and r['count'][L] == len(oks) == 2
        assert r['wilson95'][L] == list(eval_passkey.wilson(sum(oks), len(oks)))
    assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('task,output,passes', [
    ('multikey', '1234567.', True),
    ('multikey', ' is: 1234567\n', True),
    ('multikey', '12345678', False),           # the value's digits then one more
    ('multikey', '7654321, 1234567.', False),  # a distractor's value first
    ('multivalue', '1234567, 7654321.', True),
    ('multivalue', '7654321 and 1234567 and 5', True),  # any order, more numbers allowed
    ('multivalue', '1234567, 1234567.', False),  # one value missing
    ('multiquery', ': 7654321\n1234567\n', True),
    ('multiquery', '1234567, 76543210', False),  # the second value has a digit too many
    ('multiquery', 'x x x x x 1234567, 7654321', True),  # 27 tokens = the answer's 17 + 10
    ('multiquery', 'x x x x x x 1234567, 7654321', False),  # the last digit past the budget
])
def test_needle_verdict_semantics(env, task, output, passes):
    """What eval_passkey runs for a trial (trial_prompt, greedy_passkey with its key or judge, the
    answer + 10 token budget) == a plain greedy loop + the regex scorer, on scripted outputs."""
    tok = env['tok']
    needles = [('apple', '1234567', 0.3), ('tiger', '7654321', 0.6), ('lemon', '5555555', 0.1)]
    if task == 'multivalue':
        needles = [('apple', v, d) for _, v, d in needles]
    asked = {'multikey': [0], 'multivalue': [0, 1], 'multiquery': [0, 1]}[task]
    trial = (450, 0.3, needles, asked)
    ids, p, text, _, key, judge = eval_passkey.trial_prompt(tok, task, trial, None)
    prompt = tok.encode(text, bos=True)
    guess, budget = ids[p:], len(ids) - p + 10
    other = tok.encode(' the', bos=False)[-1]
    for script in (tok.encode(output, bos=False), tok.encode(output, bos=False) + [tok.eos_id]):
        net, next_token = scripted_model(prompt, script, env['ours'].args.vocab_size, other)
        ref_gen = greedy_reference(next_token, prompt, budget, tok.eos_id)
        ref = needle_verdict(task, tok.decode(ref_gen), [needles[i][1] for i in asked])
        ok, gen, *_ = eval_passkey.greedy_passkey(net, prompt, guess, key, tok.decode, budget,
                                                  tok.eos_id, judge=judge)
        assert ok == ref == passes, (output, tok.decode(ref_gen))
        assert gen == ref_gen[:len(gen)]


def test_needle_trials_paired(env, monkeypatch):
    """Two models run with one seed see the same needles, asked words and depths (paired trials);
    more trials extend fewer; another seed draws other needles."""
    runs = []
    spm_file = str(env['tmp'] / 'llama' / 'tokenizer.model')  # the scaled model's dir has none
    for m in ('plain', 'scaled'):
        out = str(env['tmp'] / f'paired-{m}.json')
        run_main(monkeypatch, eval_passkey, model=env[m], task='multiquery', lengths=[500],
                 num_trials=3, depths=None, seed=21, device='cpu', out=out, overwrite=True,
                 check_tokenizer=False, tokenizer=spm_file)
        runs.append([(t['needles'], t['asked'], t['key'], t['depth_requested'], t['tokens'])
                     for t in json.load(open(out))['trials']])
    assert runs[0] == runs[1] and len({k for _, _, k, _, _ in runs[0]}) == 3
    few = eval_passkey.make_needle_trials('multikey', [500, 900], 2, [0.1, 0.9], 5)
    many = eval_passkey.make_needle_trials('multikey', [900], 4, [0.1, 0.9], 5)
    for d in (0.1, 0.9):
        a = [t for t in few if t[0] == 900 and t[1] == d]
        assert a == [t for t in many if t[1] == d][:2]
    other = eval_passkey.make_needle_trials('multikey', [500, 900], 2, [0.1, 0.9], 6)
    assert [t[2] for t in other] != [t[2] for t in few]


def test_passkey_task_unchanged(env, monkeypatch):
    """task='passkey' is the default run: the same JSON (but the timing), no needle field in it."""
    results = []
    for extra in ({}, {'task': 'passkey'}):
        out = str(env['tmp'] / f'pk-task-{len(extra)}.json')
        run_main(monkeypatch, eval_passkey, model=env['plain'], lengths=[400], num_trials=3,
                 depths=[0.5], seed=3, device='cpu', out=out, overwrite=True, **extra)
        r = json.load(open(out))
        r.pop('seconds')
        results.append(r)
    assert results[0] == results[1]
    assert not {'task', 'num_needles', 'num_values', 'num_queries'} & set(results[0]['settings'])
    assert results[0]['settings']['max_new_tokens'] == 10
    fields = {'length', 'tokens', 'depth_requested', 'depth', 'n_filler', 'key', 'answer_ids',
              'pred_ids', 'output_ids', 'output', 'forwards', 'key_logprob', 'pass'}
    assert all(set(t) == fields for t in results[0]['trials'])


def test_needle_bad_input(env, monkeypatch, tmp_path):
    out = str(tmp_path / 'x.json')
    base = dict(model=env['plain'], device='cpu', out=out, num_needles=4, num_queries=2,
                max_new_tokens=None)
    for config, msg in [({'task': 'needle'}, "task='needle'"),
                        ({'task': 'multiquery', 'num_needles': 2, 'num_queries': 3},
                         'num_queries=3'),
                        ({'task': 'multikey', 'num_needles': 0}, 'num_needles=0'),
                        ({'task': 'multivalue', 'max_new_tokens': 0}, 'max_new_tokens')]:
        with pytest.raises(UserError, match=msg):
            run_main(monkeypatch, eval_passkey, **{**base, **config})
        assert not os.path.exists(out)
    with pytest.raises(UserError, match='shorter than the multikey prompt'):
        run_main(monkeypatch, eval_passkey, **base, task='multikey', lengths=[100])
    assert not os.path.exists(out)
