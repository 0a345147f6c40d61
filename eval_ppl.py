"""
Sliding-window perplexity at several window lengths (PoSE paper §4.2, Tables 1/2/6; Press et al.
2021).

    python eval_ppl.py --model=out/pose-16k --data_dir=data/govreport --split=val \
        --protocol=paper_table1 --lengths="[2048,4096,8192,16384]"
    # the paper's PI-only baseline: the original weights with a scaling override
    python eval_ppl.py --model=ckpt/llama-7b \
        --rope_scaling="{'rope_type':'linear','factor':8.0}" ...
    # overlay several result files in one plot, no evaluation
    python eval_ppl.py --plot=ppl.png --plot_inputs="['a.json','b.json']"

Protocols (`protocol`, one key; PROTOCOLS below): which documents (min length, how many, random or
the first ones), how much of each is scored, stride, windows, BOS and dtype. `paper_table1` /
`paper_table2` follow the paper's text (4.2, 5.3) and, where it is silent, the authors' code;
`official` / `official_pg19` are the authors' script/run_eval_ppl.sh; `nanopose` (default) is this
repo's quick rule. Any setting given on the command line replaces the protocol's; the JSON records
the protocol, every setting, which ones were overridden and the document ids, and they are printed
under the table.

Windows. For a window length L, window k starts at b = k*stride in the document and holds L input
tokens ([BOS] + L-1 document tokens when add_bos, else L document tokens). Every input position
predicts the next document token (the BOS predicts doc[b]). A window scores only the document tokens
no earlier window scored (the rest of its targets are -100), so each scored token is scored exactly
once and ppl = exp(sum of NLL / number of scored tokens), summed over all windows of all documents.
windows='aligned' (ours): the last window is right-aligned to the end of the text (every window is
full) and a window also scores the token after its input. windows='official' (the authors'
compute_perplexity, used by the paper's numbers): the last window may be short and a window scores
only tokens inside its input. stride 0 = disjoint windows; mode='truncate' keeps only the first
window of each document.

Read top to bottom: config; the sliding-window NLL (window_spans, chunk_nll, sliding_window_nll);
the protocols; the opening of an eval run that eval_passkey.py imports too (check_run, load_model,
result names); then this script's run (documents, evaluate, table, plot, main).
"""
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import rope
from data_format import find_files, open_split, read_documents, read_meta
from errors import (PLOT_EXTS, UserError, check_writable, claim, pyplot, read_json, release, run,
                    save_figure, write_json_atomic)
from hf_checkpoint import load_pretrained
from model import INFER_CHUNK
from tokenizer import check_same_tokenizer, load_tokenizer, sha256_file

# -----------------------------------------------------------------------------
# config (python eval_ppl.py [config.py] [--key=value ...])
model = ''  # HF model dir (ours, or a stock Llama/Mistral/Qwen2); '' with plot_inputs: only plot
rope_scaling = None  # None = the checkpoint's; a dict (HF semantics) overrides it (PI baseline)
max_position_embeddings = None  # None = the checkpoint's; else an override (length warnings too)
data_dir = ''  # a prepare_data.py output dir ...
split = 'val'  # ... and its split
input = None  # ... or raw text: files / dirs / globs, a list or comma-separated
text_key = 'text'  # the text field of .jsonl / .parquet input
tokenizer = None  # tokenizer for `input` (None = the model dir's)
protocol = 'nanopose'  # nanopose | paper_table1 | paper_table2 | official | official_pg19
# the settings below: None = the protocol's value
lengths = None  # evaluation window lengths L (the table's columns)
stride = None  # tokens between window starts (paper: 1024; 16384 at 128k); 0 = disjoint windows
mode = None  # 'sliding' or 'truncate' (score only the first window of each document)
windows = None  # 'aligned' (ours: full right-aligned windows) or 'official' (the authors' code)
add_bos = None  # BOS before every window (paper, official); a document's own leading BOS is dropped
num_docs = None  # documents used (paper: 50; 20 at 128k); 0 = all
draw = None  # 'random' (with `seed`, the paper) or 'first' (in data order, the authors' script)
min_doc_len = None  # only documents with at least this many tokens (BOS not counted)
doc_tokens = None  # score the first doc_tokens tokens of each doc; 0 = all
seed = 1337  # document selection (draw='random')
check_tokenizer = True  # refuse data / a tokenizer not of the model's fingerprint (False: skip)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = None  # 'auto' = bfloat16 on CUDA, float32 on CPU; or 'float32' / 'bfloat16' / 'float16'
out = ''  # JSON results path ('' = out/ppl-<model>[-<rope override>]-<protocol>.json)
overwrite = False  # replace an existing `out` (else: refuse before evaluating)
plot = ''  # PNG path: ppl vs length of this run and of plot_inputs
plot_inputs = []  # more result JSON files to overlay in the plot
# the types of the keys whose default is None (configurator.py)
CONFIG_TYPES = {'rope_scaling': dict, 'max_position_embeddings': int, 'input': (str, list),
                'tokenizer': str, 'lengths': list, 'stride': int, 'mode': str, 'windows': str,
                'add_bos': bool, 'num_docs': int, 'draw': str, 'min_doc_len': int,
                'doc_tokens': int, 'dtype': str}
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

