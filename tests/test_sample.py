"""sample.py against independent references: transformers' generate(do_sample=False) on the same
tiny random checkpoints (greedy, token for token; the streamed text as the tokenizer decodes the
whole output), and the model's next-token probabilities from transformers for the sampled first
token (a chi-square test of softmax(logits / T) over the top k)."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
from errors import UserError  # noqa: E402
from hf_checkpoint import load_pretrained  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

TEXT = """It was a bright cold day in April, and the clocks were striking thirteen.
The quick brown fox jumps over the lazy dog while the farmer sleeps under the old oak tree.
Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.
In a hole in the ground there lived a hobbit, not a nasty dirty wet hole filled with worms.
Numbers such as 12345, 67890, 24680 and 13579 appear in reports, tables and long documents."""
PROMPT = "Call me Ishmael. In a hole in the ground there lived a hobbit. The quick brown fox"
MAX_POS = 256


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py


def tiny_hf(tmp, name, vocab, arch, seed):
    """A tiny random transformers model as an HF dir (weights large enough that context matters)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                  initializer_range=0.15, eos_token_id=2)
    torch.manual_seed(seed)
    if arch == 'llama':
        hf = LlamaForCausalLM(LlamaConfig(**common, bos_token_id=1, tie_word_embeddings=False))
    else:  # Qwen2: q/k/v biases (random here, HF initialises them to 0), tied embeddings
        hf = Qwen2ForCausalLM(Qwen2Config(**common, bos_token_id=None, tie_word_embeddings=True))
        with torch.no_grad():
            for layer in hf.model.layers:
                for name in ('q_proj', 'k_proj', 'v_proj'):
                    getattr(layer.self_attn, name).bias.normal_(0, 0.3)
    path = str(tmp / name)
    hf.eval().save_pretrained(path)
    return path, hf


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    import sentencepiece as spm
    tmp = tmp_path_factory.mktemp('sample')
    buf = io.BytesIO()  # a Llama-style sentencepiece model: unk 0, bos 1, eos 2, byte fallback
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines()), model_writer=buf, vocab_size=400,
        model_type='bpe', split_digits=True, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    vocab = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    llama, hf = tiny_hf(tmp, 'llama', vocab, 'llama', seed=0)
    (tmp / 'llama' / 'tokenizer.model').write_bytes(buf.getvalue())
    qwen, hf_qwen = tiny_hf(tmp, 'qwen2', vocab, 'qwen2', seed=1)
    tok = load_tokenizer(llama)
    return dict(tmp=tmp, llama=llama, hf=hf, qwen=qwen, hf_qwen=hf_qwen, tok=tok,
                ids=tok.encode(PROMPT, bos=True))


@torch.no_grad()
def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def ours_generate(path, ids, n, chunk=16, **kw):
    net = load_pretrained(path)
    net.infer_chunk = chunk  # the prompt's forward in several row chunks
    cache, logits = sample.prefill(net, ids)
    return list(sample.generate(net, cache, logits, n, eos_ids={2}, **kw))


@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_greedy_equals_transformers_generate(env, arch):
    path, hf = (env['llama'], env['hf']) if arch == 'llama' else (env['qwen'], env['hf_qwen'])
    ids = env['ids'] * 3  # a longer prompt than one row chunk
    ref = hf_greedy(hf, ids, 60)
    assert len(ref) >= 20  # enough steps through the cache before any EOS
    assert ours_generate(path, ids, 60, temperature=0.0) == ref


def run_cli(*args):
    # bytes decoded here: text=True would turn a generated '\r' into '\n'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONIOENCODING='utf-8')
    proc = subprocess.run([sys.executable, 'sample.py', *args], cwd=ROOT, capture_output=True,
                          timeout=300, env=env)
    proc.stdout, proc.stderr = proc.stdout.decode('utf-8'), proc.stderr.decode('utf-8')
    return proc


def generated_stdout(proc, n_args):
    """stdout after the configurator's one 'Overriding: ...' line per --key=value."""
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split('\n', n_args)
    assert all(line.startswith('Overriding: ') for line in lines[:n_args])
    return lines[n_args]


