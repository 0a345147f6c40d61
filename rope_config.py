"""
rope_scaling, checked and resolved in one place (no torch: train.py checks it before importing torch).

It enters from four doors -- a config key (train.py / eval_*.py `rope_scaling`), a checkpoint's config.json
(`rope_scaling` or transformers 5's `rope_parameters`), a train_state.json on resume, a load_pretrained
override -- and every door goes through `normalize`: HF semantics key for key, one canonical dict
{'rope_type': ..., ...} or None, and a UserError naming the key and value for anything unusable.
model.py computes the frequencies (one function per type); the types and their keys live here.
"""
import numbers

from errors import UserError

ROPE_REQUIRED = {'linear': ('factor',), 'dynamic': ('factor',), 'yarn': (), 'yarn_pose': ('factor',),  # yarn: factor
                 'llama3': ('factor', 'low_freq_factor', 'high_freq_factor'),  # defaults to mpe / original
                 'longrope': ('short_factor', 'long_factor'), 'ntk': ()}
ROPE_TYPES = ('default',) + tuple(ROPE_REQUIRED)
ROPE_NEEDS_ORIG = ('yarn', 'llama3', 'longrope', 'yarn_pose')  # read original_max_position_embeddings
# numeric keys and their lower bounds (factor: a scaling never shrinks the window; 1 is a no-op)
NUMBERS = {'factor': 1.0, 'alpha': 0.0, 'original_max_position_embeddings': 0.0, 'low_freq_factor': 0.0,
           'high_freq_factor': 0.0, 'beta_fast': 0.0, 'beta_slow': 0.0, 'attention_factor': 0.0,
           'mscale': 0.0, 'mscale_all_dim': 0.0}


def rope_type(rs):
    """The type of an HF rope dict: `rope_type`, or `type` (transformers < 4.42); None/{} -> 'default'."""
    return (rs or {}).get('rope_type', (rs or {}).get('type', 'default'))


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check(rs, where='rope_scaling'):
    """The shape of a rope dict as the user wrote it (no checkpoint needed): a dict with a known type whose
    numeric keys are numbers in range. -> its canonical type."""
    if not isinstance(rs, dict):
        raise UserError(f"{where}={rs!r}: expected a dict such as {{'rope_type': 'linear', 'factor': 4.0}} or None")
    if 'rope_type' not in rs and 'type' not in rs:
        raise UserError(f"{where}={rs!r}: needs a 'rope_type' (or None for the model's own)")
    if any(isinstance(v, dict) for v in rs.values()):
        raise UserError(f"{where}: per-layer-type rope parameters {sorted(rs)} are not supported")
    t = rope_type(rs)
    t = 'ntk' if t == 'vanilla_ntk' else t  # the PoSE repo's name for the same thing
    if t not in ROPE_TYPES:
        raise UserError(f"{where}: unknown rope_type {t!r} (known: {', '.join(ROPE_TYPES)})")
    for k, lo in NUMBERS.items():
        v = rs.get(k)
        if v is not None and not (_is_number(v) and (v >= lo if k == 'factor' else v > lo)):
            raise UserError(f"{where}: {k}={v!r} must be a number {'>= 1' if k == 'factor' else '> 0'}")
    return t


def normalize(rs, head_dim, mpe, where='rope_scaling'):
    """HF `rope_scaling` / `rope_parameters` dict -> {'rope_type': ..., ...} or None (plain RoPE).
    `where` names the door in the error messages (a config key, a config.json path, ...)."""
    if rs is None or rs == {}:
        return None
    t = check(dict(rs, rope_type=rope_type(rs)), where)  # a bare HF dict without any type is 'default'
    if t == 'default':
        return None
    rs = {k: v for k, v in rs.items() if k not in ('type', 'rope_type', 'rope_theta')} | {'rope_type': t}
    for k in ROPE_REQUIRED[t]:
        if rs.get(k) is None:
            raise UserError(f"{where}: rope_type {t!r} needs key {k!r} (got {sorted(rs)})")
    if t == 'ntk' and rs.get('factor') is None and rs.get('alpha') is None:
        raise UserError(f"{where}: rope_type 'ntk' needs key 'factor' (or 'alpha')")
    if t == 'llama3' and rs['high_freq_factor'] <= rs['low_freq_factor']:
        raise UserError(f"{where}: llama3 needs high_freq_factor > low_freq_factor "
                        f"(got {rs['high_freq_factor']} and {rs['low_freq_factor']})")
    if t in ROPE_NEEDS_ORIG:
        rs.setdefault('original_max_position_embeddings', mpe)
    if t == 'longrope':
        for k in ('short_factor', 'long_factor'):
            v = rs[k]
            if not isinstance(v, (list, tuple)) or len(v) != head_dim // 2 or not all(_is_number(x) and x > 0 for x in v):
                raise UserError(f"{where}: {k} must be {head_dim // 2} (head_dim // 2) positive numbers, "
                                f"got {len(v) if isinstance(v, (list, tuple)) else type(v).__name__}")
    return rs


