"""
Hugging Face checkpoint directories <-> our model (model.py): config.json <-> ModelArgs, weights in
safetensors (one file or sharded with an index) or pytorch_model*.bin, and the export back to a
directory that transformers (4.45 and 5) and vLLM load to the same logits (tested:
tests/test_model*.py, tests/test_export_compat.py). The model file stays the model: it never reads
or writes a directory, and does not remember where it was loaded from -- whoever exports names the
tokenizer to copy.

    model = load_pretrained('checkpoints/llama-7b', dtype=torch.bfloat16, rope_scaling={...})
    save_pretrained(model, 'out/hf', tokenizer_dir='checkpoints/llama-7b')
"""
import json
import numbers
import os
import shutil
import warnings
from dataclasses import fields

import torch

import rope
from errors import UserError, read_json
from model import ARCH_NAMES, ModelArgs, Transformer, is_size
# the tokenizer's files, copied beside an export: defined beside the tokenizer loader, which must
# not need torch
from tokenizer import TOKENIZER_FILES

MAX_SHARD_SIZE = 5 * 1024**3  # bytes per safetensors shard written by save_pretrained
ARCHS = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral', 'Qwen2ForCausalLM': 'qwen2'}
assert set(ARCHS.values()) == set(ARCH_NAMES)


# -----------------------------------------------------------------------------
# config.json <-> ModelArgs

def args_from_hf_config(cfg, where='config.json', **overrides):
    """ModelArgs of an HF config.json dict (+ `overrides`, ModelArgs fields); errors name `where`
    (the file) and the key. A rope_scaling override replaces the checkpoint's own (rope.rescale)."""
    archs = cfg.get('architectures') or []
    name = archs[0] if archs else cfg.get('model_type')
    arch = ARCHS.get(name) or {'LLaMAForCausalLM': 'llama', 'llama': 'llama', 'mistral': 'mistral',
                               # very old Llama configs / no architectures
                               'qwen2': 'qwen2'}.get(name)
    if arch is None:
        raise UserError(f"{where}: unsupported architecture {name!r} "
                        f"(supported: {', '.join(ARCHS)})")
    for key, ok in (('hidden_act', 'silu'), ('mlp_bias', False), ('attention_bias', False),
                    ('use_sliding_window', False), ('partial_rotary_factor', 1.0)):
        if cfg.get(key, ok) not in (ok, None):
            raise UserError(f"{where}: config key {key}={cfg[key]!r} is not supported "
                            f"(only {ok!r})")
    sizes = ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
             'vocab_size')
    optional = {'max_position_embeddings': 2048, 'num_key_value_heads': None, 'head_dim': None}
    bad = [k for k in sizes if not is_size(cfg.get(k))] + \
        [k for k, v in optional.items() if cfg.get(k, v) is not None and not is_size(cfg[k])]
    if bad:
        raise UserError(f"{where}: {bad[0]}={cfg.get(bad[0])!r}: expected a positive integer")
    eps = cfg.get('rms_norm_eps', 1e-6)
    if not (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and 0 < eps < 1):
        raise UserError(f"{where}: rms_norm_eps={eps!r}: expected a number in (0, 1)")
    if not isinstance(cfg.get('tie_word_embeddings', False), bool):
        raise UserError(f"{where}: tie_word_embeddings={cfg['tie_word_embeddings']!r}: "
                        "expected a bool")
    rs, theta = rope.from_hf_config(cfg, where)
    mpe = cfg.get('max_position_embeddings', 2048)
    known = {f.name for f in fields(ModelArgs)}
    for k in overrides:
        if k not in known:
            raise UserError(f"unknown model override {k!r} "
                            f"(ModelArgs fields: {', '.join(sorted(known))})")
    rope_where = where
    if 'rope_scaling' in overrides:
        # a new scaling replaces the checkpoint's own, relative to its original window; no factor:
        # the new max_position_embeddings / that window
        rs = rope.rescale(overrides.pop('rope_scaling'), rs, mpe,
                          overrides.get('max_position_embeddings'), where)
        rope_where = 'rope_scaling'
    a = dict(
        dim=cfg['hidden_size'], n_layers=cfg['num_hidden_layers'],
        n_heads=cfg['num_attention_heads'],
        n_kv_heads=cfg.get('num_key_value_heads'), head_dim=cfg.get('head_dim'),
        hidden_dim=cfg['intermediate_size'], vocab_size=cfg['vocab_size'],
        norm_eps=cfg.get('rms_norm_eps', 1e-6), rope_theta=theta, max_position_embeddings=mpe,
        qkv_bias=arch == 'qwen2', tie_word_embeddings=cfg.get('tie_word_embeddings', False),
        arch=arch,
        bos_token_id=cfg.get('bos_token_id'), eos_token_id=cfg.get('eos_token_id'),
        sliding_window=cfg.get('sliding_window') if arch == 'mistral' else None)
    return ModelArgs(**(a | overrides), rope_scaling=rs, where=rope_where)


