"""
Every RoPE type in one place: its frequencies, its config keys and their checks, the form it is
exported in, and what each reader of that export (transformers 4.45 / 5.x, vLLM) takes from it.

A type is one row of TYPES: the function computing its inverse frequencies, and its required keys.
HF semantics key for key (`rope_type`: default, linear, dynamic, yarn, llama3, longrope), plus the
paper's fixed `ntk` (base x alpha^(d/(d-2))) and the official PoSE repo's `yarn_pose`. A rope dict
enters from a config key (train.py / eval_*.py `rope_scaling`), a checkpoint's config.json
(`rope_scaling` or transformers 5's `rope_parameters`), a train_state.json on resume, or a load
override; ModelArgs runs it through `normalize` once: one canonical {'rope_type': ..., ...} or None,
a UserError naming the key and value for anything unusable. model.py applies the result (cos_sin);
hf_checkpoint.py writes `export`.
"""
import math
import numbers

import torch

from errors import UserError

# -----------------------------------------------------------------------------
# frequencies: one small pure function per rope_type.
# f(rs, d, theta, mpe, seq_len) -> (inv_freq fp32 [d/2], attention_factor)
#   rs: the normalized rope dict, d: head_dim, theta: rope_theta, mpe: max_position_embeddings,
#   seq_len: 0-d int64 tensor = max position id in the batch + 1 (only dynamic/longrope read it).
# All in fp32 with the same operation order as Meta's / transformers' code, so the frequencies are
# bit-identical and logits still agree at positions ~1M (where one ulp of inv_freq is ~0.1 rad).


def _pos_freqs(theta, d, device):  # theta^(2i/d), i < d/2: the wavelengths / 2pi
    return theta ** (torch.arange(0, d, 2, device=device).float() / d)