# -----------------------------------------------------------------------------
# sliding-window NLL (the windows: see the top of this file); bench.py times this path


def window_spans(n, window, stride=None, mode='sliding', add_bos=False, windows='aligned'):
    """Windows over a document of n tokens: list of (b, first, end).
    Input = ([BOS] if add_bos) + doc[b : b + window - add_bos]; it scores doc tokens first..end-1.
    windows='aligned' (ours): the last window is right-aligned (always full) and every window also
    scores the token after its input (its last logits). 'official' (the authors'
    compute_perplexity): windows at 0, s, 2s, ... until one reaches the end (the last may be short),
    each scoring only the tokens its own input holds past the previous window's end; mode='truncate'
    there = the doc cut to one window's input."""
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
        raise UserError(f"stride must be in [1, {n_doc}] (the window's document tokens), "
                        f"got {stride}")
    spans, prev = [], 1 - nbos
    for b in range(0, n, stride):
        end = min(b + n_doc, n)
        spans.append((b, prev, end))
        prev = end
        if end == n:
            break
    return spans


def chunk_nll(h, weight, targets):
    """sum of -log p(targets) for rows h [n, dim] under lm_head `weight`, holding one [n, vocab]
    fp32 block: logsumexp computed in place (no second block for log_softmax, as F.cross_entropy
    would make)."""
    logits = F.linear(h, weight).float()  # [n, vocab]
    picked = logits.gather(1, targets[:, None])[:, 0].double().sum()
    m = logits.amax(-1, keepdim=True)
    lse = logits.sub_(m).exp_().sum(-1).log_() + m[:, 0]
    return (lse.double().sum() - picked).item()


@torch.inference_mode()
def sliding_window_nll(model, tokens, window, stride=None, mode='sliding', add_bos=False,
                       bos_id=None, device='cpu', pbar=None, chunk=256, windows='aligned',
                       spans=None):
    """(sum of NLL in nats, number of scored tokens) of one document (1-D int array) under `model`.
    Only the scored positions go through lm_head, `chunk` rows at a time in fp32: no [T, vocab]
    logits, and with overlapping windows (stride < window) most of lm_head's work is skipped.
    `spans`: this document's window_spans(...) of the same settings, when the caller computed them
    already."""
    if mode not in ('sliding', 'truncate'):
        raise UserError(f"mode must be 'sliding' or 'truncate', got {mode!r}")
    if add_bos and bos_id is None:
        raise UserError("add_bos=True but the tokenizer/model has no BOS token id "
                        "(set --add_bos=False)")
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
        # [end - first, dim]: the scored positions only
        h = h[first - 1 - b + nbos:end - 1 - b + nbos]
        targets = doc[first:end].to(device)
        for i in range(0, end - first, chunk):
            nll += chunk_nll(h[i:i + chunk], model.lm_head.weight, targets[i:i + chunk])
        count += end - first
        if pbar is not None:
            pbar.update(1)
    return nll, count


