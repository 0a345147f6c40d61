"""Fixtures and helpers several test files share (test files import the helpers from here, never
from each other)."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models on 2 shared cores: a second intra-op thread only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- tiny HF models vs ours (test_model, test_model_io, test_rope, test_export_compat) ----
TOL = 2e-4
VOCAB, MPE, HEAD_DIM = 128, 32, 16


def make_hf(tmp_path, arch='llama', kv=2, tie=False, rope=None, theta=10000.0, mpe=MPE, **extra):
    """A tiny random HF model saved by transformers; weights scaled up so RoPE errors show in the
    logits."""
    import transformers  # imported here: most test files never need it
    cfg_cls, model_cls = {'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM),
                          'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    cfg = cfg_cls(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=mpe,
                  tie_word_embeddings=tie,
                  rope_parameters=dict(rope or {'rope_type': 'default'}, rope_theta=theta), **extra)
    torch.manual_seed(0)
    hf = model_cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                # large weights: sharp attention, so wrong angles move the logits a lot
                p.normal_(0, 0.3)
            else:
                p.add_(torch.randn_like(p) * 0.1)  # norms / biases away from their 1 / 0 init
    d = str(tmp_path / f'hf_{arch}')
    hf.save_pretrained(d)
    return hf, d


def positions(kind, B=2):
    """[B, T] position ids: contiguous, short (inside the original window), skip-wise, mixed
    rows."""
    # [0..k) u [k+s..T+s)
    skip = torch.cat([torch.arange(0, 16), torch.arange(16 + 60, 16 + 60 + 32)])
    if kind == 'short':
        p = torch.arange(24)
    elif kind == 'contig':
        p = torch.arange(48)
    elif kind == 'skip':
        p = skip
    else:  # rows differ: one contiguous, one skip-wise
        return torch.stack([torch.arange(48), skip])
    return p[None].expand(B, -1)


def hf_logits(hf, idx, pos):
    # a fresh copy each time: transformers' dynamic RoPE keeps state between calls
    with torch.no_grad():
        return copy.deepcopy(hf)(idx, position_ids=pos).logits


def our_logits(model, idx, pos):
    with torch.no_grad():
        return model(idx, pos)[0]


def idx_for(pos):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, pos.shape, generator=g)


def max_logit_diff(hf, model, pos):
    """max |transformers' logits - ours| for the same token ids (idx_for) at position ids pos."""
    idx = idx_for(pos)
    return (hf_logits(hf, idx, pos) - our_logits(model, idx, pos)).abs().max()


ROPE_CASES = {  # name: (rope dict for transformers, max_position_embeddings)
    'default': ({'rope_type': 'default'}, MPE),
    'linear': ({'rope_type': 'linear', 'factor': 4.0}, MPE),
    # 'short' stays inside, the rest go beyond
    'dynamic': ({'rope_type': 'dynamic', 'factor': 4.0}, MPE),
    'yarn': ({'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32}, 128),
    'yarn_attn': ({'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32,
                   'attention_factor': 1.3, 'beta_fast': 16, 'beta_slow': 2}, 128),
    'yarn_mscale': ({'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32,
                     'mscale': 1.0, 'mscale_all_dim': 0.5, 'truncate': False}, 128),
    # factor != max_position_embeddings / original (8 != 4, and 2 != 4): the factor given wins, not
    # the ratio (no factor at all: transformers 5's config refuses it; test_rope checks that
    # fallback on its RoPE init)
    'yarn_factor8': ({'rope_type': 'yarn', 'factor': 8.0,
                      'original_max_position_embeddings': 32}, 128),
    'yarn_factor2_mscale': ({'rope_type': 'yarn', 'factor': 2.0,
                             'original_max_position_embeddings': 32, 'mscale': 1.0,
                             'mscale_all_dim': 0.5}, 128),
    'llama3': ({'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                'high_freq_factor': 4.0, 'original_max_position_embeddings': 32}, 128),
    # short/long regimes
    'longrope': ({'rope_type': 'longrope', 'original_max_position_embeddings': 32,
                  'short_factor': [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                  'long_factor': [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]}, 128),
    'longrope_attn': ({'rope_type': 'longrope', 'original_max_position_embeddings': 32,
                       'factor': 4.0, 'attention_factor': 1.2,
                       'short_factor': [1.0] * 4 + [2.0] * 4,
                       'long_factor': [1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0]}, 128),
    'longrope_factor2': ({'rope_type': 'longrope', 'original_max_position_embeddings': 32,
                          'factor': 2.0, 'short_factor': [1.0] * 4 + [2.0] * 4,
                          'long_factor': [1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0]},
                         128),  # attention factor from factor 2, not from 128 / 32
}



# ---- data and tokenizers (test_train, test_prepare_data, test_reliability) ----
DATA_VOCAB = 64  # make_data's token ids
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_train(*args, nproc=1):
    """train.py in the background (torchrun over nproc gloo processes when nproc > 1)."""
    cmd = [sys.executable, 'train.py'] if nproc == 1 else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone',
         f'--nproc_per_node={nproc}', 'train.py']
    return subprocess.Popen(cmd + list(args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
TINY = ['config/tiny_pose.py', '--init_from=scratch', '--log_interval=1', '--eval_iters=2']


def make_data(d, n_train=40, n_val=8, lens=(80, 300), seed=0):
    """The documented format, written directly: {split}.bin uint16, {split}.idx int64 offsets,
    meta.json. A learnable corpus: the next token is (5 t + 3) mod DATA_VOCAB with probability 0.9,
    else random."""
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (('train', n_train), ('val', n_val)):
        docs = []
        for _ in range(n):
            t = np.empty(int(rng.integers(lens[0], lens[1] + 1)), np.int64)
            t[0] = rng.integers(DATA_VOCAB)
            for i in range(1, len(t)):
                t[i] = (t[i - 1] * 5 + 3) % DATA_VOCAB if rng.random() < 0.9 \
                    else rng.integers(DATA_VOCAB)
            docs.append(t)
        np.concatenate(docs).astype(np.uint16).tofile(os.path.join(d, f'{split}.bin'))
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in docs])]).astype(np.int64)
        offsets.tofile(os.path.join(d, f'{split}.idx'))
        splits[split] = {'docs': n, 'tokens': int(sum(len(t) for t in docs))}
    meta = {'tokenizer': '', 'tokenizer_sha256': '', 'vocab_size': DATA_VOCAB, 'dtype': 'uint16',
            'bos_id': None, 'eos_id': None, 'splits': splits}
    with open(os.path.join(d, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return d


def make_hf_tokenizer(folder, n_words, specials=('<s>', '</s>')):
    vocab = {'[UNK]': 0, **{s: i + 1 for i, s in enumerate(specials)}}
    vocab.update({f'w{i}': len(vocab) + i for i in range(n_words)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, 'tokenizer.json'))
    return tok


def word_docs(n_words, n_docs=30, seed=0):
    rng = np.random.default_rng(seed)
    return [' '.join(f'w{j}' for j in rng.integers(0, n_words, size=rng.integers(1, 200)))
            for _ in range(n_docs)]