def _yarn_ramp(rs, d, theta, device):
    # 0 for dimensions that extrapolate (short wavelengths), 1 for those that interpolate, linear
    # between
    orig = rs['original_max_position_embeddings']
    corr_dim = lambda rot: d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = corr_dim(rs.get('beta_fast') or 32), corr_dim(rs.get('beta_slow') or 1)
    if rs.get('truncate', True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    hi = hi + 0.001 if lo == hi else hi  # avoid 0/0, as in the YaRN reference code
    return ((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1).to(device)


def _yarn_mscale(s, m=1.0):
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0


def rope_default(rs, d, theta, mpe, seq_len):
    return 1.0 / _pos_freqs(theta, d, seq_len.device), 1.0


def rope_linear(rs, d, theta, mpe, seq_len):  # positions divided by `factor` (Position Interp.)
    return 1.0 / _pos_freqs(theta, d, seq_len.device) / rs['factor'], 1.0


def ntk_theta(rs, d, theta):  # the paper's fixed NTK: base * alpha^(d/(d-2)); alpha: key `factor`
    alpha = rs['factor'] if 'factor' in rs else rs['alpha']
    return theta * alpha ** (d / (d - 2))


def rope_ntk(rs, d, theta, mpe, seq_len):
    return 1.0 / _pos_freqs(ntk_theta(rs, d, theta), d, seq_len.device), 1.0


def rope_dynamic(rs, d, theta, mpe, seq_len):
    # dynamic NTK, stateless: the base grows with the batch's largest position once it passes mpe (a
    # fresh transformers model does exactly this; a used one keeps its largest length seen so far)
    f = rs['factor']
    base = theta * (f * seq_len.clamp(min=mpe) / mpe - (f - 1)) ** (d / (d - 2))  # fp32 0-d tensor
    return 1.0 / base ** (torch.arange(0, d, 2, device=seq_len.device).float() / d), 1.0


def yarn_factor_attention(rs, mpe):  # HF yarn's (s, attention_factor); s: factor | mpe / original
    s = rs.get('factor') or mpe / rs['original_max_position_embeddings']
    attn = rs.get('attention_factor')
    if attn is None:
        m, m_all = rs.get('mscale'), rs.get('mscale_all_dim')
        attn = _yarn_mscale(s, m) / _yarn_mscale(s, m_all) if m and m_all else _yarn_mscale(s)
    return s, attn


def rope_yarn(rs, d, theta, mpe, seq_len):  # HF YaRN blends frequencies: inv' = inv * ((1-g)/s + g)
    s, attn = yarn_factor_attention(rs, mpe)
    pf = _pos_freqs(theta, d, seq_len.device)
    g = 1 - _yarn_ramp(rs, d, theta, seq_len.device)  # extrapolation weight
    return 1.0 / (s * pf) * (1 - g) + 1.0 / pf * g, attn


def yarn_divisors(rs, d, theta, mpe):
    # the same frequencies as per-dimension divisors (inv' = inv / div, longrope's form), in fp64 so
    # the exported factors are within an fp32 rounding of HF yarn's own inv_freq
    s, _ = yarn_factor_attention(rs, mpe)
    g = 1 - _yarn_ramp(rs, d, theta, 'cpu').double()
    return 1.0 / ((1 - g) / s + g)


def yarn_pose_divisors(rs, d, theta, device='cpu'):
    # the official PoSE repo's "revised" YaRN blends wavelengths: inv' = inv / ((1-g)*s + g)
    g = 1 - _yarn_ramp(rs, d, theta, device)  # extrapolation weight
    return (1 - g) * rs['factor'] + g


def yarn_pose_attention_factor(rs):  # the repo's mscale 0.1 ln(s) + 1 | attention_factor
    a = rs.get('attention_factor')
    return _yarn_mscale(rs['factor']) if a is None else a


def rope_yarn_pose(rs, d, theta, mpe, seq_len):
    div = yarn_pose_divisors(rs, d, theta, seq_len.device)
    return 1.0 / _pos_freqs(theta, d, seq_len.device) / div, yarn_pose_attention_factor(rs)


def rope_llama3(rs, d, theta, mpe, seq_len):
    f, lo_f, hi_f = rs['factor'], rs['low_freq_factor'], rs['high_freq_factor']
    orig = rs['original_max_position_embeddings']
    inv = 1.0 / _pos_freqs(theta, d, seq_len.device)
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > orig / lo_f, inv / f, inv)  # long wavelengths: interpolate fully
    smooth = (orig / wavelen - lo_f) / (hi_f - lo_f)
    medium = ~(wavelen < orig / hi_f) * ~(wavelen > orig / lo_f)
    return torch.where(medium, (1 - smooth) * out / f + smooth * out, out), 1.0


def longrope_attention_factor(rs, mpe):
    # transformers 5's: attention_factor, else from factor (or mpe / original)
    orig = rs['original_max_position_embeddings']
    s = rs.get('factor') or mpe / orig
    attn = rs.get('attention_factor')
    if attn is None:
        attn = 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(orig))
    return attn


def rope_longrope(rs, d, theta, mpe, seq_len):
    # per-dimension divisors; the long set once the batch's largest position passes the original
    # window
    orig = rs['original_max_position_embeddings']
    attn = longrope_attention_factor(rs, mpe)
    dev = seq_len.device
    short = torch.tensor(rs['short_factor'], dtype=torch.float32, device=dev)
    long = torch.tensor(rs['long_factor'], dtype=torch.float32, device=dev)
    return 1.0 / (torch.where(seq_len > orig, long, short) * _pos_freqs(theta, d, dev)), attn


# rope_type -> (its frequencies, the keys it requires); yarn's factor defaults to mpe / original
TYPES = {
    'default': (rope_default, ()),
    'linear': (rope_linear, ('factor',)),
    'dynamic': (rope_dynamic, ('factor',)),
    'yarn': (rope_yarn, ()),
    'llama3': (rope_llama3, ('factor', 'low_freq_factor', 'high_freq_factor')),
    'longrope': (rope_longrope, ('short_factor', 'long_factor')),
    'ntk': (rope_ntk, ()),  # 'factor' or 'alpha'
    'yarn_pose': (rope_yarn_pose, ('factor',)),
}
NEEDS_ORIG = ('yarn', 'llama3', 'longrope', 'yarn_pose')  # read original_max_position_embeddings


