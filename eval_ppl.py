"""
Sliding-window perplexity at several window lengths (PoSE paper §4.2, Tables 1/2/6; Press et al. 2021).

    python eval_ppl.py --model=out/pose-16k --data_dir=data/govreport --split=val \
        --lengths="[2048,4096,8192,16384]" --stride=1024 --out=out/ppl-pose16k.json
    # the paper's PI-only baseline: the original weights with a scaling override
    python eval_ppl.py --model=ckpt/llama-7b --rope_scaling="{'rope_type':'linear','factor':8.0}" ...
    # overlay several result files in one plot, no evaluation
    python eval_ppl.py --plot=ppl.png --plot_inputs="['a.json','b.json']"

Windows. For a window length L, window k starts at b = k*stride in the document and holds L input
tokens ([BOS] + L-1 document tokens when add_bos, the paper's script, else L document tokens).
Every input position predicts the next document token (the BOS predicts doc[b]), so a window makes
L predictions. A window scores only the document tokens no earlier window scored (the rest of its
targets are -100): the first window scores all of its predictions, later ones only the tokens past
the previous window's end. The last window is right-aligned to the end of the text, so every window
has exactly L tokens of input. Each scored token is scored exactly once, so
ppl = exp(sum of NLL / number of scored tokens), summed over all windows of all documents.
stride=None makes the windows disjoint; mode='truncate' keeps only the first window of each document.
By default each document is cut to max(lengths) tokens (doc_tokens), as the paper's script does: then
every window length scores the very same tokens and the columns of the table are comparable.
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# reusable pieces (tests and bench.py import these)


def window_spans(n, window, stride=None, mode='sliding', add_bos=False):
    """Windows over a document of n tokens: list of (b, first, end).
    Input = ([BOS] if add_bos) + doc[b : b + window - add_bos]; it scores doc tokens first..end-1."""
    nbos = int(bool(add_bos))
    n_doc = window - nbos  # document tokens per window
    if n_doc < 1:
        raise ValueError(f"window {window} is too short")
    stride = window if stride is None else stride  # None: windows whose scored tokens are disjoint
    if not 1 <= stride <= window:  # a larger stride would leave tokens no window can predict
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
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


@torch.inference_mode()
def sliding_window_nll(model, tokens, window, stride=None, mode='sliding', add_bos=False, bos_id=None,
                       device='cpu', pbar=None, chunk=1024):
    """(sum of NLL in nats, number of scored tokens) of one document (1-D int array) under `model`.
    Only the scored positions go through lm_head, `chunk` rows at a time in fp32: no [T, vocab] logits,
    and with overlapping windows (stride < window) most of lm_head's work is skipped."""
    if mode not in ('sliding', 'truncate'):
        raise ValueError(f"mode must be 'sliding' or 'truncate', got {mode!r}")
    if add_bos and bos_id is None:
        raise ValueError("add_bos=True but the tokenizer/model has no BOS token id (set --add_bos=False)")
    nbos = int(bool(add_bos))
    doc = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    nll, count = 0.0, 0
    for b, first, end in window_spans(len(doc), window, stride, mode, add_bos):
        ctx = doc[b:b + window - nbos]
        if nbos:
            ctx = torch.cat([torch.tensor([bos_id]), ctx])
        h = model.forward_hidden(ctx[None].to(device))[0]  # [T, dim], after the final norm
        # doc token j is predicted at input position j - 1 - b + nbos
        h = h[first - 1 - b + nbos:end - 1 - b + nbos]  # [end - first, dim]: the scored positions only
        targets = doc[first:end].to(device)
        for i in range(0, end - first, chunk):
            logits = model.lm_head(h[i:i + chunk]).float()  # [<=chunk, vocab]
            nll += F.cross_entropy(logits, targets[i:i + chunk], reduction='sum').double().item()
        count += end - first
        if pbar is not None:
            pbar.update(1)
    return nll, count