def hf_config(args):
    """ModelArgs -> the config.json that transformers 4.45+, 5 and vLLM read: `rope_scaling` (from
    rope.export) + top-level `rope_theta`."""
    rs, theta = rope.export(args.rope_scaling, args.head_dim, args.rope_theta,
                            args.max_position_embeddings)
    hf = {'architectures': [k for k in ARCHS if ARCHS[k] == args.arch], 'model_type': args.arch,
          'hidden_size': args.dim, 'intermediate_size': args.hidden_dim,
          'num_hidden_layers': args.n_layers, 'num_attention_heads': args.n_heads,
          'num_key_value_heads': args.n_kv_heads, 'head_dim': args.head_dim,
          'vocab_size': args.vocab_size, 'rms_norm_eps': args.norm_eps, 'hidden_act': 'silu',
          'max_position_embeddings': args.max_position_embeddings, 'rope_theta': float(theta),
          'rope_scaling': rs,
          'tie_word_embeddings': args.tie_word_embeddings,
          'bos_token_id': args.bos_token_id, 'eos_token_id': args.eos_token_id,
          'initializer_range': 0.02, 'attention_dropout': 0.0, 'use_cache': True}
    # transformers 4.4x reads it here (5.x: same value wins)
    if rs and rs['rope_type'] == 'longrope':
        hf['original_max_position_embeddings'] = rs['original_max_position_embeddings']
    if args.arch == 'llama':
        hf.update(attention_bias=False, mlp_bias=False)
    elif args.arch == 'mistral':
        hf.update(sliding_window=args.sliding_window)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_layers)
    return hf


# -----------------------------------------------------------------------------
# load / save