def cos_sin(args, position_ids):
    """position_ids [T] or [B,T] int64 -> cos, sin fp32 [B|1, T, 1, head_dim], shared by all layers.
    args: a ModelArgs (head_dim, rope_theta, rope_scaling normalized, max_position_embeddings)."""
    rs = args.rope_scaling or {'rope_type': 'default'}
    seq_len = position_ids.max() + 1  # 0-d tensor: no host sync
    inv, attn = TYPES[rs['rope_type']][0](rs, args.head_dim, args.rope_theta,
                                          args.max_position_embeddings, seq_len)
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]  # [B|1, T]
    freqs = pos[..., None].float() * inv  # [B|1, T, d/2], fp32 like transformers
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B|1, T, 1, d]
    return emb.cos() * attn, emb.sin() * attn


# -----------------------------------------------------------------------------
# config keys and their checks
# numeric keys and their lower bounds (factor: a scaling never shrinks the window; 1 is a no-op)
NUMBERS = {'factor': 1.0, 'alpha': 0.0, 'original_max_position_embeddings': 0.0,
           'low_freq_factor': 0.0, 'high_freq_factor': 0.0, 'beta_fast': 0.0, 'beta_slow': 0.0,
           'attention_factor': 0.0, 'mscale': 0.0, 'mscale_all_dim': 0.0}
MAX_NUMBER = 1e9  # the upper bound of every numeric key: above it no window or wavelength is meant


def rope_type(rs):
    """The type of an HF rope dict: `rope_type`, or `type` (transformers < 4.42); None: default."""
    return (rs or {}).get('rope_type', (rs or {}).get('type', 'default'))


def _is_number(v, lo=0.0, strict=True):  # a finite real (not a bool) in (lo, MAX_NUMBER]
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > lo if strict else v >= lo) and v <= MAX_NUMBER


def check(rs, where='rope_scaling'):
    """The shape of a rope dict as the user wrote it (no checkpoint needed): a dict with a known
    type whose numeric keys are finite numbers in range. -> its canonical type."""
    if not isinstance(rs, dict):
        raise UserError(f"{where}={rs!r}: expected a dict such as "
                        "{'rope_type': 'linear', 'factor': 4.0} or None")
    if 'rope_type' not in rs and 'type' not in rs:
        raise UserError(f"{where}={rs!r}: needs a 'rope_type' (or None for the model's own)")
    if any(isinstance(v, dict) for v in rs.values()):
        raise UserError(f"{where}: per-layer-type rope parameters {sorted(rs)} are not supported")
    t = rope_type(rs)
    t = 'ntk' if t == 'vanilla_ntk' else t  # the PoSE repo's name for the same thing
    if t not in TYPES:
        raise UserError(f"{where}: unknown rope_type {t!r} (known: {', '.join(TYPES)})")
    for k, lo in NUMBERS.items():
        v = rs.get(k)
        if v is not None and not _is_number(v, lo, strict=k != 'factor'):
            bound = '>= 1' if k == 'factor' else '> 0'
            raise UserError(f"{where}: {k}={v!r} must be a number {bound} and <= {MAX_NUMBER:g}")
    return t