# -----------------------------------------------------------------------------
# Named protocols: which documents, which tokens, which windows, which dtype (`protocol`). A setting
# left at None below takes the protocol's value; the JSON records the protocol and every value used.
# windows='official': the authors' compute_perplexity (see window_spans); 'aligned': ours.
PROTOCOLS = {
    'nanopose': dict(  # this repo's quick default, not the paper's
        about="docs >= max(lengths) tokens cut to max(lengths) (every column scores the same "
              "tokens), num_docs drawn at random, disjoint right-aligned windows",
        lengths=[2048, 4096, 8192, 16384], min_doc_len='max_len', doc_tokens='max_len',
        draw='random', num_docs=50, stride=0, mode='sliding', windows='aligned', add_bos=True,
        dtype='auto'),
    'paper_table1': dict(
        about="paper 4.2, Table 1 (GovReport, Proof-pile): 50 random docs of more than 32,768 "
              "tokens, sliding windows with stride 1,024, 2k..32k; docs cut to 32,767 tokens and "
              "fp16 as the authors' code (the paper does not say)",
        lengths=[2048, 4096, 8192, 16384, 32768], min_doc_len=32769, doc_tokens=32767,
        draw='random', num_docs=50, stride=1024, mode='sliding', windows='official', add_bos=True,
        dtype='float16'),
    'paper_table2': dict(
        about="paper 5.3, Table 2 (PG-19, Books3): 20 random books of more than 128k tokens, "
              "stride 16,384, 32k..128k; books cut to 131,071 tokens and fp16 as the authors' code",
        lengths=[32768, 65536, 98304, 131072], min_doc_len=131073, doc_tokens=131071,
        draw='random', num_docs=20, stride=16384, mode='sliding', windows='official', add_bos=True,
        dtype='float16'),
    'official': dict(
        about="the authors' script/run_eval_ppl.sh (GovReport): the first 50 docs in data order "
              "with >= 32,767 tokens, cut to 32,767; --truncate: one window per doc (BOS + its "
              "first L-1 tokens); fp16",
        lengths=[1024 * k for k in range(1, 17)], min_doc_len=32767, doc_tokens=32767,
        draw='first', num_docs=50, stride=0, mode='truncate', windows='official', add_bos=True,
        dtype='float16'),
    'official_pg19': dict(
        about="the authors' script/run_eval_ppl.sh (PG-19): the first 20 books with >= 131,071 "
              "tokens, cut to 131,071, sliding step 16,384, 32k/64k/96k; fp16",
        lengths=[32768, 65536, 98304], min_doc_len=131071, doc_tokens=131071, draw='first',
        num_docs=20, stride=16384, mode='sliding', windows='official', add_bos=True,
        dtype='float16'),
}
SETTING_KEYS = ('lengths', 'min_doc_len', 'doc_tokens', 'draw', 'num_docs', 'stride', 'mode',
                'windows', 'add_bos', 'dtype')


def resolve_protocol(name, overrides):
    """{setting: value} of protocol `name` with the non-None `overrides` applied; bad values name
    the key."""
    if name not in PROTOCOLS:
        raise UserError(f"protocol={name!r} is unknown (known: {', '.join(PROTOCOLS)})")
    st = {k: PROTOCOLS[name][k] for k in SETTING_KEYS}
    st.update({k: v for k, v in overrides.items() if v is not None})
    L = st['lengths']
    if not L or not isinstance(L, list) or \
            any(not isinstance(x, int) or isinstance(x, bool) or x < 2 for x in L):
        raise UserError(f"lengths must be a list of ints >= 2, got {L!r}")
    for k in ('min_doc_len', 'doc_tokens'):
        st[k] = max(L) if st[k] == 'max_len' else st[k]
    # 0: doc_tokens all, num_docs all, disjoint
    for k in ('min_doc_len', 'doc_tokens', 'num_docs', 'stride'):
        if not isinstance(st[k], int) or isinstance(st[k], bool) or st[k] < 0:
            raise UserError(f"{k} must be an int >= 0, got {st[k]!r}")
    # a column labelled L must be scored with windows of L tokens
    for k in ('doc_tokens', 'min_doc_len'):
        if (st[k] or k == 'min_doc_len') and st[k] + int(st['add_bos'] is True) < max(L):
            raise UserError(f"{k}={st[k]} is shorter than the window L={max(L)} (with "
                            f"add_bos={st['add_bos']}): that column would be scored with shorter "
                            f"windows; raise {k} or lower lengths")
    for k, ok in (('draw', ('random', 'first')), ('mode', ('sliding', 'truncate')),
                  ('windows', ('aligned', 'official')), ('add_bos', (True, False)),
                  ('dtype', ('auto', 'float32', 'bfloat16', 'float16'))):
        if st[k] not in ok:
            raise UserError(f"{k} must be one of {', '.join(map(str, ok))}; got {st[k]!r}")
    return st


def format_settings(r):
    """The lines printed under a table: protocol, every setting, the documents."""
    st, ids = r['settings'], r.get('doc_ids', [])
    asked = f" of num_docs={st['num_docs']} asked" if len(ids) < (st.get('num_docs') or 0) else ''
    about = PROTOCOLS.get(r.get('protocol'), {}).get('about', '')
    lines = [f"protocol {r.get('protocol', '?')}: {about}",
             'settings: ' + ', '.join(f"{k}={st[k]}" for k in st if k != 'lengths'),
             f"documents ({len(ids)}{asked}): {ids}"]
    return '\n'.join(lines)


