"""
What the eval scripts share: eval_ppl.py and eval_passkey.py (and bench.py, which times the same NLL path).

- the sliding-window NLL (window_spans, chunk_nll, sliding_window_nll): eval_ppl.py's core, its window rules
  described at the top of eval_ppl.py;
- the opening of an eval run: check_run (the checks before any work: a model dir, a free result path, a plot
  that can be drawn) and load_model (the checkpoint in eval mode, the length warnings printed);
- result names: model_name, result_label, default_out.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

import rope
from errors import UserError, pyplot

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}  # + 'auto'

# -----------------------------------------------------------------------------
# sliding-window NLL


def window_spans(n, window, stride=None, mode='sliding', add_bos=False, windows='aligned'):
    """Windows over a document of n tokens: list of (b, first, end).
    Input = ([BOS] if add_bos) + doc[b : b + window - add_bos]; it scores doc tokens first..end-1.
    windows='aligned' (ours): the last window is right-aligned (always full) and every window also scores
    the token after its input (its last logits). 'official' (the authors' compute_perplexity): windows at
    0, s, 2s, ... until one reaches the end (the last may be short), each scoring only the tokens its own
    input holds past the previous window's end; mode='truncate' there = the doc cut to one window's input."""
    nbos = int(bool(add_bos))
    n_doc = window - nbos  # document tokens per window
    if n_doc < 1:
        raise UserError(f"window {window} is too short")
    if windows not in ('aligned', 'official'):
        raise UserError(f"windows must be 'aligned' or 'official', got {windows!r}")
    if windows == 'official':
        return official_spans(n, n_doc, stride, mode, nbos)
    stride = window if stride is None else stride  # None: windows whose scored tokens are disjoint
    if not 1 <= stride <= window:  # a larger stride would leave tokens no window can predict
        raise UserError(f"stride must be in [1, window={window}], got {stride}")
    spans, scored, b = [], 1 - nbos, 0  # doc[0] has no prediction unless a BOS precedes it
    while scored < n:
        b = min(b, max(n - n_doc, 0))  # the last window is right-aligned: always a full window
        end = min(b + n_doc + 1, n)  # the last input token predicts doc[b + n_doc] when it exists
        spans.append((b, scored, end))
        scored = end
        b += stride
        if mode == 'truncate':
            break
    return spans


def official_spans(n, n_doc, stride, mode, nbos):
    # dwzhu-pku/PoSE src/eval_ppl.py: end = min(b + n_doc, n); the window's labels are its last
    # end - prev_end input tokens (the BOS, when the window holds it, predicts doc[0])
    if mode == 'truncate':  # x[0:max_tokenized_len], step = max_tokenized_len: one window
        n, stride = min(n, n_doc), n_doc
    stride = n_doc if stride is None else stride
    if not 1 <= stride <= n_doc:  # a larger step would count unscored tokens in the official code
        raise UserError(f"stride must be in [1, {n_doc}] (the window's document tokens), got {stride}")
    spans, prev = [], 1 - nbos
    for b in range(0, n, stride):
        end = min(b + n_doc, n)
        spans.append((b, prev, end))
        prev = end
        if end == n:
            break
    return spans


def chunk_nll(h, weight, targets):
    """sum of -log p(targets) for rows h [n, dim] under lm_head `weight`, holding one [n, vocab] fp32 block:
    logsumexp computed in place (no second block for log_softmax, as F.cross_entropy would make)."""
    logits = F.linear(h, weight).float()  # [n, vocab]
    picked = logits.gather(1, targets[:, None])[:, 0].double().sum()
    m = logits.amax(-1, keepdim=True)
    lse = logits.sub_(m).exp_().sum(-1).log_() + m[:, 0]
    return (lse.double().sum() - picked).item()


@torch.inference_mode()
def sliding_window_nll(model, tokens, window, stride=None, mode='sliding', add_bos=False, bos_id=None,
                       device='cpu', pbar=None, chunk=256, windows='aligned', spans=None):
    """(sum of NLL in nats, number of scored tokens) of one document (1-D int array) under `model`.
    Only the scored positions go through lm_head, `chunk` rows at a time in fp32: no [T, vocab] logits,
    and with overlapping windows (stride < window) most of lm_head's work is skipped. `spans`: this
    document's window_spans(...) of the same settings, when the caller computed them already."""
    if mode not in ('sliding', 'truncate'):
        raise UserError(f"mode must be 'sliding' or 'truncate', got {mode!r}")
    if add_bos and bos_id is None:
        raise UserError("add_bos=True but the tokenizer/model has no BOS token id (set --add_bos=False)")
    nbos = int(bool(add_bos))
    doc = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    nll, count = 0.0, 0
    if spans is None:
        spans = window_spans(len(doc), window, stride, mode, add_bos, windows)
    for b, first, end in spans:
        ctx = doc[b:b + window - nbos]
        if nbos:
            ctx = torch.cat([torch.tensor([bos_id]), ctx])
        h = model.forward_hidden(ctx[None].to(device))[0]  # [T, dim], after the final norm
        # doc token j is predicted at input position j - 1 - b + nbos
        h = h[first - 1 - b + nbos:end - 1 - b + nbos]  # [end - first, dim]: the scored positions only
        targets = doc[first:end].to(device)
        for i in range(0, end - first, chunk):
            nll += chunk_nll(h[i:i + chunk], model.lm_head.weight, targets[i:i + chunk])
        count += end - first
        if pbar is not None:
            pbar.update(1)
    return nll, count


# -----------------------------------------------------------------------------
# the opening of an eval run


def check_run(kind, model_dir, rope_scaling, out, overwrite, plot, protocol=None):
    """The checks both eval scripts make before any work; returns the result path (`out`, or the default name
    out/<kind>-<model>[-<rope override>][-<protocol>].json). The model dir is read for real by load_model."""
    if not model_dir:
        raise UserError("--model=<HF model dir> is required")
    if not os.path.isfile(os.path.join(model_dir, 'config.json')):
        raise UserError(f"model dir not found or has no config.json: {model_dir}")
    path = check_out(out or default_out(kind, model_dir, rope_scaling, protocol), overwrite)
    check_plot(plot)
    return path


def check_out(path, overwrite):
    """Refuse (before any work) to replace an existing result unless overwrite=True."""
    if os.path.isdir(path):
        raise UserError(f"out={path!r} is a directory: give a .json file path")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} exists: pass --overwrite=True to replace it, or --out=<another path>")
    return path