def normalize(rs, head_dim, mpe, where='rope_scaling'):
    """HF `rope_scaling` / `rope_parameters` dict -> {'rope_type': ..., ...} or None (plain RoPE).
    `where` names the door in the error messages (a config key, a config.json path, ...)."""
    if rs is None or rs == {}:
        return None
    t = check(dict(rs, rope_type=rope_type(rs)) if isinstance(rs, dict) else rs, where)
    if t == 'default':  # (a bare HF dict without any type is 'default')
        return None
    rs = {k: v for k, v in rs.items() if k not in ('type', 'rope_type', 'rope_theta')}
    rs['rope_type'] = t
    for k in TYPES[t][1]:
        if rs.get(k) is None:
            raise UserError(f"{where}: rope_type {t!r} needs key {k!r} (got {sorted(rs)})")
    if t == 'ntk' and rs.get('factor') is None and rs.get('alpha') is None:
        raise UserError(f"{where}: rope_type 'ntk' needs key 'factor' (or 'alpha')")
    if t == 'llama3' and rs['high_freq_factor'] <= rs['low_freq_factor']:
        raise UserError(f"{where}: llama3 needs high_freq_factor > low_freq_factor "
                        f"(got {rs['high_freq_factor']} and {rs['low_freq_factor']})")
    if t in NEEDS_ORIG:
        rs.setdefault('original_max_position_embeddings', mpe)
    if t == 'longrope':
        for k in ('short_factor', 'long_factor'):
            v = rs[k]
            if not isinstance(v, (list, tuple)) or len(v) != head_dim // 2 \
                    or not all(_is_number(x) for x in v):
                got = len(v) if isinstance(v, (list, tuple)) else type(v).__name__
                raise UserError(f"{where}: {k} must be {head_dim // 2} (head_dim // 2) positive "
                                f"finite numbers, got {got}")
    return rs


def from_hf_config(cfg, where='config.json'):
    """(rope dict as written or None, rope_theta) of an HF config.json dict: the older
    `rope_scaling` + top-level rope_theta, or transformers 5's `rope_parameters` (rope_theta
    inside); given both, transformers 5 uses rope_scaling, and so do we. A top-level
    original_max_position_embeddings (Phi-3 style) wins, as in transformers. ModelArgs normalizes
    the dict."""
    rp = cfg.get('rope_scaling') or cfg.get('rope_parameters')
    if rp is not None and not isinstance(rp, dict):
        raise UserError(f"{where}: rope_scaling={rp!r}: expected a dict with a 'rope_type' or null")
    rp = dict(rp) if rp else None
    theta = (rp or {}).pop('rope_theta', None) or cfg.get('rope_theta') or \
        (cfg.get('rope_parameters') or {}).get('rope_theta') or 10000.0
    if not _is_number(theta):
        raise UserError(f"{where}: rope_theta={theta!r} must be a finite positive number")
    if rp and rope_type(rp) in NEEDS_ORIG and cfg.get('original_max_position_embeddings'):
        rp['original_max_position_embeddings'] = cfg['original_max_position_embeddings']
    return rp, float(theta)


def original_window(rs, mpe):
    """The window a checkpoint was pretrained with, from its rope dict and max_position_embeddings:
    a Llama-3 / YaRN style scaling names it original_max_position_embeddings; a linear one (e.g. our
    own export: mpe = L_t, factor = L_t / L_c) covers mpe / factor; else it is mpe."""
    rs = rs or {}
    if rs.get('original_max_position_embeddings'):
        return rs['original_max_position_embeddings']
    if rope_type(rs) == 'linear':
        return round(mpe / rs['factor'])
    return mpe


def rescale(requested, base_rs, base_mpe, target_len=None, where='config.json'):
    """A new scaling on top of a checkpoint (its rope dict as written, checked here, and its
    max_position_embeddings): it replaces, not composes with, the checkpoint's own, and every HF
    factor is relative to the checkpoint's original window. Without a 'factor': target_len / that
    window (train.py's default). -> the requested dict completed, for ModelArgs to normalize with
    max_position_embeddings = target_len (or base_mpe). `where` names the checkpoint's config."""
    if base_rs:
        check(base_rs, where)
    if not isinstance(requested, dict) or not requested:
        return requested  # None: plain RoPE; anything else: ModelArgs names it
    orig, rs = original_window(base_rs, base_mpe), dict(requested)
    if rs.get('factor') is None and target_len is not None:
        if target_len < orig:
            raise UserError(f"target_len={target_len} is below the model's original window {orig}: "
                            f"rope_scaling would get factor {target_len / orig:.3g} < 1")
        rs['factor'] = target_len / orig  # linear: position m is trained as m / factor
    if rope_type(rs) in NEEDS_ORIG:  # HF would otherwise take max_position_embeddings
        rs.setdefault('original_max_position_embeddings', orig)
    return rs


