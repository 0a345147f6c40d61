"""demo/real.py: the report's counts, intervals and paired tests on hand-made eval JSONs (expected
values worked out here from the tests' definitions), the Gutenberg splitter, and the GPU profile of
demo/real.sh run end to end at toy size on the CPU."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f)


def passkey_json(length, verdicts, logps, keys):
    trials = [{'length': length, 'depth_requested': 0.5, 'key': k, 'pass': v, 'key_logprob': lp}
              for v, lp, k in zip(verdicts, logps, keys)]
    return {'trials': trials}


def report(out_dir, *args):
    return subprocess.run([sys.executable, 'demo/real.py', '--stage=report', f'--out_dir={out_dir}',
                           '--seeds=1', *args], cwd=ROOT, capture_output=True, text=True)


def test_report_pairs_trials_and_tests(tmp_path):
    keys = [str(10000 + i) for i in range(10)]
    # at 24k: PoSE passes 9, Contiguous 2; the 7 discordant pairs all favour PoSE. Contiguous's file
    # lists its trials in another order: pairing is by key, not by position.
    write(tmp_path / 'passkey-pose32k-s1-24576.json',
          passkey_json(24576, [True] * 9 + [False], [-1.0 - i / 10 for i in range(10)], keys))
    write(tmp_path / 'passkey-contig32k-s1-24576.json',
          passkey_json(24576, [i in (1, 2) for i in range(10)][::-1],
                       [-5.0 - i for i in range(10)][::-1], keys[::-1]))
    # at 4k (inside the window): not compared
    write(tmp_path / 'passkey-pose32k-s1-4096.json', passkey_json(4096, [True], [-1.0], keys[:1]))
    write(tmp_path / 'passkey-contig32k-s1-4096.json', passkey_json(4096, [True], [-1.0], keys[:1]))
    write(tmp_path / 'ppl-prose-original.json', {'ppl': {'2048': 10.0}})
    write(tmp_path / 'ppl-prose-pose32k-s1.json', {'ppl': {'2048': 10.2}})
    # multikey: PoSE 10/10 at 8k (the Original has no 8k file) and 8/10 at 16k, the Original 0/10
    write(tmp_path / 'multikey-pose32k-s1-8192.json',
          passkey_json(8192, [True] * 10, [-1.0] * 10, keys))
    write(tmp_path / 'multikey-pose32k-s1-16384.json',
          passkey_json(16384, [True] * 8 + [False] * 2, [-1.0] * 10, keys))
    write(tmp_path / 'multikey-original-16384.json',
          passkey_json(16384, [False] * 10, [-9.0] * 10, keys))
    r = report(tmp_path)
    assert r.returncode == 0, r.stderr
    text = open(tmp_path / 'results.txt').read()
    # the Wilson interval of 9/10: centre (p + z^2/2n) / (1 + z^2/n),
    # half-width z/(1 + z^2/n) sqrt(...)
    z, p, n = 1.96, 0.9, 10
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert f"9/10 [{c - h:.2f},{c + h:.2f}]" in text
    line = next(x for x in text.splitlines() if x.startswith('Contiguous 8k') and '24576' in x)
    n_pairs, a, b, mcn, dlogp, wil = line.split()[-6:]
    assert (int(n_pairs), int(a), int(b)) == (10, 9, 2)
    assert float(mcn) == pytest.approx(2 * 0.5 ** 7, rel=5e-3)  # 7 discordant, all one way
    # key i: PoSE -1 - i/10, Contiguous -5 - i
    d = [(-1.0 - i / 10) - (-5.0 - i) for i in range(10)]
    assert float(dlogp) == pytest.approx(np.median(d), abs=0.01)
    # every difference positive: one pattern of 1024
    assert float(wil) == pytest.approx(2 / 2 ** 10, rel=5e-3)
    assert not any('4096' in x.split()[1:2] for x in text.splitlines()
                   if x.startswith('Contiguous 8k '))
    assert '+  pose32k-s1 above contig32k-s1 past 16k' in text
    multi = text.split('Multi-key retrieval')[1].split('Perplexity')[0].splitlines()
    assert multi[2].split() == ['8192', '16384']

    def cell(k, n):
        p = k / n
        c = (p + z * z / (2 * n)) / (1 + z * z / n)
        h = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return f"{k}/{n} [{max(c - h, 0):.2f},{min(c + h, 1):.2f}]"
    orig = next(x for x in multi if x.startswith('Original'))
    pose = next(x for x in multi if x.startswith('PoSE 8k->32k'))
    assert orig.split()[1:] == ['-'] + cell(0, 10).split()
    assert pose.split()[2:] == cell(10, 10).split() + cell(8, 10).split()
    # 8 discordant pairs, all PoSE's: McNemar p = 2 / 2^8
    assert '+  pose32k-s1 above the Original on multikey at 16k' in text
    assert '+  pose32k-s1: prose perplexity at 2k within 3%' in text  # 10.2 <= 1.03 * 10


def test_report_refuses_an_empty_dir(tmp_path):
    r = report(tmp_path / 'missing')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'missing' in r.stderr
    (tmp_path / 'empty').mkdir()
    r = report(tmp_path / 'empty')
    assert (r.returncode == 2 and 'Traceback' not in r.stderr
            and len(r.stderr.strip().splitlines()) == 1)


def test_gutenberg_books(monkeypatch):
    import importlib
    # its config runs at import: no pytest arguments
    monkeypatch.setattr(sys, 'argv', ['demo/real.py'])
    real = importlib.import_module('demo.real')
    text = ("header\n*** START OF THE PROJECT GUTENBERG EBOOK, ONE ***\n"
            "Produced by someone\nat a site\n\n"
            "Chapter 1\nIt was.\nEnd of the Project Gutenberg EBook of One\n\n"
            "*** END OF THE PROJECT ***\n"
            "licence\n*** START OF THIS PROJECT GUTENBERG EBOOK TWO ***\n\nTwo begins.\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK TWO ***\n")
    assert real.gutenberg_books(text) == ["Chapter 1\nIt was.\n", "Two begins.\n"]
    assert (real.first_kb("a\n\nb" * 1000, 1).endswith('a\n')
            and len(real.first_kb("x" * 10, 1)) == 10)


ENGLISH = ("It was a bright cold day in April, and the clocks were striking thirteen. "
           "The quick brown fox jumps over the lazy dog. Call me Ishmael. "
           "In a hole in the ground there lived a hobbit. "
           "The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again. "
           "There is an important info hidden inside a lot of irrelevant text. "
           "What is the pass key? The pass key is 12345. Remember it. 67890 is the pass key. ")


def test_gpu_profile_runs_at_toy_size_on_cpu(tmp_path):
    """GPU=1 QUICK=1 GPU_DEVICE=cpu: every job of the GPU profile (the full-length, linear and 64k
    runs included) trains, exports and evaluates a tiny model end to end, and the report pairs its
    rows."""
    import io

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(ENGLISH.split('. ')), model_writer=buf,
                                   vocab_size=400, model_type='bpe', split_digits=True,
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    vocab = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = tmp_path / 'model'
    LlamaForCausalLM(cfg).save_pretrained(model)
    (model / 'tokenizer.model').write_bytes(buf.getvalue())
    rng = np.random.default_rng(0)
    words = ENGLISH.split()

    def docs(n, n_words):
        return [' '.join(rng.choice(words, n_words)) for _ in range(n)]
    data = tmp_path / 'data'
    for split, texts in (('train', docs(6, 800)), ('val', docs(2, 1500)), ('prose', docs(2, 1500))):
        with open(tmp_path / f'{split}.jsonl', 'w') as f:
            f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
    py = sys.executable
    for args in ([f'--input={tmp_path}/train.jsonl', f'--val_input={tmp_path}/val.jsonl',
                  f'--out_dir={data}'],
                 [f'--input={tmp_path}/prose.jsonl', '--shuffle=False', f'--out_dir={data}/prose']):
        r = subprocess.run([py, 'prepare_data.py', f'--tokenizer={model}', *args], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    out = tmp_path / 'out'
    env = dict(os.environ, PY=py, MODEL=str(model), DATA=str(data), OUT=str(out), GPU='1',
               QUICK='1', GPU_DEVICE='cpu', JOBS='2')
    r = subprocess.run(['bash', 'demo/real.sh'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'FAILED' not in r.stdout
    for row in ('full32k-s1337', 'lpose32k-s1337', 'pose64k-s1337', 'contig64k-s1337'):
        assert (out / row / 'hf' / 'config.json').is_file()
        pk = json.load(open(out / f'passkey-{row}-2048.json'))
        assert pk['count']['2048'] == 1 and pk['trials'][0]['key_logprob'] < 0
    full = json.load(open(out / 'full32k-s1337' / 'hf' / 'config.json'))
    # QUICK's full-length run trains at its input length
    assert full['max_position_embeddings'] == 512
    for row in ('original', 'pose32k-s1337'):
        mk = json.load(open(out / f'multikey-{row}-2048.json'))
        assert mk['settings']['task'] == 'multikey' and mk['count']['2048'] == 1
    text = open(out / 'results.txt').read()
    assert 'Full-length 32k' in text and 'PoSE 8k->64k' in text and 'YaRN-only x8' in text
    multi = text.split('Multi-key retrieval')[1].split('Perplexity')[0]
    assert {x.split()[0] for x in multi.splitlines()[3:] if x.strip()} == {'Original', 'PoSE'}
