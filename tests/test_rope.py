"""RoPE beyond what transformers has: the paper's fixed NTK and the official PoSE repo's YaRN
variant (checked against their formulas written out here, and through their stock-HF exports),
positions up to 1M, and stateless dynamic NTK."""
import json
import math

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_checkpoint import load_pretrained, save_pretrained
from rope import TYPES, normalize, rope_yarn, rope_yarn_pose
from conftest import (HEAD_DIM, ROPE_CASES, TOL, hf_logits, idx_for, make_hf, max_logit_diff,
                      our_logits, positions)


def pose_repo_inv_freq(theta, d, s, orig, beta_fast=32, beta_slow=1):
    """The PoSE repo's `revised_yarn`, one dimension at a time: wavelengths are blended,
    inv'_i = inv_i / ((1 - g_i) * s + g_i), g_i = 1 - ramp_i the extrapolation weight."""
    def corr_dim(rot):
        return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(math.floor(corr_dim(beta_fast)), 0), min(math.ceil(corr_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(d // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        g = 1.0 - ramp
        out.append((1.0 / theta ** (2 * i / d)) / ((1 - g) * s + g))
    return out


def test_yarn_pose_formula():
    for theta, d, s, orig in ((10000.0, 16, 8.0, 256), (10000.0, 128, 32.0, 2048),
                              (500000.0, 128, 16.0, 8192)):
        rs = {'rope_type': 'yarn_pose', 'factor': s, 'original_max_position_embeddings': orig}
        ours, attn = rope_yarn_pose(rs, d, theta, orig, torch.tensor(10))
        ref = torch.tensor(pose_repo_inv_freq(theta, d, s, orig), dtype=torch.float64)
        assert torch.allclose(ours.double(), ref, rtol=1e-6, atol=0), (theta, d, s, orig)
        assert attn == 0.1 * math.log(s) + 1.0
        # ...and it is not HF's YaRN (which blends frequencies): they part in the ramp dimensions
        hf_yarn, _ = rope_yarn(dict(rs, rope_type='yarn'), d, theta, orig, torch.tensor(10))
        assert (hf_yarn.double() / ref - 1).abs().max() > 1e-2


def test_yarn_pose_logits_and_export(tmp_path):
    """yarn_pose == a stock transformers `longrope` model whose per-dimension divisors come from the
    formula above (short = long) with an explicit attention_factor; our export writes exactly
    that."""
    s, orig, theta = 8.0, 256, 10000.0
    inv = pose_repo_inv_freq(theta, HEAD_DIM, s, orig)
    div = [(1.0 / theta ** (2 * i / HEAD_DIM)) / inv[i] for i in range(HEAD_DIM // 2)]
    rope = {'rope_type': 'longrope', 'short_factor': div, 'long_factor': div, 'factor': s,
            'attention_factor': 0.1 * math.log(s) + 1.0, 'original_max_position_embeddings': orig}
    hf, d = make_hf(tmp_path, rope=rope, mpe=orig * 8)
    model = load_pretrained(d, rope_scaling={'rope_type': 'yarn_pose', 'factor': s,
                                                         'original_max_position_embeddings': orig})
    assert model.args.rope_scaling['rope_type'] == 'yarn_pose'
    for kind in ('contig', 'mixed'):
        pos = positions(kind)
        assert max_logit_diff(hf, model, pos) < TOL
    save_pretrained(model, tmp_path / 'ours', tokenizer_dir=None)
    cfg = json.load(open(tmp_path / 'ours' / 'config.json'))
    rs = cfg['rope_scaling']
    assert rs['rope_type'] == 'longrope' and rs['short_factor'] == rs['long_factor']
    assert cfg['original_max_position_embeddings'] == orig  # where transformers 4.4x looks for it
    assert max(abs(a - b) for a, b in zip(rs['short_factor'], div)) < 1e-6
    assert abs(rs['attention_factor'] - (0.1 * math.log(s) + 1.0)) < 1e-12
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
    pos = positions('skip')
    assert max_logit_diff(hf2, model, pos) < TOL


def test_ntk_logits_and_export(tmp_path):
    """ntk with alpha == plain RoPE with base theta * alpha^(d/(d-2)) (the paper's formula), via
    either key."""
    alpha, theta = 4.0, 10000.0
    hf, d = make_hf(tmp_path, theta=theta * alpha ** (HEAD_DIM / (HEAD_DIM - 2)))
    for key in ('factor', 'alpha'):
        model = load_pretrained(d, rope_theta=theta, rope_scaling={'rope_type': 'ntk', key: alpha})
        for kind in ('contig', 'skip'):
            pos = positions(kind)
            assert max_logit_diff(hf, model, pos) < TOL
    plain = load_pretrained(d, rope_theta=theta)  # guard: the base change matters here
    pos = positions('skip')
    assert max_logit_diff(hf, plain, pos) \
        > 100 * TOL
    save_pretrained(model, tmp_path / 'ours', tokenizer_dir=None)
    cfg = json.load(open(tmp_path / 'ours' / 'config.json'))
    assert cfg['rope_scaling'] is None
    assert math.isclose(cfg['rope_theta'], theta * alpha ** (HEAD_DIM / (HEAD_DIM - 2)),
                        rel_tol=1e-12)
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
    assert max_logit_diff(hf2, model, pos) < TOL


def test_positions_up_to_1m(tmp_path):
    """Skip-wise ids reaching 1M: same logits as transformers (bit-identical frequencies), every
    type."""
    pos = torch.cat([torch.arange(16), torch.arange(1_000_000 - 32, 1_000_000)])[None]
    for case in ('default', 'dynamic', 'yarn', 'llama3', 'longrope'):
        rope, mpe = ROPE_CASES[case]
        hf, d = make_hf(tmp_path / case, rope=rope, mpe=mpe)
        model = load_pretrained(d)
        out = our_logits(model, idx_for(pos), pos)
        assert torch.isfinite(out).all()
        assert (hf_logits(hf, idx_for(pos), pos) - out).abs().max() < TOL, case


def test_dynamic_is_stateless(tmp_path):
    """A long batch then a shorter one: each equals a fresh transformers model on that batch (a used
    transformers model would keep the long batch's base)."""
    rope, mpe = ROPE_CASES['dynamic']
    hf, d = make_hf(tmp_path, rope=rope, mpe=mpe)
    model = load_pretrained(d)
    long, shorter = positions('skip'), positions('contig')  # max 107, then max 47 (both beyond 32)
    our_logits(model, idx_for(long), long)
    assert max_logit_diff(hf, model, shorter) < TOL
    with torch.no_grad():  # guard: transformers' stateful update really differs here
        hf(idx_for(long), position_ids=long)
        stale = hf(idx_for(shorter), position_ids=shorter).logits
    assert (stale - our_logits(model, idx_for(shorter), shorter)).abs().max() > 100 * TOL


def test_inv_freq_bit_identical_to_transformers():
    """Real-size heads (d=128): our frequencies and attention factors equal transformers' own RoPE
    init functions bit for bit, for every type and both sides of the original window (what makes 1M
    work)."""
    g = torch.Generator().manual_seed(0)
    short = (1 + torch.rand(64, generator=g)).tolist()
    long = (1 + 7 * torch.rand(64, generator=g)).tolist()
    cases = [({'rope_type': 'linear', 'factor': 8.0}, 4096),
             ({'rope_type': 'dynamic', 'factor': 2.0}, 4096),
             ({'rope_type': 'yarn', 'factor': 16.0,
               'original_max_position_embeddings': 4096}, 65536),
             ({'rope_type': 'yarn', 'factor': 40.0, 'original_max_position_embeddings': 4096,
               'beta_fast': 24, 'mscale': 0.707, 'mscale_all_dim': 0.707, 'truncate': False},
              163840),
             ({'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}, 131072),
             ({'rope_type': 'longrope', 'short_factor': short, 'long_factor': long,
               'original_max_position_embeddings': 4096}, 131072)]
    # factor != mpe / original: the factor wins; no factor: the fallback mpe / original (= 16 here)
    cases += [
        ({'rope_type': 'yarn', 'factor': 8.0, 'original_max_position_embeddings': 4096}, 131072),
        ({'rope_type': 'yarn', 'factor': 2.0, 'original_max_position_embeddings': 4096,
          'mscale': 1.0, 'mscale_all_dim': 0.5}, 131072),
        ({'rope_type': 'yarn', 'original_max_position_embeddings': 4096}, 65536),
        ({'rope_type': 'longrope', 'factor': 2.0, 'short_factor': short, 'long_factor': long,
          'original_max_position_embeddings': 4096}, 131072)]
    for theta in (10000.0, 500000.0):
        for rope, mpe in cases:
            # transformers 5's config wants a yarn factor; its RoPE init still has the mpe /
            # original fallback
            factor = {'factor': 1.0} if rope['rope_type'] == 'yarn' else {}
            cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=mpe,
                              rope_parameters=dict(factor, **rope, rope_theta=theta))
            if 'factor' not in rope:
                cfg.rope_parameters['factor'] = None
            rs = normalize(rope, 128, mpe)
            for seq_len in (100, mpe + 1, 1_000_000):
                seq = torch.tensor(seq_len) if rope['rope_type'] == 'dynamic' else seq_len
                ref, ref_attn = ROPE_INIT_FUNCTIONS[rope['rope_type']](cfg, 'cpu', seq_len=seq)
                ours, attn = TYPES[rs['rope_type']][0](rs, 128, theta, mpe, torch.tensor(seq_len))
                assert torch.equal(ours, ref) \
                    and attn == ref_attn, (rope['rope_type'], theta, seq_len)