# -----------------------------------------------------------------------------
# the export form: one config that every reader computes the same RoPE from
# (tested: tests/test_export_compat.py)
EXPORTED_AS = {  # our types that no reader knows, and how they are written
    'ntk': 'no rope_scaling, rope_theta = base x alpha^(d/(d-2))',
    'yarn': "'longrope' with per-dimension factors (short = long) + attention_factor: a 'yarn' "
            "config with original_max_position_embeddings reads wrong in transformers 4.45",
    'yarn_pose': "'longrope' with per-dimension factors (short = long) + attention_factor"}


def export(rs, d, theta, mpe):
    """Our normalized rope dict -> (config.json rope_scaling, rope_theta).
    ntk: a plain rope_theta. yarn and yarn_pose: `longrope` with per-dimension factors (short =
    long), since transformers 4.45 reads a yarn config's original window from
    max_position_embeddings and ignores mscale / truncate, while 5.x reads
    original_max_position_embeddings. longrope (so these too): the attention factor written out, as
    attention_factor (transformers) and short_mscale / long_mscale (vLLM, which ignores
    attention_factor). Both `rope_type` and `type` (transformers < 4.42 reads only `type`)."""
    if not rs:
        return None, theta
    t = rs['rope_type']
    if t == 'ntk':
        return None, ntk_theta(rs, d, theta)
    if t in ('yarn', 'yarn_pose'):
        if t == 'yarn':
            (s, attn), div = yarn_factor_attention(rs, mpe), yarn_divisors(rs, d, theta, mpe)
        else:
            s, attn = rs['factor'], yarn_pose_attention_factor(rs)
            div = yarn_pose_divisors(rs, d, theta)
        rs = {'rope_type': 'longrope', 'short_factor': div.tolist(), 'long_factor': div.tolist(),
              'factor': float(s), 'attention_factor': float(attn),
              'original_max_position_embeddings': rs['original_max_position_embeddings']}
    if rs['rope_type'] == 'longrope':
        a = float(longrope_attention_factor(rs, mpe))
        rs = dict(rs, attention_factor=a, short_mscale=a, long_mscale=a)
    return dict(rs, type=rs['rope_type']), theta


def export_notes(rs, cfg):
    """The export log of our rope dict `rs` written as config.json `cfg`: how it was written (when
    not as itself), then export_lint's findings."""
    t = (rs or {}).get('rope_type')
    how = [f"rope_type {t!r} written as {EXPORTED_AS[t]}"] if t in EXPORTED_AS else []
    return how + export_lint(cfg)


# -----------------------------------------------------------------------------
# the readers' lint. Read from their source: transformers 4.45.2 and 5.x modeling_rope_utils.py
# (tested against both: tests/test_export_compat.py), vLLM's rotary_embedding get_rope +
# max_model_len derivation (reasoned only). rope_scaling keys each transformers line knows (its
# _validate_* functions; it warns about any other key and does not read it), and the keys vLLM's
# get_rope passes on
_LONGROPE_KEYS = {'short_factor', 'long_factor', 'factor', 'attention_factor',
                  'original_max_position_embeddings'}
_LLAMA3_KEYS = {'factor', 'original_max_position_embeddings', 'low_freq_factor', 'high_freq_factor'}
KEYS_READ = {
    'transformers 4.45': {
        'linear': {'factor'}, 'dynamic': {'factor', 'original_max_position_embeddings'},
        'yarn': {'factor', 'attention_factor', 'beta_fast', 'beta_slow'},
        'llama3': _LLAMA3_KEYS, 'longrope': _LONGROPE_KEYS},
    'transformers 5': {
        'linear': {'factor'}, 'dynamic': {'factor'},
        'yarn': {'factor', 'attention_factor', 'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim',
                 'truncate', 'original_max_position_embeddings'},
        'llama3': _LLAMA3_KEYS, 'longrope': _LONGROPE_KEYS},
    'vLLM': {
        'linear': {'factor'}, 'dynamic': {'factor', 'alpha'},
        'yarn': {'factor', 'original_max_position_embeddings', 'extrapolation_factor',
                 'attn_factor', 'beta_fast', 'beta_slow', 'apply_yarn_scaling', 'truncate'},
        'llama3': _LLAMA3_KEYS,
        'longrope': {'short_factor', 'long_factor', 'original_max_position_embeddings',
                     'short_mscale', 'long_mscale'}},
}