def test_cli_streams_the_greedy_text(env, tmp_path):
    """The CLI from a prompt file + question: the streamed text is the tokenizer's decode of
    transformers' greedy output (after the prompt), and the run stops at max_new_tokens or EOS."""
    tok = env['tok']
    doc = '\n'.join(TEXT.splitlines()[:2])
    (tmp_path / 'doc.txt').write_text(doc)
    question = 'What did the clocks do?'
    ids = tok.encode(doc + '\n' + question, bos=True)
    ref = hf_greedy(env['hf'], ids, 40)
    args = [f"--model={env['llama']}", f"--prompt_file={tmp_path / 'doc.txt'}",
            f'--question={question}', '--temperature=0', '--max_new_tokens=40', '--device=cpu']
    out = generated_stdout(run_cli(*args), len(args))
    assert out == tok.decode(ids + ref)[len(tok.decode(ids)):] + '\n'


def byte_level_bpe(tmp):
    """A tokenizer.json of the Llama 3 / Qwen2 kind: byte-level BPE (a character may split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<s>', '</s>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(TEXT.splitlines(), trainer)
    hf.save(str(tmp / 'tokenizer.json'))
    return load_tokenizer(str(tmp / 'tokenizer.json'))


@pytest.mark.parametrize('kind', ['sentencepiece', 'byte-level BPE'])
def test_detokenize_streams_the_whole_decode(env, tmp_path, kind):
    """Pieces streamed token by token, multi-byte characters split over byte tokens included, join
    to the decode of the whole output, none ending in a half character."""
    tok = env['tok'] if kind == 'sentencepiece' else byte_level_bpe(tmp_path)
    context = tok.encode('The quick brown fox', bos=True)
    rng = np.random.default_rng(0)
    texts = [' jumps over the lazy dog.', ' ça coûte 12€ — 東京', 'über\nnaïve 🙂 ok']
    for text in texts:
        gen = tok.encode(text, bos=False) + [tok.eos_id]
        pieces = list(sample.detokenize(tok.decode, gen, context[-sample.CONTEXT_TOKENS:]))
        assert ''.join(pieces) == tok.decode(context + gen)[len(tok.decode(context)):]
        assert not any(p.endswith('\ufffd') for p in pieces) and len(pieces) > 1
    assert any(tok.decode([t]) == '\ufffd' for t in tok.encode(texts[1], bos=False))  # split chars
    for _ in range(20):  # random tokens (byte pieces too): the stream joins to the whole decode
        gen = rng.integers(2, tok.vocab_size, 30).tolist()
        pieces = sample.detokenize(tok.decode, gen, context[-sample.CONTEXT_TOKENS:])
        assert ''.join(pieces) == tok.decode(context + gen)[len(tok.decode(context)):]


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(env):
    ids, path = env['ids'], env['llama']

    def gen(seed, **kw):
        return ours_generate(path, ids, 30, generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = (gen(s, temperature=1.5, top_k=50) for s in (7, 7, 8))
    assert a == b and a != c
    assert gen(7, temperature=1.0, top_k=1) == hf_greedy(env['hf'], ids, 30)


@torch.no_grad()
def test_sampling_draws_from_tempered_top_k_softmax(env):
    """The first sampled token over many seeds against transformers' next-token probabilities,
    softmax(logits / T) over the top k: a chi-square test that a wrong T or k fails."""
    T, k, n = 1.7, 12, 4000
    ids = env['ids']
    logits = env['hf'](torch.tensor([ids])).logits[0, -1].double()

    def expected(temp, kk):
        top = torch.topk(logits, kk).indices
        p = torch.softmax(logits[top] / temp, -1)
        return {int(t): float(q) for t, q in zip(top, p)}

    net = load_pretrained(env['llama'])
    cache, last = sample.prefill(net, ids)
    draws = [next(sample.generate(net, cache, last, 1, T, k, {2}, torch.Generator().manual_seed(s)))
             for s in range(n)]
    counts = {t: draws.count(t) for t in set(draws)}

    def chi2(p):  # bins expecting < 5 draws pooled into one, draws outside p counted there too
        obs, exp, pool_o, pool_e = [], [], 0, 0.0
        for t, q in p.items():
            if n * q >= 5:
                obs.append(counts.get(t, 0))
                exp.append(n * q)
            else:
                pool_o, pool_e = pool_o + counts.get(t, 0), pool_e + n * q
        pool_o += sum(c for t, c in counts.items() if t not in p)
        obs, exp = np.array(obs + [pool_o]), np.array(exp + [max(pool_e, 1e-9)])
        return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1

    stat, df = chi2(expected(T, k))
    assert set(counts) <= set(expected(T, k)) and df >= 5
    assert stat < df + 4 * np.sqrt(2 * df), (stat, df)  # the right distribution: a small statistic
    for wrong in (expected(1.0, k), expected(T, k // 2)):  # and the test would see a wrong T or k
        w, wdf = chi2(wrong)
        assert w > wdf + 8 * np.sqrt(2 * wdf), (w, wdf)


def run_main(monkeypatch, **config):
    for key, v in config.items():
        assert hasattr(sample, key), key
        monkeypatch.setattr(sample, key, v)
    sample.main()


def test_bad_input(env, tmp_path, monkeypatch, capsys):
    ok = dict(model=env['llama'], prompt=PROMPT, device='cpu', max_new_tokens=5)
    n_prompt = len(env['ids'])
    cases = [
        (dict(model=str(tmp_path / 'nope')), 'model dir not found.*nope'),
        (dict(prompt='', prompt_file=str(tmp_path / 'missing.txt')), 'prompt_file not found'),
        (dict(prompt_file=str(tmp_path / 'missing.txt')), 'exactly one of.*both'),
        (dict(prompt=''), 'exactly one of.*neither'),
        (dict(temperature=-0.5), r'temperature must be a number >= 0.*-0\.5'),
        (dict(temperature='hot'), "temperature.*'hot'"),
        (dict(top_k=-3), 'top_k must be.*-3'),
        (dict(top_k=2.5), r'top_k must be.*2\.5'),
        (dict(max_new_tokens=0), 'max_new_tokens must be an int >= 1, got 0'),
        (dict(max_position_embeddings=0), 'max_position_embeddings must be an int >= 1, got 0'),
        (dict(max_new_tokens=MAX_POS), rf'prompt \({n_prompt} tokens\) \+ max_new_tokens '
         rf'\({MAX_POS}\) = {n_prompt + MAX_POS} > max_position_embeddings={MAX_POS}'),
    ]
    for bad, msg in cases:
        with pytest.raises(UserError, match=msg):
            run_main(monkeypatch, **dict(ok, **bad))
        monkeypatch.undo()
    mistral = tmp_path / 'mistral'  # the same weights read as a Mistral with a 64-token window
    shutil.copytree(env['llama'], mistral)
    cfg = json.loads((mistral / 'config.json').read_text())
    cfg.update(architectures=['MistralForCausalLM'], model_type='mistral', sliding_window=64)
    (mistral / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=rf'= {n_prompt + 30} > sliding_window=64'):
        run_main(monkeypatch, **dict(ok, model=str(mistral), max_new_tokens=30))
    monkeypatch.undo()
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
    with pytest.raises(UserError, match='latin1.txt: not UTF-8'):
        run_main(monkeypatch, **dict(ok, prompt='', prompt_file=str(tmp_path / 'latin1.txt')))
    monkeypatch.undo()
    # an override allows the longer run: max_position_embeddings, or allow_beyond_max (warned)
    run_main(monkeypatch, **dict(ok, max_new_tokens=MAX_POS, max_position_embeddings=2 * MAX_POS))
    assert 'warning' not in capsys.readouterr().err
    monkeypatch.undo()
    run_main(monkeypatch, **dict(ok, max_new_tokens=MAX_POS, allow_beyond_max=True, temperature=0))
    assert 'warning' in capsys.readouterr().err
    # the CLI (errors.run, the same for every UserError above): one line, exit 2, no traceback
    proc = run_cli(f"--model={env['llama']}", '--device=cpu', f'--prompt={PROMPT}',
                   f'--max_new_tokens={MAX_POS}')
    assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0, proc.stderr
    assert proc.stderr.startswith('error:') and f'max_position_embeddings={MAX_POS}' in proc.stderr


def test_samples_after_the_first_reuse_the_prompt_cache(env, monkeypatch, capsys):
    """num_samples greedy runs from one prefill: each is transformers' greedy text (the cache is cut
    back to the prompt between samples)."""
    tok, ids = env['tok'], env['ids']
    ref = tok.decode(ids + hf_greedy(env['hf'], ids, 20))[len(tok.decode(ids)):]
    run_main(monkeypatch, model=env['llama'], prompt=PROMPT, device='cpu', temperature=0,
             max_new_tokens=20, num_samples=3)
    assert capsys.readouterr().out == (ref + '\n---------------\n') * 3