def load_model(path, rope_scaling=None, max_position_embeddings=None, dtype='auto', device='cpu'):
    """Our Transformer from an HF dir, in eval mode; rope_scaling / max_position_embeddings None = the checkpoint's."""
    from model import Transformer
    if not os.path.isfile(os.path.join(path, 'config.json')):
        raise FileNotFoundError(f"model dir not found or has no config.json: {path}")
    pt_dtype = {'auto': torch.bfloat16 if 'cuda' in str(device) else torch.float32, 'float32': torch.float32,
                'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(dtype)
    if pt_dtype is None:
        raise ValueError(f"dtype must be auto/float32/bfloat16/float16, got {dtype!r}")
    overrides = {}
    if rope_scaling is not None:
        overrides['rope_scaling'] = rope_scaling
    if max_position_embeddings is not None:
        overrides['max_position_embeddings'] = max_position_embeddings
    return Transformer.from_pretrained(path, dtype=pt_dtype, device=device, **overrides).eval()


def select_docs(doc_lens, min_len, num_docs, seed):
    """Indices of `num_docs` documents with >= min_len tokens, drawn with `seed`, in index order."""
    doc_lens = np.asarray(doc_lens)
    ok = np.flatnonzero(doc_lens >= min_len)
    if len(ok) == 0:
        longest = int(doc_lens.max()) if len(doc_lens) else 0
        raise ValueError(f"no document has >= {min_len} tokens (the longest has {longest}); "
                         f"lower lengths/min_doc_len or use longer documents")
    if num_docs is not None and num_docs < len(ok):
        ok = np.sort(np.random.default_rng(seed).choice(ok, size=num_docs, replace=False))
    return [int(i) for i in ok]


def length_warnings(lengths, max_position_embeddings):
    return [f"warning: length {L} > max_position_embeddings {max_position_embeddings}: positions beyond "
            f"what the model is configured for" for L in lengths if L > max_position_embeddings]


def write_json_atomic(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # never a half-written result


def format_table(results):
    """Paper-style table: one row per result, window lengths as columns."""
    lengths = sorted({int(L) for r in results for L in r['ppl']})
    name_w = max([5] + [len(r['label']) for r in results])
    lines = [f"{'model':<{name_w}} " + ' '.join(f"{L:>9}" for L in lengths)]
    for r in results:
        cells = [r['ppl'].get(str(L)) for L in lengths]
        lines.append(f"{r['label']:<{name_w}} " + ' '.join(
            f"{'-':>9}" if c is None else f"{c:>9.3g}" if c >= 1e5 else f"{c:>9.3f}" for c in cells))
    return '\n'.join(lines)


def result_label(model_dir, rope_scaling):
    label = os.path.basename(os.path.normpath(model_dir))
    if rope_scaling:
        label += f" +{rope_scaling.get('rope_type', rope_scaling.get('type'))}x{rope_scaling.get('factor', '')}"
    return label


def plot_results(results, path):
    """ppl vs window length, log y, one line per result; written atomically."""
    import matplotlib  # lazy: only --plot needs it
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
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
    ext = os.path.splitext(path)[1].lstrip('.') or 'png'
    tmp = path + '.tmp'
    fig.savefig(tmp, format=ext, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def load_result(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"result file not found: {path}")
    with open(path) as f:
        r = json.load(f)
    if 'ppl' not in r:
        raise ValueError(f"{path}: not an eval_ppl.py result (no 'ppl' key)")
    r.setdefault('label', result_label(r.get('model', path), r.get('rope_scaling')))
    return r


# -----------------------------------------------------------------------------
# config (python eval_ppl.py [config.py] [--key=value ...])
model = ''  # HF-format model dir (ours or a stock Llama/Mistral/Qwen2); '' with plot_inputs = only plot
rope_scaling = None  # None = the checkpoint's own; a dict (HF semantics) overrides it, e.g. the paper's PI-only baseline
max_position_embeddings = None  # None = the checkpoint's own; else an override (also what the length warning checks)
data_dir = ''  # a prepare_data.py output dir ...
split = 'val'  # ... and its split
input = None  # ... or raw text: files/dirs/globs (a list or comma-separated); a .txt is one document, .jsonl/.parquet one per record
text_key = 'text'  # the text field of .jsonl / .parquet input
tokenizer = None  # tokenizer for `input` (None = the model dir's)
lengths = [2048, 4096, 8192, 16384]  # evaluation window lengths L (the table's columns)
stride = None  # window start advances by this many tokens (paper: 1024; 16384 at 128k); None = disjoint windows
mode = 'sliding'  # 'sliding' or 'truncate' (score only the first window of each document)
add_bos = True  # prepend BOS to every window (the paper's script); a leading BOS of a document is always dropped first
num_docs = 50  # documents drawn with `seed` among those >= min_doc_len tokens (paper: 50); None = all
min_doc_len = None  # None = max(lengths)
doc_tokens = None  # score the first doc_tokens tokens of each doc: None = max(lengths) (same tokens at every L), 0 = all
seed = 1337  # document selection
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # 'auto' = bfloat16 on CUDA, float32 on CPU; or 'float32' / 'bfloat16' / 'float16'
out = ''  # JSON results path ('' = out/ppl-<model>.json)
plot = ''  # PNG path: ppl vs length of this run and of plot_inputs
plot_inputs = []  # more result JSON files to overlay in the plot


def main():
    if plot_inputs and not model:  # only overlay existing results
        results = [load_result(p) for p in plot_inputs]
        print(format_table(results))
        if not plot:
            raise ValueError("plot_inputs given without --plot=<png path>")
        plot_results(results, plot)
        print(f"wrote {plot}")
        return
    import prepare_data  # after the config: a bad key fails before the heavy imports
    from tqdm import tqdm

    if not model:
        raise ValueError("--model=<HF model dir> is required")
    if not os.path.isfile(os.path.join(model, 'config.json')):  # before reading any data
        raise FileNotFoundError(f"model dir not found or has no config.json: {model}")
    if not lengths or any(not isinstance(L, int) or L < 2 for L in lengths):
        raise ValueError(f"lengths must be a list of ints >= 2, got {lengths!r}")
    if mode not in ('sliding', 'truncate'):
        raise ValueError(f"mode must be 'sliding' or 'truncate', got {mode!r}")
    if bool(data_dir) == bool(input):
        raise ValueError("give exactly one of --data_dir (a prepared split) or --input (raw text files)")
    max_len = max(lengths)
    min_len = max_len if min_doc_len is None else min_doc_len
    n_keep = max_len if doc_tokens is None else doc_tokens

    # data: a list of documents (int arrays), only the chosen ones read from disk
    if data_dir:
        tokens, offsets = prepare_data.open_split(data_dir, split)
        meta = prepare_data.read_meta(data_dir)
        bos_id = meta.get('bos_id')
        doc_lens = np.diff(offsets)
        if bos_id is not None:  # a leading BOS is not text (add_bos decides about BOS): don't count it
            nonempty = doc_lens > 0
            doc_lens[nonempty] -= np.asarray(tokens[offsets[:-1][nonempty]]) == bos_id
        ids = select_docs(doc_lens, min_len, num_docs, seed)
        docs = [np.asarray(tokens[offsets[i]:offsets[i + 1]]) for i in ids]
        data_info = {'data_dir': os.path.abspath(data_dir), 'split': split, 'tokenizer': meta.get('tokenizer')}
    else:
        files = prepare_data.find_files(input)  # files, dirs, globs (comma-separated or a list)
        tok = prepare_data.load_tokenizer(tokenizer or model)
        bos_id = tok.bos_id
        all_docs, where = [], []  # .txt/.md: one document per file; .jsonl(.gz/.zst)/.parquet: one per record
        for p in files:
            for k, text in enumerate(prepare_data.read_documents(p, text_key)):
                all_docs.append(np.asarray(tok.encode(text, bos=False, eos=False), dtype=np.int64))
                where.append([os.path.abspath(p), k])
        ids = select_docs([len(d) for d in all_docs], min_len, num_docs, seed)
        docs = [all_docs[i] for i in ids]
        data_info = {'input': files, 'docs': [where[i] for i in ids], 'tokenizer': tok.files}
    docs = [d[1:] if bos_id is not None and len(d) and d[0] == bos_id else d for d in docs]
    docs = [d[:n_keep] if n_keep else d for d in docs]

    # model
    net = load_model(model, rope_scaling, max_position_embeddings, dtype, device)
    use_bos = add_bos and bos_id is not None
    if add_bos and not use_bos:  # e.g. Qwen2: its tokenizer prepends nothing, so neither do we
        print("note: the tokenizer has no BOS token: windows start with document text (add_bos ignored)")
    for w in length_warnings(lengths, net.args.max_position_embeddings):
        print(w)

    # evaluate
    ppl, nll, counts, tps = {}, {}, {}, {}
    for L in lengths:
        n_windows = sum(len(window_spans(len(d), L, stride, mode, use_bos)) for d in docs)
        total, n, t0 = 0.0, 0, time.time()
        with tqdm(total=n_windows, desc=f"L={L}", leave=False) as bar:
            for d in docs:
                s, c = sliding_window_nll(net, d, L, stride, mode, use_bos, bos_id, device, bar)
                total, n = total + s, n + c
        dt = time.time() - t0
        ppl[str(L)], nll[str(L)], counts[str(L)] = math.exp(total / n), total, n
        n_in = sum(min(L, len(d) + int(use_bos) - b) for d in docs
                   for b, _, _ in window_spans(len(d), L, stride, mode, use_bos))  # input tokens run
        tps[str(L)] = n_in / dt
        print(f"L={L}: ppl {ppl[str(L)]:.4f} over {n} tokens, {n_windows} windows, {tps[str(L)]:.0f} input tok/s")

    result = {
        'label': result_label(model, rope_scaling), 'model': os.path.abspath(model),
        'rope_scaling': rope_scaling if rope_scaling is not None else net.args.rope_scaling,
        'rope_scaling_override': rope_scaling is not None,
        'max_position_embeddings': net.args.max_position_embeddings,
        'data': data_info,
        'settings': {'lengths': lengths, 'stride': stride, 'mode': mode, 'add_bos': use_bos, 'num_docs': num_docs,
                     'min_doc_len': min_len, 'doc_tokens': n_keep, 'seed': seed, 'dtype': str(next(net.parameters()).dtype), 'device': device},
        'ppl': ppl, 'nll': nll, 'tokens': counts, 'tokens_per_s': tps,
        'doc_ids': ids, 'doc_lens': [int(len(d)) for d in docs],
    }
    path = out or os.path.join('out', f"ppl-{os.path.basename(os.path.normpath(model))}.json")
    write_json_atomic(path, result)
    print(format_table([result]))
    print(f"wrote {path}")
    if plot:
        results = [result] + [load_result(p) for p in plot_inputs]
        plot_results(results, plot)
        print(f"wrote {plot}")


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
