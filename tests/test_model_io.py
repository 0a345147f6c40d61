"""Checkpoint I/O: sharded safetensors, pytorch_model*.bin, overrides, tokenizer files, atomic
export, and bad inputs that must end in one clear error naming the file / tensor / key."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from errors import UserError  # noqa: E402
from hf_checkpoint import load_pretrained, save_pretrained
from model import Transformer
from conftest import ROPE_CASES, TOL, make_hf, max_logit_diff, positions


def assert_parity(hf, model, kinds=('skip',)):
    for kind in kinds:
        pos = positions(kind)
        assert max_logit_diff(hf, model, pos) < TOL


def test_sharded_safetensors_roundtrip(tmp_path):
    hf, d = make_hf(tmp_path, tie=True)
    model = load_pretrained(d)
    # forces several shards
    save_pretrained(model, tmp_path / 'sharded', tokenizer_dir=None, max_shard_size=20_000)
    files = sorted(os.listdir(tmp_path / 'sharded'))
    shards = [f for f in files if f.endswith('.safetensors')]
    assert len(shards) > 2 and 'model.safetensors.index.json' in files \
        and 'model.safetensors' not in files
    index = json.load(open(tmp_path / 'sharded' / 'model.safetensors.index.json'))
    assert set(index['weight_map'].values()) == set(shards) \
        and 'lm_head.weight' not in index['weight_map']
    assert not any(f.endswith(('.tmp', '.old')) for f in os.listdir(tmp_path))
    assert_parity(hf, load_pretrained(tmp_path / 'sharded'))
    assert_parity(AutoModelForCausalLM.from_pretrained(tmp_path / 'sharded').eval(), model)


def test_pytorch_bin_single_and_sharded(tmp_path):
    hf, d = make_hf(tmp_path, arch='qwen2')
    sd = hf.state_dict()
    single, sharded = tmp_path / 'bin1', tmp_path / 'bin2'
    for out in (single, sharded):
        os.makedirs(out)
        shutil.copy(os.path.join(d, 'config.json'), out)
    # old checkpoints had it
    sd_old = dict(sd, **{'model.layers.0.self_attn.rotary_emb.inv_freq': torch.ones(8)})
    torch.save(sd_old, single / 'pytorch_model.bin')
    names = list(sd)
    parts = {'pytorch_model-00001-of-00002.bin': names[:10],
             'pytorch_model-00002-of-00002.bin': names[10:]}
    for fname, keys in parts.items():
        torch.save({k: sd[k] for k in keys}, sharded / fname)
    json.dump({'weight_map': {k: f for f, keys in parts.items() for k in keys}},
              open(sharded / 'pytorch_model.bin.index.json', 'w'))
    assert_parity(hf, load_pretrained(single))
    assert_parity(hf, load_pretrained(sharded))


def test_rope_override_on_checkpoint(tmp_path):
    """Overriding rope_scaling + max_position_embeddings on a plain checkpoint == transformers with
    that config; original_max_position_embeddings defaults to the checkpoint's own window (32)."""
    _, d = make_hf(tmp_path)
    model = load_pretrained(d, rope_scaling={'rope_type': 'yarn', 'factor': 4.0},
                                        max_position_embeddings=128)
    assert model.args.rope_scaling['original_max_position_embeddings'] == 32
    ref_dir = tmp_path / 'ref'
    shutil.copytree(d, ref_dir)
    cfg = json.load(open(ref_dir / 'config.json'))
    cfg['rope_parameters'] = dict(ROPE_CASES['yarn'][0], rope_theta=10000.0)
    cfg['max_position_embeddings'] = 128
    json.dump(cfg, open(ref_dir / 'config.json', 'w'))
    assert_parity(AutoModelForCausalLM.from_pretrained(ref_dir).eval(), model,
                  kinds=('contig', 'skip'))
    save_pretrained(model, tmp_path / 'ours', tokenizer_dir=None)
    out = json.load(open(tmp_path / 'ours' / 'config.json'))
    assert out['max_position_embeddings'] == 128 \
        and out['rope_scaling']['original_max_position_embeddings'] == 32


def test_tokenizer_files_and_overwrite(tmp_path):
    _, d = make_hf(tmp_path)
    for name in ('tokenizer.model', 'tokenizer_config.json', 'generation_config.json'):
        open(os.path.join(d, name), 'w').write(name)
    model = load_pretrained(d)
    out = tmp_path / 'out'
    # the model does not remember its folder: no tokenizer
    save_pretrained(model, out, tokenizer_dir=None)
    assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
    save_pretrained(model, out, tokenizer_dir=d)  # the caller names it: the model's own directory
    assert open(out / 'tokenizer.model').read() == 'tokenizer.model' \
        and (out / 'tokenizer_config.json').exists()
    # its eos ids for generate()
    assert open(out / 'generation_config.json').read() == 'generation_config.json'
    tok = tmp_path / 'tok'
    os.makedirs(tok)
    open(tok / 'tokenizer.json', 'w').write('{}')
    save_pretrained(model, out, tokenizer_dir=str(tok))  # overwrites the previous export as a whole
    assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors', 'tokenizer.json']
    assert sorted(os.listdir(tmp_path)) == sorted(['hf_llama', 'out', 'tok'])  # no temp dirs left