def check_plot(path):
    """--plot (before the work): matplotlib is there and the path is a file path."""
    if not path:
        return
    pyplot(f"plot={path!r}")
    if os.path.isdir(path):
        raise UserError(f"plot={path!r} is a directory: give a .png file path")


def torch_dtype(dtype, device):
    """'auto' = bfloat16 on CUDA, float32 elsewhere; or a name in DTYPES."""
    if dtype == 'auto':
        return torch.bfloat16 if 'cuda' in str(device) else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype must be auto/{'/'.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(path, rope_scaling=None, max_position_embeddings=None, dtype='auto', device='cpu', lengths=()):
    """Our Transformer from an HF dir, in eval mode; rope_scaling / max_position_embeddings None = the checkpoint's.
    Prints a warning for each of `lengths` past the model's max_position_embeddings."""
    from hf_checkpoint import load_pretrained
    from model import INFER_CHUNK
    overrides = {}
    if rope_scaling is not None:
        overrides['rope_scaling'] = rope_scaling
    if max_position_embeddings is not None:
        overrides['max_position_embeddings'] = max_position_embeddings
    net = load_pretrained(path, dtype=torch_dtype(dtype, device), device=device, **overrides).eval()
    net.infer_chunk = INFER_CHUNK  # no autograd here: the row-chunked forward (model.py)
    for w in length_warnings(lengths, net.args.max_position_embeddings):
        print(w)
    return net


def length_warnings(lengths, max_position_embeddings):
    return [f"warning: length {L} > max_position_embeddings {max_position_embeddings}: positions beyond "
            f"what the model is configured for" for L in lengths if L > max_position_embeddings]


# -----------------------------------------------------------------------------
# result names


def model_name(model_dir):
    """A model's short name: its directory's, or for train.py's export `<run>/hf` (every export is named hf)
    and checkpoint dirs such as `<run>/checkpoint-1000` the run's name first."""
    parts = os.path.normpath(os.path.abspath(model_dir)).split(os.sep)
    name = parts[-1]
    if name == 'hf' or name.startswith(('checkpoint', 'ckpt')):
        name = parts[-2] if name == 'hf' else f"{parts[-2]}-{name}"
    return name


def result_label(model_dir, rope_scaling):
    label = model_name(model_dir)
    if rope_scaling:
        label += f" +{rope.rope_type(rope_scaling)}x{rope_scaling.get('factor', '')}"
    return label


def default_out(kind, model_dir, rope_scaling, protocol=None):
    """out/<kind>-<model>[-<rope override>][-<protocol>].json: one name per model, scaling override and protocol."""
    name = result_label(model_dir, rope_scaling).replace(' +', '-')
    name = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)
    return os.path.join('out', f"{kind}-{name}{'-' + protocol if protocol else ''}.json")