def select_docs(doc_lens, min_len, num_docs, seed, draw='random'):
    """Indices of `num_docs` documents with >= min_len tokens (num_docs None or 0: all), in index
    order: drawn with `seed` (draw='random', the paper) or the first ones (draw='first', the
    authors' script)."""
    doc_lens = np.asarray(doc_lens)
    ok = np.flatnonzero(doc_lens >= min_len)
    if len(ok) == 0:
        longest = int(doc_lens.max()) if len(doc_lens) else 0
        raise UserError(f"no document has >= {min_len} tokens (the longest has {longest}); "
                         f"lower lengths/min_doc_len or use longer documents")
    if num_docs and num_docs < len(ok):
        ok = ok[:num_docs] if draw == 'first' else \
            np.sort(np.random.default_rng(seed).choice(ok, size=num_docs, replace=False))
    return [int(i) for i in ok]


# -----------------------------------------------------------------------------
# the opening of an eval run (eval_passkey.py imports these too)


# the dtype names (and 'auto', see torch_dtype)
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def check_run(kind, model_dir, rope_scaling, out, overwrite, plot, protocol=None):
    """The checks both eval scripts make before any work; returns the result path (`out`, or the
    default name out/<kind>-<model>[-<rope override>][-<protocol>].json), claimed for this run. The
    model dir is read for real by load_model."""
    if not model_dir:
        raise UserError("--model=<HF model dir> is required")
    if not os.path.isfile(os.path.join(model_dir, 'config.json')):
        raise UserError(f"model dir not found or has no config.json: {model_dir}")
    check_plot(plot)
    return check_out(out or default_out(kind, model_dir, rope_scaling, protocol), overwrite)


def check_out(path, overwrite):
    """Before any work: `path` is a .json file path we can write, no other run is writing it
    (claimed here until the result is written), and it is not an existing result unless
    overwrite=True."""
    check_writable(path, 'out', exts=('.json',))
    claim(path, 'out')
    if os.path.exists(path) and not overwrite:
        release(path)
        raise UserError(f"{path} exists: pass --overwrite=True to replace it, "
                        f"or --out=<another path>")
    return path


def check_plot(path):
    """--plot (before the work): matplotlib is there, and the path is a figure file path we can
    write."""
    if not path:
        return
    pyplot(f"plot={path!r}")
    check_writable(path, 'plot', exts=PLOT_EXTS)


def check_device(device):
    """'cpu', or 'cuda' / 'cuda:N' on a machine that has it (before any work)."""
    if device == 'cpu':
        return
    if not re.fullmatch(r'cuda(:\d+)?', str(device)):
        raise UserError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise UserError(f"device={device!r} but CUDA is not available here")
    if ':' in device and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"device={device!r} but this machine has {torch.cuda.device_count()} "
                        f"CUDA device(s)")


def torch_dtype(dtype, device):
    """'auto' = bfloat16 on CUDA, float32 elsewhere; or a name in DTYPES. The device is checked
    too."""
    check_device(device)
    if dtype == 'auto':
        return torch.bfloat16 if 'cuda' in str(device) else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype must be auto/{'/'.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(path, rope_scaling=None, max_position_embeddings=None, dtype='auto', device='cpu',
               lengths=()):
    """Our Transformer from an HF dir, in eval mode; rope_scaling / max_position_embeddings None =
    the checkpoint's. Prints a warning for each of `lengths` past the model's
    max_position_embeddings."""
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
    return [f"warning: length {L} > max_position_embeddings {max_position_embeddings}: positions "
            f"beyond what the model is configured for"
            for L in lengths if L > max_position_embeddings]


def model_name(model_dir):
    """A model's short name: its directory's, or for train.py's export `<run>/hf` (every export is
    named hf) and checkpoint dirs such as `<run>/checkpoint-1000` the run's name first."""
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
    """out/<kind>-<model>[-<rope override>][-<protocol>].json: one name per model, scaling override
    and protocol."""
    name = result_label(model_dir, rope_scaling).replace(' +', '-')
    name = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)
    return os.path.join('out', f"{kind}-{name}{'-' + protocol if protocol else ''}.json")


# -----------------------------------------------------------------------------
# this script's run: documents, windows, results


