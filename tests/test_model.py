"""model.py vs transformers (the reference): tiny random Llama / Mistral / Qwen2 checkpoints written
by transformers' own save_pretrained, loaded by our load_pretrained; and our save_pretrained loaded
back by transformers. fp32 logits must agree within 2e-4 for every RoPE type and for skip-wise
position ids."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hf_checkpoint import load_pretrained, save_pretrained
from model import KVCache, ModelArgs, Transformer, chunked_cross_entropy
from conftest import (ROPE_CASES, TOL, VOCAB, hf_logits, idx_for, make_hf, max_logit_diff,
                      our_logits, positions)


def test_roundtrip_export(tmp_path):
    hf, d = make_hf(tmp_path, rope={'rope_type': 'linear', 'factor': 4.0})
    model = load_pretrained(d)
    save_pretrained(model, tmp_path / 'ours', tokenizer_dir=None)
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
    pos = positions('skip')
    assert max_logit_diff(hf2, model, pos) < TOL


# ---- every RoPE type, both config forms, contiguous and skip-wise positions ----------------------


def to_rope_scaling_form(d):
    """Rewrite a transformers-5 config.json (`rope_parameters` with rope_theta inside) in the older
    form: `rope_scaling` with a `type` key and a top-level `rope_theta`."""
    p = os.path.join(d, 'config.json')
    cfg = json.load(open(p))
    rp = cfg.pop('rope_parameters')
    cfg['rope_theta'] = rp.pop('rope_theta')
    rp['type'] = rp.pop('rope_type')
    cfg['rope_scaling'] = rp
    json.dump(cfg, open(p, 'w'))


@pytest.mark.parametrize('case', list(ROPE_CASES))
def test_rope_parity(tmp_path, case):
    rope, mpe = ROPE_CASES[case]
    hf, d = make_hf(tmp_path, rope=rope, mpe=mpe)
    ours_new = load_pretrained(d)
    to_rope_scaling_form(d)
    ours_old = load_pretrained(d)
    # inside the original window; a contiguous row + a skip-wise row
    for kind in ('short', 'mixed'):
        pos = positions(kind)
        ref = hf_logits(hf, idx_for(pos), pos)
        for model in (ours_new, ours_old):
            assert (ref - our_logits(model, idx_for(pos), pos)).abs().max() < TOL, (case, kind)
    # our export -> transformers loads it to our logits
    save_pretrained(ours_old, tmp_path / 'ours', tokenizer_dir=None)
    cfg = json.load(open(tmp_path / 'ours' / 'config.json'))
    assert 'rope_parameters' not in cfg and cfg['rope_theta'] == 10000.0 \
        and cfg['max_position_embeddings'] == mpe
    # yarn: see test_export_compat
    exported = {'yarn': 'longrope'}.get(rope['rope_type'], rope['rope_type'])
    assert (cfg['rope_scaling'] or {'rope_type': 'default'})['rope_type'] == exported
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
    pos = positions('skip')
    assert max_logit_diff(hf2, ours_old, pos) < TOL


def test_parity_tests_can_fail(tmp_path):
    """Guard for the parity tests: on these inputs every scaling (and one more skip) moves the
    logits by far more than TOL, so a wrong formula cannot pass. (Ours equal transformers' in the
    tests above.)"""
    _, d = make_hf(tmp_path)
    pos = positions('skip')
    outs = {}
    for case in ROPE_CASES:
        rope, mpe = ROPE_CASES[case]
        outs[case] = our_logits(load_pretrained(d, rope_scaling=rope, max_position_embeddings=mpe),
                                idx_for(pos), pos)
    pos2 = pos.clone()
    pos2[:, 16:] += 1  # a different skip: different relative distances
    outs['skip+1'] = our_logits(load_pretrained(d), idx_for(pos), pos2)
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (outs[a] - outs[b]).abs().max() > 100 * TOL, (a, b)


# ---- architectures
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize('arch,kv,tie',
                         [('llama', 4, False), ('llama', 2, True), ('mistral', 2, False),
                                         ('qwen2', 2, False), ('qwen2', 2, True)])
def test_arch_parity(tmp_path, arch, kv, tie):
    rope = ROPE_CASES['yarn'][0]
    hf, d = make_hf(tmp_path, arch=arch, kv=kv, tie=tie, rope=rope, mpe=128)
    model = load_pretrained(d)
    assert model.args.arch == arch and model.args.n_kv_heads == kv \
        and model.args.tie_word_embeddings == tie
    if tie:
        assert model.lm_head.weight is model.embed_tokens.weight
    pos = positions('mixed')
    assert max_logit_diff(hf, model, pos) < TOL
    save_pretrained(model, tmp_path / 'ours', tokenizer_dir=None)
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
    assert type(hf2) is type(hf)
    pos = positions('skip')
    assert max_logit_diff(hf2, model, pos) < TOL


@pytest.mark.parametrize('arch,kv,chunk', [('llama', 2, 4), ('qwen2', 4, 0)])
def test_kv_cache_equals_full_forward(tmp_path, arch, kv, chunk):
    """forward_hidden with a KVCache (prefill, several tokens after the cache, one token, a
    truncated cache) gives transformers' logits of the whole sequence at those positions
    (eval_passkey's greedy decoding)."""
    hf, d = make_hf(tmp_path, arch=arch, kv=kv, rope=ROPE_CASES['yarn'][0], mpe=128)
    model = load_pretrained(d)
    model.infer_chunk = chunk  # 0: the cache path runs each call in one chunk
    idx = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf, idx, torch.arange(40)[None])[0]
    cache = KVCache(model.args.n_layers)
    with torch.no_grad():
        # the last reruns 30..35 after truncate(30)
        for a, b in [(0, 25), (25, 35), (35, 36), (30, 40)]:
            cache.truncate(a)
            got = model.lm_head(model.forward_hidden(idx[:, a:b], cache=cache))[0]
            assert len(cache) == b
            assert (got - ref[a:b]).abs().max() < TOL, (a, b)


