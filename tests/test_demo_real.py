"""demo_real.py: the report's counts, intervals and paired tests on hand-made eval JSONs (expected values
worked out here from the tests' definitions), the Gutenberg splitter, and the GPU profile of
demo_real.sh run end to end at toy size on the CPU."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f)


def passkey_json(length, verdicts, logps, keys):
    trials = [{'length': length, 'depth_requested': 0.5, 'key': k, 'pass': v, 'key_logprob': lp}
              for v, lp, k in zip(verdicts, logps, keys)]
    return {'trials': trials}


def report(out_dir, *args):
    return subprocess.run([sys.executable, 'demo_real.py', '--stage=report', f'--out_dir={out_dir}',
                           '--seeds=1', *args], cwd=ROOT, capture_output=True, text=True)


def test_report_pairs_trials_and_tests(tmp_path):
    keys = [str(10000 + i) for i in range(10)]
    # at 24k: PoSE passes 9, Contiguous 2; the 7 discordant pairs all favour PoSE. Contiguous's file lists
    # its trials in another order: pairing is by key, not by position.
    write(tmp_path / 'passkey-pose32k-s1-24576.json',
          passkey_json(24576, [True] * 9 + [False], [-1.0 - i / 10 for i in range(10)], keys))
    write(tmp_path / 'passkey-contig32k-s1-24576.json',
          passkey_json(24576, [i in (1, 2) for i in range(10)][::-1], [-5.0 - i for i in range(10)][::-1],
                       keys[::-1]))
    # at 4k (inside the window): not compared
    write(tmp_path / 'passkey-pose32k-s1-4096.json', passkey_json(4096, [True], [-1.0], keys[:1]))
    write(tmp_path / 'passkey-contig32k-s1-4096.json', passkey_json(4096, [True], [-1.0], keys[:1]))
    write(tmp_path / 'ppl-prose-original.json', {'ppl': {'2048': 10.0}})
    write(tmp_path / 'ppl-prose-pose32k-s1.json', {'ppl': {'2048': 10.2}})
    r = report(tmp_path)
    assert r.returncode == 0, r.stderr
    text = open(tmp_path / 'results.txt').read()
    # the Wilson interval of 9/10: centre (p + z^2/2n) / (1 + z^2/n), half-width z/(1 + z^2/n) sqrt(...)
    z, p, n = 1.96, 0.9, 10
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert f"9/10 [{c - h:.2f},{c + h:.2f}]" in text
    line = next(x for x in text.splitlines() if x.startswith('Contiguous 8k') and '24576' in x)
    n_pairs, a, b, mcn, dlogp, wil = line.split()[-6:]
    assert (int(n_pairs), int(a), int(b)) == (10, 9, 2)
    assert float(mcn) == pytest.approx(2 * 0.5 ** 7, rel=5e-3)  # 7 discordant, all one way
    # key i: PoSE -1 - i/10, Contiguous -5 - i
    d = [(-1.0 - i / 10) - (-5.0 - i) for i in range(10)]
    assert float(dlogp) == pytest.approx(np.median(d), abs=0.01)
    assert float(wil) == pytest.approx(2 / 2 ** 10, rel=5e-3)  # every difference positive: one pattern of 1024
    assert not any('4096' in x.split()[1:2] for x in text.splitlines() if x.startswith('Contiguous 8k '))
    assert '+  pose32k-s1 above contig32k-s1 past 16k' in text
    assert '+  pose32k-s1: prose perplexity at 2k within 3%' in text  # 10.2 <= 1.03 * 10


def test_report_refuses_an_empty_dir(tmp_path):
    r = report(tmp_path / 'missing')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'missing' in r.stderr
    (tmp_path / 'empty').mkdir()
    r = report(tmp_path / 'empty')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_gutenberg_books(monkeypatch):
    import importlib
    monkeypatch.setattr(sys, 'argv', ['demo_real.py'])  # its config runs at import: no pytest arguments
    demo_real = importlib.import_module('demo_real')
    text = ("header\n*** START OF THE PROJECT GUTENBERG EBOOK, ONE ***\nProduced by someone\nat a site\n\n"
            "Chapter 1\nIt was.\nEnd of the Project Gutenberg EBook of One\n\n*** END OF THE PROJECT ***\n"
            "licence\n*** START OF THIS PROJECT GUTENBERG EBOOK TWO ***\n\nTwo begins.\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK TWO ***\n")
    assert demo_real.gutenberg_books(text) == ["Chapter 1\nIt was.\n", "Two begins.\n"]
    assert demo_real.first_kb("a\n\nb" * 1000, 1).endswith('a\n') and len(demo_real.first_kb("x" * 10, 1)) == 10
