"""
make demo-real's helper (demo_real.sh runs it): writes the long real documents, and prints the final table.

    python demo_real.py --stage=sources   # stdlib packages -> src/{train,val}.jsonl, one long document per package part
    python demo_real.py --stage=report    # the results table (+ plot) from the eval JSONs in out_dir

The documents: real text that is on every machine without a download is this Python's standard library
source. A single module is mostly far shorter than the 16k tokens the evaluation needs, so a document is
a package: its .py files (recursively, in sorted path order, each after a "# file: <path>" line)
concatenated, cut at a file boundary once it reaches `doc_kb` KB (~4 bytes per token: 256 KB is ~65k
tokens); the top-level modules form one more package ("."). Left out: test/ (17 MB of test suites),
encodings/ (code-page tables) and config-*/. Whole packages are held out (`val_packages`), so the
perplexity documents are code the fine-tuning never saw.
"""
import glob
import json
import os
import sys
import sysconfig

from errors import pyplot, save_figure, write_jsonl_atomic, write_text_atomic

# -----------------------------------------------------------------------------
stage = 'report'  # 'sources' | 'report'
src_dir = 'data-real/src'  # where train.jsonl / val.jsonl go (stage sources)
val_packages = 'asyncio,email'  # stdlib packages held out for the perplexity evaluation (comma-separated)
skip_packages = 'test,encodings'  # stdlib packages left out altogether (comma-separated)
doc_kb = 256  # a document is cut at the first file boundary past this many KB
out_dir = 'out-real'  # eval JSONs: ppl-{method}.json, passkey-{method}-{length}.json (stage report)
methods = 'original,linear,pi,pose'  # table rows
plot = 'out-real/demo-real.png'  # '' = no plot; without matplotlib: a note, no plot
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
# pi: the YaRN x2 that PoSE trains with, without training; linear: the paper's PI-only row (linear x2, no training)
LABELS = {'original': 'Original', 'linear': 'PI-only', 'pi': 'YaRN-only', 'pose': 'PoSE'}


def fail(msg):
    sys.stderr.write(f"demo_real: {msg}\n")
    raise SystemExit(2)


def package_documents(root, skip, doc_bytes):
    """{package: [document text, ...]}: each package's .py files concatenated, cut at file boundaries."""
    files = {}
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ('site-packages', 'dist-packages', '__pycache__')
                         and not x.startswith(('.', 'config-')))
        rel = os.path.relpath(d, root)
        pkg = rel.split(os.sep)[0]
        if pkg in skip:
            dirs[:] = []
            continue
        files.setdefault(pkg, []).extend(os.path.join(d, n) for n in sorted(names) if n.endswith('.py'))
    docs = {}
    for pkg, paths in sorted(files.items()):
        parts, size = [], 0
        for p in paths:
            try:
                text = open(p, encoding='utf-8').read()
            except (UnicodeDecodeError, OSError):
                continue  # a handful of stdlib files are test fixtures in other encodings
            parts.append(f"# file: {os.path.relpath(p, root)}\n{text}")
            size += len(text)
            if size >= doc_bytes:
                docs.setdefault(pkg, []).append('\n'.join(parts))
                parts, size = [], 0
        if parts:
            docs.setdefault(pkg, []).append('\n'.join(parts))
    return docs


def load_results(out_dir, methods):
    """{method: {'ppl': {L: ppl}, 'passkey': {L: accuracy}, 'trials': {L: n}, 'seconds': {...}}} from the JSONs there."""
    res = {}
    for m in methods:
        r = res.setdefault(m, {'ppl': {}, 'passkey': {}, 'trials': {}})
        p = os.path.join(out_dir, f'ppl-{m}.json')
        if os.path.isfile(p):
            r['ppl'] = {int(L): v for L, v in json.load(open(p))['ppl'].items()}
        for p in sorted(glob.glob(os.path.join(out_dir, f'passkey-{m}-*.json'))):
            j = json.load(open(p))
            for L, acc in j['accuracy'].items():
                r['passkey'][int(L)] = acc
                r['trials'][int(L)] = sum(t['length'] == int(L) for t in j['trials'])
    return res