def from_hf_config(cfg, where='config.json'):
    """(rope_scaling dict or None, rope_theta) of an HF config.json dict: the older `rope_scaling` + top-level
    rope_theta, or transformers 5's `rope_parameters` (rope_theta inside); given both, transformers 5 uses
    rope_scaling, and so do we. A top-level original_max_position_embeddings (Phi-3 style) wins, as in transformers."""
    rp = cfg.get('rope_scaling') or cfg.get('rope_parameters')
    if rp is not None and not isinstance(rp, dict):
        raise UserError(f"{where}: rope_scaling={rp!r}: expected a dict with a 'rope_type' (or null)")
    rp = dict(rp) if rp else None
    theta = (rp or {}).pop('rope_theta', None) or cfg.get('rope_theta') or \
        (cfg.get('rope_parameters') or {}).get('rope_theta') or 10000.0
    if not _is_number(theta) or theta <= 0:
        raise UserError(f"{where}: rope_theta={theta!r} must be a positive number")
    mpe = cfg.get('max_position_embeddings', 2048)
    if rp and rope_type(rp) in ROPE_NEEDS_ORIG and cfg.get('original_max_position_embeddings'):
        rp['original_max_position_embeddings'] = cfg['original_max_position_embeddings']
    head_dim = cfg.get('head_dim') or cfg['hidden_size'] // cfg['num_attention_heads']
    return normalize(rp, head_dim, mpe, where), float(theta)


def original_window(rs, mpe):
    """The window a checkpoint was pretrained with, from its (normalized) rope_scaling and
    max_position_embeddings: a Llama-3 / YaRN style scaling names it original_max_position_embeddings; a
    linear one (e.g. our own export: mpe = L_t, factor = L_t / L_c) covers mpe / factor; else it is mpe."""
    rs = rs or {}
    if rs.get('original_max_position_embeddings'):
        return rs['original_max_position_embeddings']
    if rope_type(rs) == 'linear':
        return round(mpe / rs['factor'])
    return mpe


def rescale(requested, base_rs, base_mpe, head_dim, target_len=None, where='rope_scaling'):
    """A new scaling on top of a checkpoint (its normalized rope_scaling and max_position_embeddings): it
    replaces, not composes with, the checkpoint's own, and every HF factor is relative to the checkpoint's
    original window. Without a 'factor': target_len / that window (train.py's default).
    -> the normalized dict for max_position_embeddings = target_len (or base_mpe)."""
    if requested is None or requested == {}:
        return None
    check(requested, where)
    orig, rs = original_window(base_rs, base_mpe), dict(requested)
    if rs.get('factor') is None and target_len is not None:
        if target_len < orig:
            raise UserError(f"target_len={target_len} is below the model's original window {orig}: "
                            f"{where} would get factor {target_len / orig:.3g} < 1")
        rs['factor'] = target_len / orig  # linear: position m is trained as m / factor
    if rope_type(rs) in ROPE_NEEDS_ORIG:
        rs.setdefault('original_max_position_embeddings', orig)  # HF would otherwise take max_position_embeddings
    return normalize(rs, head_dim, target_len or base_mpe, where)