# ---- bad inputs
# ---------------------------------------------------------------------------------------
def edit_weights(d, fn):
    p = os.path.join(d, 'model.safetensors')
    sd = load_file(p)
    fn(sd)
    save_file(sd, p, metadata={'format': 'pt'})


def edit_config(d, fn):
    p = os.path.join(d, 'config.json')
    cfg = json.load(open(p))
    fn(cfg)
    json.dump(cfg, open(p, 'w'))


def test_bad_inputs(tmp_path):
    _, d = make_hf(tmp_path)
    bad = lambda name: shutil.copytree(d, tmp_path / name) and str(tmp_path / name)

    with pytest.raises(UserError, match='config.json'):
        load_pretrained(tmp_path / 'nowhere')
    p = bad('gpt2')
    edit_config(p, lambda c: c.update(architectures=['GPT2LMHeadModel'], model_type='gpt2'))
    with pytest.raises(ValueError, match='GPT2LMHeadModel'):
        load_pretrained(p)
    p = bad('missing')
    edit_weights(p, lambda sd: sd.pop('model.layers.1.mlp.up_proj.weight'))
    with pytest.raises(ValueError, match=r'missing.*model\.layers\.1\.mlp\.up_proj\.weight'):
        load_pretrained(p)
    p = bad('extra')
    edit_weights(p,
                 lambda sd: sd.update({'model.layers.0.self_attn.q_norm.weight': torch.ones(16)}))
    with pytest.raises(ValueError,
                       match=r'unexpected.*model\.layers\.0\.self_attn\.q_norm\.weight'):
        load_pretrained(p)
    p = bad('shape')
    edit_weights(p, lambda sd: sd.update({'model.norm.weight': torch.ones(63)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(63,\).*\(64,\)"):
        load_pretrained(p)
    p = bad('rope')
    edit_config(p, lambda c: c.update(rope_parameters={'rope_type': 'su-perb', 'factor': 2.0}))
    with pytest.raises(ValueError, match='su-perb'):
        load_pretrained(p)
    with pytest.raises(ValueError, match="'linear' needs key 'factor'"):
        load_pretrained(d, rope_scaling={'rope_type': 'linear', 'factr': 2.0})
    with pytest.raises(ValueError, match="short_factor"):
        load_pretrained(d, rope_scaling={'rope_type': 'longrope', 'short_factor': [1.0] * 3,
                                                     'long_factor': [1.0] * 8})
    with pytest.raises(ValueError, match='max_seq_len'):
        load_pretrained(d, max_seq_len=4096)
    p = bad('noweights')
    os.remove(os.path.join(p, 'model.safetensors'))
    with pytest.raises(UserError, match='model.safetensors'):
        load_pretrained(p)
    p = bad('act')
    edit_config(p, lambda c: c.update(hidden_act='gelu'))
    with pytest.raises(UserError, match='hidden_act'):
        load_pretrained(p)
    # every user error above is a UserError (one line, exit 2 in the scripts), naming the file
    p = bad('truncated')
    w = os.path.join(p, 'model.safetensors')
    open(w, 'r+b').truncate(os.path.getsize(w) // 2)
    with pytest.raises(UserError, match=f'{w}: unreadable safetensors'):
        load_pretrained(p)
    p = bad('badjson')
    with open(os.path.join(p, 'config.json'), 'a') as f:
        f.write('}')
    with pytest.raises(UserError, match=f"{os.path.join(p, 'config.json')}: invalid JSON"):
        load_pretrained(p)
    for rope, needle in [({'rope_type': 'linear', 'factor': -4.0},
                          'factor=-4.0 must be a number >= 1'),
                         ({'rope_type': 'linear', 'factor': 0.5}, 'factor=0.5'),
                         ({'rope_type': 'linear', 'factor': '4'}, "factor='4'"),
                         ('linear', "rope_scaling='linear': expected a dict")]:
        p = bad(f'rope{len(os.listdir(tmp_path))}')
        edit_config(p, lambda c: c.update(rope_scaling=rope, rope_parameters=None))
        with pytest.raises(UserError, match=f"{os.path.join(p, 'config.json')}: {needle}"):
            load_pretrained(p)
        if isinstance(rope, dict):  # the same as an override (the evals' rope_scaling key)
            with pytest.raises(UserError, match=f"rope_scaling: {needle}"):
                load_pretrained(d, rope_scaling=rope)


def test_save_given_state_dict_from_meta_model(tmp_path):
    """train.py's export: a meta-device model (only .args) writes a gathered state dict, whose keys
    may carry torch.compile / checkpoint_wrapper prefixes; a state dict that does not fit is
    refused."""
    hf, d = make_hf(tmp_path, tie=True)
    model = load_pretrained(d)
    sd = {k.replace('layers.0.', 'layers.0._orig_mod.'): v.clone()
          for k, v in model.state_dict().items()}
    with torch.device('meta'):
        export = Transformer(model.args)
    save_pretrained(export, tmp_path / 'out', tokenizer_dir=None, state_dict=sd)
    assert_parity(AutoModelForCausalLM.from_pretrained(tmp_path / 'out').eval(), model)
    sd.pop('norm.weight')
    with pytest.raises(ValueError, match='norm.weight'):
        save_pretrained(export, tmp_path / 'out2', tokenizer_dir=None, state_dict=sd)
    assert not os.path.exists(tmp_path / 'out2')