def _mirrored(rs, key):
    # an unread key whose value another reader takes from a key of its own: harmless
    a = rs.get('attention_factor')
    if key in ('attention_factor', 'short_mscale', 'long_mscale'):
        return a is not None and rs.get('short_mscale') == rs.get('long_mscale') == a
    # a longrope factor beside an explicit attention_factor is a label only
    return key == 'factor' and rs.get('rope_type') == 'longrope' and a is not None


def _window_notes(t, rs, mpe, top):
    f, orig = rs.get('factor'), rs.get('original_max_position_embeddings')
    notes = []
    if t in ('yarn', 'llama3', 'longrope') and f and orig and mpe != f * orig:
        notes.append(f"max_position_embeddings={mpe} != factor x original = {f} x {orig}: the "
                     f"context length depends on which one a reader takes (vLLM's max_model_len: "
                     f"{'original x factor' if t == 'yarn' else 'max_position_embeddings'})")
    if t == 'longrope' and rs.get('attention_factor') is None and f and top and f != mpe / top:
        notes.append(f"longrope attention factor: transformers 4.45 derives it from "
                     f"max_position_embeddings / original = {mpe / top:g}, transformers 5 from "
                     f"factor = {f:g} (vLLM: short/long_mscale, else max_position_embeddings / "
                     "original)")
    if t in ('linear', 'dynamic', 'yarn') and f:
        n, base = ((orig, 'original') if t == 'yarn' else (mpe, 'max_position_embeddings'))
        notes.append(f"vLLM: default max_model_len = {n * f:g} ({base} x factor); serve with "
                     f"--max-model-len {mpe} to stay inside max_position_embeddings")
    if t == 'dynamic' and f:
        notes.append(f"vLLM: 'dynamic' is a fixed NTK base (the one for length {mpe * f:g}) at "
                     "every length; transformers and nanoPoSE grow the base with the sequence: "
                     "vLLM's logits differ")
    return notes


def _longrope_notes(rs, mpe, top):
    orig, notes = rs.get('original_max_position_embeddings'), []
    if top != orig:
        notes.append(f"longrope original window: transformers 4.45 reads top-level "
                     f"original_max_position_embeddings={top} (absent: max_position_embeddings), "
                     f"vLLM rope_scaling's {orig}")
    if rs.get('short_factor') != rs.get('long_factor'):
        notes.append("longrope short_factor != long_factor: transformers 4.45 (and vLLM once "
                     f"max_model_len > {orig}) use long_factor at every length; transformers 5 and "
                     f"nanoPoSE use short_factor while the largest position is < {orig}: logits "
                     "inside the original window differ")
    notes.append(f"vLLM: default max_model_len for longrope is the original window {top or orig}; "
                 f"serve with --max-model-len {mpe}")
    return notes


def export_lint(cfg):
    """What transformers 4.45, transformers 5 and vLLM read differently in an HF config.json (a
    dict): one line per finding, none when they agree. Reasoned from their source."""
    rs, mpe = cfg.get('rope_scaling'), cfg['max_position_embeddings']
    if not rs:
        return []
    t, notes = rope_type(rs), []
    if rs.get('rope_type') != rs.get('type'):
        notes.append(f"rope_scaling rope_type={rs.get('rope_type')!r} type={rs.get('type')!r}: "
                     "transformers < 4.42 reads only `type`, vLLM refuses two different values")
    for reader, known in KEYS_READ.items():
        unread = sorted(k for k in set(rs) - known.get(t, set()) - {'type', 'rope_type'}
                        if not _mirrored(rs, k))
        if unread:
            notes.append(f"{reader} does not read rope_scaling keys {unread} for {t!r}")
    top = cfg.get('original_max_position_embeddings')
    notes += _window_notes(t, rs, mpe, top)
    if t == 'longrope':
        notes += _longrope_notes(rs, mpe, top)
    return notes