def load_pretrained(path, dtype=torch.float32, device='cpu', **overrides):
    """HF directory -> model in `dtype` on `device`. Built on the meta device, each tensor is read,
    converted and assigned one at a time, so a 7B model never exists twice in memory.
    overrides: ModelArgs fields (e.g. rope_scaling=..., max_position_embeddings=...)."""
    cfg_path = os.path.join(path, 'config.json')
    if not os.path.isfile(cfg_path):
        raise UserError(f"{cfg_path}: no config.json (not a Hugging Face model directory)")
    args = args_from_hf_config(read_json(cfg_path), cfg_path, **overrides)
    with torch.device('meta'):
        model = Transformer(args)
    expected = {k: v for k, v in model.state_dict().items()
                if not (args.tie_word_embeddings and k == 'lm_head.weight')}
    seen = set()
    for file in _weight_files(path):
        for hf_name, read in _tensor_readers(file):
            name = hf_name[len('model.'):] if hf_name.startswith('model.') else hf_name
            # derived (old checkpoints store it) / tied to embed_tokens
            if name.endswith('rotary_emb.inv_freq') \
                    or (args.tie_word_embeddings and name == 'lm_head.weight'):
                continue
            if name not in expected:
                raise UserError(f"{file}: unexpected tensor {hf_name!r} for a {args.arch} model "
                                "with this config")
            t = read()
            if tuple(t.shape) != tuple(expected[name].shape):
                raise UserError(f"{file}: tensor {hf_name!r} has shape {tuple(t.shape)}, "
                                 f"config.json implies {tuple(expected[name].shape)}")
            model.load_state_dict({name: t.to(device=device, dtype=dtype)}, strict=False,
                                  assign=True)
            seen.add(name)
    missing = [k for k in expected if k not in seen]
    if missing:
        names = ['model.' + k if k != 'lm_head.weight' else k for k in missing[:8]]
        raise UserError(f"{path}: checkpoint is missing tensors: " + ', '.join(names)
                        + (f' (+{len(missing) - 8} more)' if len(missing) > 8 else ''))
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def save_pretrained(model, path, tokenizer_dir, state_dict=None, max_shard_size=MAX_SHARD_SIZE):
    """Write `model` as an HF directory (config.json, safetensors sharded beyond max_shard_size with
    an index, tokenizer files) to a temp dir, then rename it into place. tokenizer_dir: where the
    tokenizer comes from (an HF directory, one file, a list of files, or None: no tokenizer files);
    the caller names it, the model does not know where it was loaded from. state_dict: our-named
    full tensors (e.g. gathered from FSDP on rank 0, `model` then only gives .args and the names);
    default: the model's own."""
    from safetensors.torch import save_file
    tied = model.args.tie_word_embeddings
    own = {k for k in model.state_dict() if not (tied and k == 'lm_head.weight')}
    sd = model.state_dict() if state_dict is None else state_dict
    # keys as wrapped blocks may name them (torch.compile / checkpoint_wrapper prefixes)
    sd = {k.replace('_orig_mod.', '').replace('_checkpoint_wrapped_module.', ''): v
          for k, v in sd.items()}
    # tied: lm_head is embed_tokens
    sd = {k: v for k, v in sd.items() if k in own or k != 'lm_head.weight'}
    if set(sd) != own:
        raise ValueError(f"save_pretrained: state_dict does not match the model: "
                         f"missing {sorted(own - set(sd))[:5]}, "
                         f"unexpected {sorted(set(sd) - own)[:5]}")
    tensors = {('model.' + k if k != 'lm_head.weight' else k): v.detach().to('cpu').contiguous()
               for k, v in sd.items()}
    path = os.path.abspath(path)
    tmp, old = path + '.tmp', path + '.old'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards, size = [[]], 0  # greedy: start a new shard when this one would pass max_shard_size
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += t.nbytes
    fnames = ['model.safetensors'] if len(shards) == 1 else \
        [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
    for fname, names in zip(fnames, shards):
        save_file({n: tensors[n] for n in names}, os.path.join(tmp, fname),
                  metadata={'format': 'pt'})
    if len(shards) > 1:
        index = {'metadata': {'total_size': sum(t.nbytes for t in tensors.values())},
                 'weight_map': {n: f for f, names in zip(fnames, shards) for n in names}}
        with open(os.path.join(tmp, 'model.safetensors.index.json'), 'w') as f:
            json.dump(index, f, indent=2)
    cfg = hf_config(model.args)
    # the export log: what a reader may get wrong, and why
    for note in rope.export_notes(model.args.rope_scaling, cfg):
        print(f'export {path}: {note}', flush=True)
    dt = str(next(iter(tensors.values())).dtype).replace('torch.', '')
    cfg.update(torch_dtype=dt, dtype=dt)
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
        json.dump(cfg, f, indent=2)
    for src in _tokenizer_files(tokenizer_dir):
        shutil.copy(src, os.path.join(tmp, os.path.basename(src)))
    if os.path.exists(path):  # replace a previous export: old aside, new in, old removed
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# a directory (its known tokenizer files), one file, a list of files, or None
def _tokenizer_files(src):
    if src is None or isinstance(src, (list, tuple)):
        return list(src or [])
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise UserError(f"{src}: tokenizer directory not found")
    return [os.path.join(src, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]


def _weight_files(path):
    """The checkpoint's weight files: safetensors (single / sharded index) or pytorch_model*.bin."""
    for index in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
        ipath = os.path.join(path, index)
        if os.path.isfile(ipath):
            weight_map = read_json(ipath).get('weight_map')
            if not isinstance(weight_map, dict):
                raise UserError(f"{ipath}: no 'weight_map' (not a checkpoint index)")
            names = sorted(set(weight_map.values()))
            for n in names:
                if not os.path.isfile(os.path.join(path, n)):
                    raise UserError(f"{os.path.join(path, n)}: shard listed in {index} is missing")
            return [os.path.join(path, n) for n in names]
    for single in ('model.safetensors', 'pytorch_model.bin'):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise UserError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                    "pytorch_model*.bin")


def _tensor_readers(file):
    """yield (name, read()) per tensor, reading one tensor at a time. A truncated or corrupt file ->
    one line naming it (the libraries' own errors would be tracebacks from deep inside)."""
    if file.endswith('.safetensors'):
        from safetensors import SafetensorError, safe_open

        def get(f, name):
            try:
                return f.get_tensor(name)
            except SafetensorError as e:
                raise UserError(f"{file}: tensor {name!r} unreadable, truncated or corrupt? "
                                f"({e})") from None
        try:
            f = safe_open(file, framework='pt')
        except SafetensorError as e:
            raise UserError(f"{file}: unreadable safetensors file, truncated or corrupt? "
                            f"({e})") from None
        with f:
            for name in f.keys():
                yield name, (lambda n=name: get(f, n))
        return
    # weights_only: a .bin must not run code (so whatever it raises is about the file, not a bug of
    # ours); mmap (zip-format files): no full copy in RAM
    try:
        with warnings.catch_warnings():  # a corrupt file's odd pickle protocol
            warnings.simplefilter('ignore')
            try:
                sd = torch.load(file, map_location='cpu', weights_only=True, mmap=True)
            except RuntimeError:  # legacy (pre-zip) format cannot be memory-mapped
                sd = torch.load(file, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f"{file}: unreadable PyTorch weights file, truncated or corrupt? "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise UserError(f"{file}: not a PyTorch state dict (a dict of named tensors)")
    for name in list(sd):
        yield name, (lambda n=name: sd.pop(n))
