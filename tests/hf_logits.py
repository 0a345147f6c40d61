"""The reference side of test_export_compat.py: logits of HF checkpoints under whichever
transformers this interpreter has. Imported there for transformers 5.x; run as a script by
.venv-hf445's python (4.45.2):
    python tests/hf_logits.py jobs.pt out.pt
jobs.pt: {name: (model_dir, idx [B, T], position_ids [B, T])}; out.pt: {'version': ..., 'logits':
{name: [B, T, V]}} Only torch and transformers are imported here, so the same file runs in either
environment."""
import copy
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def hf_logits(jobs):
    out, loaded = {}, {}
    for name, (model_dir, idx, pos) in jobs.items():
        if model_dir not in loaded:
            loaded[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
        # a fresh copy per job: transformers' dynamic RoPE keeps the largest length it has seen
        model = copy.deepcopy(loaded[model_dir])
        with torch.no_grad():
            out[name] = model(idx, position_ids=pos).logits.float()
    return out


if __name__ == '__main__':
    jobs_path, out_path = sys.argv[1:3]
    result = {'version': transformers.__version__, 'logits': hf_logits(torch.load(jobs_path))}
    torch.save(result, out_path + '.tmp')
    os.replace(out_path + '.tmp', out_path)
