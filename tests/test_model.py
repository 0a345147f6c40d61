"""model.py vs transformers (the reference): tiny random Llama / Mistral / Qwen2 checkpoints written by
transformers' own save_pretrained, loaded by our from_pretrained; and our save_pretrained loaded back by
transformers. fp32 logits must agree within 2e-4 for every RoPE type and for skip-wise position ids."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, \
    Qwen2Config, Qwen2ForCausalLM

from model import ModelArgs, Transformer, chunked_cross_entropy, rope_yarn_pose

TOL = 2e-4
VOCAB, MPE, HEAD_DIM = 128, 32, 16
CLASSES = {'llama': (LlamaConfig, LlamaForCausalLM), 'mistral': (MistralConfig, MistralForCausalLM),
           'qwen2': (Qwen2Config, Qwen2ForCausalLM)}


def make_hf(tmp_path, arch='llama', kv=2, tie=False, rope=None, theta=10000.0, mpe=MPE, **extra):
    """A tiny random HF model saved by transformers; weights scaled up so RoPE errors show in the logits."""
    cfg_cls, model_cls = CLASSES[arch]
    cfg = cfg_cls(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=mpe, tie_word_embeddings=tie,
                  rope_parameters=dict(rope or {'rope_type': 'default'}, rope_theta=theta), **extra)
    torch.manual_seed(0)
    hf = model_cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # large weights: sharp attention, so wrong angles move the logits a lot
            else:
                p.add_(torch.randn_like(p) * 0.1)  # norms / biases away from their 1 / 0 init
    d = str(tmp_path / f'hf_{arch}')
    hf.save_pretrained(d)
    return hf, d


def positions(kind, B=2):
    """[B, T] position ids: contiguous, short (inside the original window), skip-wise, mixed rows."""
    skip = torch.cat([torch.arange(0, 16), torch.arange(16 + 60, 16 + 60 + 32)])  # [0..k) u [k+s..T+s)
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
    with torch.no_grad():  # a fresh copy each time: transformers' dynamic RoPE keeps state between calls
        return copy.deepcopy(hf)(idx, position_ids=pos).logits


def our_logits(model, idx, pos):
    with torch.no_grad():
        return model(idx, pos)[0]


def idx_for(pos):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, pos.shape, generator=g)


def test_llama_default_parity(tmp_path):
    hf, d = make_hf(tmp_path)
    model = Transformer.from_pretrained(d)
    for kind in ('contig', 'skip', 'mixed'):
        pos = positions(kind)
        ref, out = hf_logits(hf, idx_for(pos), pos), our_logits(model, idx_for(pos), pos)
        assert (ref - out).abs().max() < TOL, kind
    # the test can fail: one more skip (a different relative distance) moves the logits far more than TOL
    pos = positions('skip')
    pos2 = pos.clone()
    pos2[:, 16:] += 1
    assert (hf_logits(hf, idx_for(pos), pos) - hf_logits(hf, idx_for(pos), pos2)).abs().max() > 100 * TOL


def test_roundtrip_export(tmp_path):
    hf, d = make_hf(tmp_path, rope={'rope_type': 'linear', 'factor': 4.0})
    model = Transformer.from_pretrained(d)
    model.save_pretrained(tmp_path / 'ours')
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
    pos = positions('skip')
    assert (hf_logits(hf2, idx_for(pos), pos) - our_logits(model, idx_for(pos), pos)).abs().max() < TOL