# ---- export lint ------------------------------------------------------------------------------------
# Read from their source: transformers 4.45.2 and 5.x modeling_rope_utils.py (tested against both:
# tests/test_export_compat.py), vLLM's rotary_embedding get_rope + max_model_len derivation (reasoned only).
# rope_scaling keys each transformers line knows (its _validate_* functions; it warns about any other key
# and does not read it), and the keys vLLM's get_rope passes on for each type
ROPE_KEYS_READ = {
    'transformers 4.45': {'linear': {'factor'}, 'dynamic': {'factor', 'original_max_position_embeddings'},
                          'yarn': {'factor', 'attention_factor', 'beta_fast', 'beta_slow'},
                          'llama3': {'factor', 'original_max_position_embeddings', 'low_freq_factor', 'high_freq_factor'},
                          'longrope': {'short_factor', 'long_factor', 'factor', 'attention_factor',
                                       'original_max_position_embeddings'}},
    'transformers 5': {'linear': {'factor'}, 'dynamic': {'factor'},
                       'yarn': {'factor', 'attention_factor', 'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim',
                                'truncate', 'original_max_position_embeddings'},
                       'llama3': {'factor', 'original_max_position_embeddings', 'low_freq_factor', 'high_freq_factor'},
                       'longrope': {'short_factor', 'long_factor', 'factor', 'attention_factor',
                                    'original_max_position_embeddings'}},
    'vLLM': {'linear': {'factor'}, 'dynamic': {'factor', 'alpha'},
             'yarn': {'factor', 'original_max_position_embeddings', 'extrapolation_factor', 'attn_factor',
                      'beta_fast', 'beta_slow', 'apply_yarn_scaling', 'truncate'},
             'llama3': {'factor', 'original_max_position_embeddings', 'low_freq_factor', 'high_freq_factor'},
             'longrope': {'short_factor', 'long_factor', 'original_max_position_embeddings', 'short_mscale',
                          'long_mscale'}},
}


def _mirrored(rs, key):
    # an unread key whose value another reader takes from a key of its own: harmless
    a = rs.get('attention_factor')
    if key in ('attention_factor', 'short_mscale', 'long_mscale'):
        return a is not None and rs.get('short_mscale') == rs.get('long_mscale') == a
    return key == 'factor' and rs.get('rope_type') == 'longrope' and a is not None  # then a label only


def export_lint(cfg):
    """What transformers 4.45, transformers 5 and vLLM read differently in an HF config.json (a dict):
    one line per finding, none when they agree. Reasoned from their source; README has the table."""
    rs, mpe = cfg.get('rope_scaling'), cfg['max_position_embeddings']
    if not rs:
        return []
    t, notes = rope_type(rs), []
    if rs.get('rope_type') != rs.get('type'):
        notes.append(f"rope_scaling rope_type={rs.get('rope_type')!r} type={rs.get('type')!r}: transformers "
                     "< 4.42 reads only `type`, vLLM refuses two different values")
    for reader, known in ROPE_KEYS_READ.items():
        unread = sorted(k for k in set(rs) - known.get(t, set()) - {'type', 'rope_type'} if not _mirrored(rs, k))
        if unread:
            notes.append(f"{reader} does not read rope_scaling keys {unread} for {t!r}")
    f, orig, top = rs.get('factor'), rs.get('original_max_position_embeddings'), cfg.get('original_max_position_embeddings')
    if t in ('yarn', 'llama3', 'longrope') and f and orig and mpe != f * orig:
        notes.append(f"max_position_embeddings={mpe} != factor x original = {f} x {orig}: the context length "
                     f"depends on which one a reader takes (vLLM's max_model_len: "
                     f"{'original x factor' if t == 'yarn' else 'max_position_embeddings'})")
    if t == 'longrope' and rs.get('attention_factor') is None and f and top and f != mpe / top:
        notes.append(f"longrope attention factor: transformers 4.45 derives it from max_position_embeddings / "
                     f"original = {mpe / top:g}, transformers 5 from factor = {f:g} (vLLM: short/long_mscale, "
                     "else max_position_embeddings / original)")
    if t in ('linear', 'dynamic', 'yarn') and f:
        n = (orig if t == 'yarn' else mpe) * f
        notes.append(f"vLLM: default max_model_len = {n:g} ({'original' if t == 'yarn' else 'max_position_embeddings'}"
                     f" x factor); serve with --max-model-len {mpe} to stay inside max_position_embeddings")
    if t == 'dynamic' and f:
        notes.append(f"vLLM: 'dynamic' is a fixed NTK base (the one for length {mpe * f:g}) at every length; "
                     "transformers and nanoPoSE grow the base with the sequence: vLLM's logits differ")
    if t == 'longrope':
        if top != orig:
            notes.append(f"longrope original window: transformers 4.45 reads top-level original_max_position_"
                         f"embeddings={top} (absent: max_position_embeddings), vLLM rope_scaling's {orig}")
        if rs.get('short_factor') != rs.get('long_factor'):
            notes.append("longrope short_factor != long_factor: transformers 4.45 (and vLLM once max_model_len > "
                         f"{orig}) use long_factor at every length; transformers 5 and nanoPoSE use short_factor "
                         f"while the largest position is < {orig}: logits inside the original window differ")
        notes.append(f"vLLM: default max_model_len for longrope is the original window {top or orig}; serve with "
                     f"--max-model-len {mpe}")
    return notes