def check_vocab(docs, vocab_size, what):
    """Token ids the model has no embedding for would be an IndexError deep inside the forward."""
    top = max((int(d.max()) for d in docs if len(d)), default=-1)
    if top >= vocab_size:
        raise UserError(f"{what} has token id {top} >= the model's vocab_size {vocab_size}: "
                        f"tokenized for another model?")


def ppl_table(results):
    """Paper-style table of result dicts: one row per result (its label), window lengths as
    columns."""
    lengths = sorted({int(L) for r in results for L in r['ppl']})
    name_w = max([5] + [len(r['label']) for r in results])
    lines = [f"{'model':<{name_w}} " + ' '.join(f"{L:>9}" for L in lengths)]
    for r in results:
        cells = [r['ppl'].get(str(L)) for L in lengths]
        lines.append(f"{r['label']:<{name_w}} " + ' '.join(
            f"{'-':>9}" if c is None else f"{c:>9.3g}" if c >= 1e5 else f"{c:>9.3f}"
            for c in cells))
    return '\n'.join(lines)


def plot_results(results, path):
    """ppl vs window length, log y, one line per result; written atomically."""
    plt = pyplot(f"plot={path!r}")
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        xs = sorted(int(L) for L in r['ppl'])
        ax.plot(xs, [r['ppl'][str(L)] for L in xs], marker='o', label=r['label'])
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ticks = sorted({int(L) for r in results for L in r['ppl']})
    ax.set_xticks(ticks, [f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    lo, hi = ax.get_ylim()
    if hi / lo < 10:  # within one decade only minor ticks fall inside: label them
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    ax.set_xlabel('evaluation window (tokens)')
    ax.set_ylabel('perplexity')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def load_result(path):
    """An eval_ppl.py result JSON (--plot_inputs), checked: a missing or broken file is named."""
    if not os.path.isfile(path):
        raise UserError(f"plot_inputs: result file not found: {path}")
    r = read_json(path)
    ppl = r.get('ppl')
    if not isinstance(ppl, dict) or not all(isinstance(v, (int, float)) for v in ppl.values()):
        raise UserError(f"{path}: not an eval_ppl.py result (no 'ppl' dict of numbers)")
    r.setdefault('label', result_label(r.get('model', path), r.get('rope_scaling')))
    return r


def load_docs(st):
    """(documents as int arrays cut to doc_tokens, their ids, data description, bos_id) for settings
    st."""
    if data_dir:
        tokens, offsets = open_split(data_dir, split)
        meta = read_meta(data_dir)
        if check_tokenizer:
            check_same_tokenizer(meta.get('tokenizer_sha256'), f"data_dir='{data_dir}' (tokenized "
                                 f"with {meta.get('tokenizer')})", model, 'check_tokenizer')
        bos_id = meta.get('bos_id')
        doc_lens = np.diff(offsets)
        # a leading BOS is not text (add_bos decides about BOS): don't count it
        if bos_id is not None:
            nonempty = doc_lens > 0
            doc_lens[nonempty] -= np.asarray(tokens[offsets[:-1][nonempty]]) == bos_id
        ids = select_docs(doc_lens, st['min_doc_len'], st['num_docs'], seed, st['draw'])
        docs = [np.asarray(tokens[offsets[i]:offsets[i + 1]]) for i in ids]
        data_info = {'data_dir': os.path.abspath(data_dir), 'split': split,
                     'tokenizer': meta.get('tokenizer')}
    else:
        files = find_files(input)  # files, dirs, globs (comma-separated or a list)
        tok = load_tokenizer(tokenizer or model)
        if tokenizer and check_tokenizer:
            check_same_tokenizer(sha256_file(tok.path), f"tokenizer='{tokenizer}'", model,
                                 'check_tokenizer')
        bos_id = tok.bos_id
        # .txt/.md: one document per file; .jsonl(.gz/.zst)/.parquet: one per record
        all_docs, where = [], []
        for p in files:
            for k, text in enumerate(read_documents(p, text_key)):
                all_docs.append(np.asarray(tok.encode(text, bos=False, eos=False), dtype=np.int64))
                where.append([os.path.abspath(p), k])
        ids = select_docs([len(d) for d in all_docs], st['min_doc_len'], st['num_docs'], seed,
                          st['draw'])
        docs = [all_docs[i] for i in ids]
        data_info = {'input': files, 'docs': [where[i] for i in ids], 'tokenizer': tok.files}
    docs = [d[1:] if bos_id is not None and len(d) and d[0] == bos_id else d for d in docs]
    docs = [d[:st['doc_tokens']] if st['doc_tokens'] else d for d in docs]
    return docs, ids, data_info, bos_id


def evaluate(net, docs, st, use_bos, bos_id):
    """Per window length: ppl, NLL sum, scored tokens, input tokens/s (dicts keyed by str(L))."""
    ppl, nll, counts, tps = {}, {}, {}, {}
    stride_ = st['stride'] or None
    for L in st['lengths']:
        # once per L
        spans = [window_spans(len(d), L, stride_, st['mode'], use_bos, st['windows']) for d in docs]
        total, n, t0 = 0.0, 0, time.time()
        with tqdm(total=sum(map(len, spans)), desc=f"L={L}", leave=False) as bar:
            for d, sp in zip(docs, spans):
                s, c = sliding_window_nll(net, d, L, stride_, st['mode'], use_bos, bos_id, device,
                                          bar, windows=st['windows'], spans=sp)
                total, n = total + s, n + c
        dt = time.time() - t0
        ppl[str(L)], nll[str(L)], counts[str(L)] = math.exp(total / n), total, n
        n_in = sum(min(L, len(d) + int(use_bos) - b)
                   for d, sp in zip(docs, spans) for b, _, _ in sp)
        tps[str(L)] = n_in / dt
        print(f"L={L}: ppl {ppl[str(L)]:.4f} over {n} tokens, {sum(map(len, spans))} windows, "
              f"{tps[str(L)]:.0f} input tok/s")
    return ppl, nll, counts, tps


def main():
    check_device(device)
    if plot_inputs and not model:  # only overlay existing results
        if not plot:
            raise UserError("plot_inputs given without --plot=<png path>")
        check_plot(plot)
        results = [load_result(p) for p in plot_inputs]
        print(ppl_table(results))
        plot_results(results, plot)
        print(f"wrote {plot}")
        return
    if bool(data_dir) == bool(input):
        raise UserError("give exactly one of --data_dir (a prepared split) "
                        "or --input (raw text files)")
    if max_position_embeddings is not None and max_position_embeddings < 1:
        raise UserError(f"max_position_embeddings must be >= 1 (or None: the checkpoint's), "
                        f"got {max_position_embeddings}")
    given = {k: globals()[k] for k in SETTING_KEYS}
    st = resolve_protocol(protocol, given)
    # the result's name is claimed once the settings are known good, before reading any data
    path = check_run('ppl', model, rope_scaling, out, overwrite, plot, protocol)
    others = [load_result(p) for p in plot_inputs]  # the plot's other lines, read before the work
    docs, ids, data_info, bos_id = load_docs(st)
    # the result is not over what the protocol asks
    if st['num_docs'] and len(ids) < st['num_docs']:
        print(f"warning: num_docs={st['num_docs']} (protocol {protocol}) but only {len(ids)} "
              f"document(s) have >= {st['min_doc_len']} tokens: the result is over {len(ids)}")

    net = load_model(model, rope_scaling, max_position_embeddings, st['dtype'], device,
                     st['lengths'])
    check_vocab(docs, net.args.vocab_size,
                f"data_dir='{data_dir}'" if data_dir else 'the tokenized input')
    use_bos = st['add_bos'] and bos_id is not None
    # e.g. Qwen2: its tokenizer prepends nothing, so neither do we
    if st['add_bos'] and not use_bos:
        print("note: the tokenizer has no BOS token: windows start with document text "
              "(add_bos ignored)")
    ppl, nll, counts, tps = evaluate(net, docs, st, use_bos, bos_id)

    result = {
        'label': result_label(model, rope_scaling), 'model': os.path.abspath(model),
        'rope_scaling': rope_scaling if rope_scaling is not None else net.args.rope_scaling,
        'rope_scaling_override': rope_scaling is not None,
        'max_position_embeddings': net.args.max_position_embeddings,
        'data': data_info, 'protocol': protocol,
        # settings not the protocol's
        'overridden': sorted(k for k, v in given.items() if v is not None),
        'settings': dict(st, add_bos=use_bos, seed=seed, device=device,
                         torch_dtype=str(next(net.parameters()).dtype)),
        'ppl': ppl, 'nll': nll, 'tokens': counts, 'tokens_per_s': tps,
        'doc_ids': ids, 'doc_lens': [int(len(d)) for d in docs],
    }
    write_json_atomic(path, result)
    print(ppl_table([result]))
    print(format_settings(result))
    print(f"wrote {path}")
    if plot:
        plot_results([result] + others, plot)
        print(f"wrote {plot}")


if __name__ == '__main__':
    run(main)