def table(res, key, fmt):
    lengths = sorted({L for r in res.values() for L in r[key]})
    lines = [f"{'method':<10}" + ''.join(f"{L:>9}" for L in lengths)]
    for m, r in res.items():
        lines.append(f"{LABELS.get(m, m):<10}" + ''.join(f"{fmt(r[key][L]) if L in r[key] else '-':>9}" for L in lengths))
    return '\n'.join(lines)


def goals(res):
    """The experiment's goals (issue 10 B), each '+' holds, '-' fails, '?' not measured."""
    pk = lambda m, L: res.get(m, {}).get('passkey', {}).get(L)  # noqa: E731
    pp = lambda m, L: res.get(m, {}).get('ppl', {}).get(L)  # noqa: E731
    rows = [("PoSE passkey >= 0.8 at 16k", pk('pose', 16384), lambda: pk('pose', 16384) >= 0.8),
            ("Original passkey <= 0.2 at 16k (the cliff PoSE removes)", pk('original', 16384),
             lambda: pk('original', 16384) <= 0.2),
            ("PoSE ppl at 16k not above its ppl at 8k", pp('pose', 16384) and pp('pose', 8192),
             lambda: pp('pose', 16384) <= pp('pose', 8192)),
            ("PoSE ppl at 2k within 5% of the Original's", pp('pose', 2048) and pp('original', 2048),
             lambda: pp('pose', 2048) <= 1.05 * pp('original', 2048))]
    return '\n'.join(f"  {'?' if v is None else '+' if ok() else '-'}  {name}" for name, v, ok in rows)


if stage == 'sources':
    root = sysconfig.get_paths()['stdlib']
    skip = {p for p in skip_packages.split(',') if p}
    val = {p for p in val_packages.split(',') if p}
    docs = package_documents(root, skip, doc_kb * 1024)
    missing = val - set(docs)
    if missing:
        fail(f"val_packages: {', '.join(sorted(missing))} not found in {root}")
    write_jsonl_atomic(os.path.join(src_dir, 'train.jsonl'), [t for p, ts in docs.items() if p not in val for t in ts])
    write_jsonl_atomic(os.path.join(src_dir, 'val.jsonl'), [t for p, ts in docs.items() if p in val for t in ts])
elif stage == 'report':
    ms = [m for m in methods.split(',') if m]
    res = load_results(out_dir, ms)
    out = ["Perplexity on held-out stdlib packages (eval_ppl.py), window length L:",
           table(res, 'ppl', lambda v: f"{v:.3f}"), "",
           "Passkey retrieval accuracy (eval_passkey.py; trials per length in brackets):",
           table({m: {'pk': {L: (a, r['trials'][L]) for L, a in r['passkey'].items()}} for m, r in res.items()},
                 'pk', lambda v: f"{v[0]:.2f} ({v[1]})"), "",
           "Goals (+ holds, - fails, ? not measured):", goals(res)]
    text = '\n'.join(out)
    print(text)
    write_text_atomic(os.path.join(out_dir, 'results.txt'), text + '\n')
    plt = pyplot(f'plot={plot!r}', required=False) if plot else None  # the table is written already
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for m, r in res.items():
            for ax, key in zip(axes, ('ppl', 'passkey')):
                if r[key]:
                    Ls = sorted(r[key])
                    ax.plot(Ls, [r[key][L] for L in Ls], marker='o', label=LABELS.get(m, m))
        for ax, title in zip(axes, ('perplexity (held-out stdlib)', 'passkey accuracy')):
            ax.axvline(8192, color='gray', ls=':', lw=1)
            ax.set_xscale('log', base=2)
            ax.set_xlabel('length (tokens)')
            ax.set_title(title)
            ax.legend()
        fig.suptitle('SmolLM2-135M-Instruct, 8k -> 16k')
        fig.tight_layout()
        save_figure(fig, plot)
        print(f"wrote {plot}")
else:
    fail(f"stage must be 'sources' or 'report', got {stage!r}")