def test_mistral_sliding_window(tmp_path):
    hf, d = make_hf(tmp_path, arch='mistral', sliding_window=16)
    model = load_pretrained(d)
    pos = torch.cat([torch.arange(8), torch.arange(40, 48)])[None]  # T = 16 = window: plain causal
    assert max_logit_diff(hf, model, pos) < TOL
    with pytest.raises(ValueError, match='sliding_window=16'):
        model(idx_for(positions('short')))
    full = load_pretrained(d, sliding_window=None)  # opting out: full causal attention
    assert full(idx_for(positions('short')))[0].shape == (2, 24, VOCAB)


# ---- chunked loss
# -----------------------------------------------------------------------------------
def test_chunked_loss_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (50,), generator=g)
    t[::3] = -100
    loss = chunked_cross_entropy(h, w, t, chunk=7)  # 7 does not divide 50
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = F.cross_entropy(h @ w.T, t, ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(gh, rh, atol=1e-6) and torch.allclose(gw, rw, atol=1e-6)
    # no valid target: a finite zero loss and zero gradients, not NaN
    empty = chunked_cross_entropy(h, w, torch.full((50,), -100), chunk=7)
    assert empty.item() == 0.0 and torch.autograd.grad(empty, h)[0].abs().max() == 0


def test_chunked_loss_keeps_no_logits_for_backward():
    """Tensors saved for backward while the loss runs: none may be a [chunk, vocab] logits block."""
    N, V, chunk = 64, 40, 8
    h = torch.randn(N, 16, requires_grad=True)
    w = torch.randn(V, 16, requires_grad=True)
    t = torch.randint(0, V, (N,))
    def saved_shapes(fn):
        shapes = []
        def pack(x):
            shapes.append(tuple(x.shape))
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = fn()
        return out, shapes
    loss, ours = saved_shapes(lambda: chunked_cross_entropy(h, w, t, chunk=chunk))
    # only the inputs h, w, targets (+ scalars)
    assert ours and not any(s[-1:] == (V,) for s in ours), ours
    # guard: plain CE saves logits
    _, plain = saved_shapes(lambda: F.cross_entropy((h @ w.T).float(), t))
    assert (N, V) in plain
    loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_model_loss_matches_plain_cross_entropy():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                  vocab_size=VOCAB))
    model.init_weights()
    model.loss_chunk = 5
    pos = positions('mixed')
    idx = idx_for(pos)
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :7] = -100
    logits, loss = model(idx, pos, targets)
    assert logits is None
    grads = torch.autograd.grad(loss, list(model.parameters()))
    full, none = model(idx, pos)
    assert none is None and full.shape == (2, 48, VOCAB)
    ref = F.cross_entropy(full.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.allclose(loss, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5)


def test_bf16_close_to_fp32(tmp_path):
    hf, d = make_hf(tmp_path, rope=ROPE_CASES['yarn'][0], mpe=128)
    m32, m16 = load_pretrained(d), load_pretrained(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    pos = positions('mixed')
    out16, out32 = our_logits(m16, idx_for(pos), pos), our_logits(m32, idx_for(pos), pos)
    assert out16.dtype == torch.bfloat16
    # these sharp random weights amplify rounding: judge against transformers' own bf16 error
    ref16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), idx_for(pos), pos).float()
    ref32 = hf_logits(hf, idx_for(pos), pos)
    err, hf_err = (out16.float() - out32).abs().mean(), (ref16 - ref32).abs().mean()
    assert err < 0.05 * out32.abs().mean() and err <= 1.25 * hf_err, (err, hf_err)
    _, loss = m16(idx_for(pos), pos, torch.roll(idx_for(pos), -1, 1))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    save_pretrained(m16, tmp_path / 'bf16', tokenizer_dir=None)
    cfg = json.load(open(tmp_path / 'bf16' / 'config.json'))
    assert cfg['torch_dtype'] == cfg['dtype'] == 'bfloat16'


@pytest.mark.parametrize('tie', [False, True])
def test_flops_per_token_counts_what_a_training_step_multiplies(tie):
    """torch's FlopCounterMode over a real forward + backward (GQA, T = 64 and 256; SDPA's math
    backend so that attention shows as the bmm it is): the matmul FLOPs it counts are
    flops_per_token(T) * T, less the norm weights, which the 6N convention counts (6 per weight per
    token) but which multiply no matrix."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                  vocab_size=VOCAB, tie_word_embeddings=tie))
    model.init_weights()
    norm_weights = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    for T in (64, 256):
        idx = torch.randint(0, VOCAB, (1, T))
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            # full logits + F.cross_entropy: the chunked loss's recompute is not the model's
            logits, _ = model(idx)
            F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
        assert counter.get_total_flops() \
            == model.flops_per_token(T) * T - 6 * norm_weights * T, (tie, T)
