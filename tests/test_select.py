"""train.py's long-context checkpoint selection (select_by) on a toy run: by 'loss' it exports the
step of the lowest logged val loss (the weights of a run stopped at that step); by 'passkey' (under
FSDP2, 2 gloo processes) the step of the best logged passkey, whose logged pass count and key
log-likelihood transformers reproduces on the exported hf-best (greedy decoding + the official
regex, teacher forcing); selection never changes what is trained; a resume keeps the best step of
the log; bad selection settings are one clear line."""
import importlib
import io
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import ENV, TINY, make_data, start_train as start  # noqa: E402

# the tokenizer's corpus: the passkey prompt's sentences (so the prompt is short enough at L_c)
PASSKEY_TEXT = [
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.",
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "The pass key is 12345. Remember it. 67890 is the pass key.",
    "What is the pass key? The pass key is"] * 4
L_C, L_T, KEYS, SEED = 128, 256, 2, 1007  # train_len, target_len, select_keys, select_seed
# a learning rate so high that the val loss jumps at step 2: the lowest is not the last step's
RUN = TINY + [f'--train_len={L_C}', f'--target_len={L_T}', '--batch_size=4', '--eval_interval=1',
              '--save_interval=0', '--learning_rate=3e-2', '--warmup_iters=0',
              '--lr_decay_iters=8', f'--select_keys={KEYS}', '--select_ppl_docs=2']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """make_data's corpus (documents of 140-400 tokens: some val ones reach L_T) with a
    sentencepiece tokenizer trained here as its tokenizer (ids < 64 are its pieces too)."""
    import sentencepiece as spm
    d = make_data(str(tmp_path_factory.mktemp('select')), lens=(140, 400))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(PASSKEY_TEXT), model_writer=buf,
                                   vocab_size=400, model_type='bpe', split_digits=True,
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    with open(os.path.join(d, 'tokenizer.model'), 'wb') as f:
        f.write(buf.getvalue())
    meta = json.load(open(os.path.join(d, 'meta.json')))
    vocab = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    meta.update(tokenizer=os.path.join(d, 'tokenizer.model'), vocab_size=vocab)
    with open(os.path.join(d, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return d


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return out


def records(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def runs(data, tmp_path_factory):
    """The same toy run, 2 steps, selected by 'loss' (one process) and by 'passkey' (FSDP2 over 2
    gloo processes, the same global batch), side by side."""
    tmp = tmp_path_factory.mktemp('runs')
    common = RUN + [f'--data_dir={data}', '--max_iters=2']
    loss = start(*common, '--select_by=loss', f'--out_dir={tmp / "loss"}')
    passkey = start(*common, '--select_by=passkey', '--batch_size=2',
                    f'--out_dir={tmp / "passkey"}', nproc=2)
    finish(loss), finish(passkey)
    return tmp


def test_select_by_loss_exports_the_lowest_val_loss_step(runs, data, tmp_path):
    """hf-best = the weights of a run stopped at the step of the lowest val loss in log.jsonl (bit
    for bit), and selected.json names that step; the checks are logged at every eval, with their
    seconds; the run without selection trains exactly the same losses."""
    recs = records(runs / 'loss')
    val = {r['iter']: r['val_loss'] for r in recs if 'val_loss' in r}
    best = min(val, key=val.get)
    assert sorted(val) == [0, 1, 2] and best < 2, val  # the lowest is not the last step
    assert json.load(open(runs / 'loss/hf-best/selected.json'))['iter'] == best
    checks = [r for r in recs if 'select_by' in r]
    assert [r['iter'] for r in checks] == [0, 1, 2]
    for r in checks:
        assert sorted(r['passkey']) == sorted([str(L_C), str(L_T)])
        assert all(0 <= k <= KEYS for k in r['passkey'].values()) and r['passkey_trials'] == KEYS
        assert all(v < 0 for v in r['key_logprob'].values()) and r['ppl'] > 1
        assert r['select_s'] > 0 and r['best_iter'] == min(
            (i for i in val if i <= r['iter']), key=val.get)
    stopped = tmp_path / 'stopped'
    finish(start(*RUN, f'--data_dir={data}', f'--max_iters={best}', f'--out_dir={stopped}'))
    w_best = load_file(runs / 'loss/hf-best/model.safetensors')
    w_stop = load_file(stopped / 'hf/model.safetensors')
    assert w_best.keys() == w_stop.keys()
    assert all(torch.equal(w_best[k], w_stop[k]) for k in w_best)
    losses = {r['iter']: r['loss'] for r in records(stopped) if 'loss' in r}
    assert losses == {r['iter']: r['loss'] for r in recs if 'loss' in r and r['iter'] <= best}


def passkey_by_transformers(model_dir, tok_path):
    """(passed, mean key log-likelihood) of the select_keys trials at L_T on an HF dir, by
    transformers: greedy generate of 10 tokens + the official regex (first number == key), and the
    teacher-forced log p(key tokens | prompt) in nats."""
    from transformers import AutoModelForCausalLM

    from eval_passkey import build_passkey_prompt, make_passkey_prompt, make_trials
    from tokenizer import load_tokenizer
    tok = load_tokenizer(tok_path)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    passed, lps = 0, []
    for L, depth, key in make_trials([L_T, L_C], KEYS, None, SEED):
        if L != L_T:
            continue
        ids, _, n_filler, _ = build_passkey_prompt(tok, L, key, depth)
        prompt = tok.encode(make_passkey_prompt(n_filler, key, depth)[0], bos=True)
        assert ids[:len(prompt)] == prompt
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = hf(x).logits[0].float().log_softmax(-1)
            out = hf.generate(x[:, :len(prompt)], max_new_tokens=10, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=0)[0, len(prompt):]
        lps.append(sum(logp[j - 1, ids[j]].item() for j in range(len(prompt), len(ids))))
        m = re.search(r'\d+', tok.decode(out.tolist()))
        passed += m is not None and int(m.group()) == int(key)
    return passed, sum(lps) / len(lps)


def test_select_by_passkey_under_fsdp2(runs, data):
    """By 'passkey' under FSDP2 (rank 0 checks a gathered copy): hf-best is the step of the most
    passes at target_len in the log, ties broken by the key's log-likelihood; transformers gets that
    step's logged count and log-likelihood from hf-best; the checks and the losses are those of the
    one-process run."""
    recs, one = records(runs / 'passkey'), records(runs / 'loss')
    checks = {r['iter']: r for r in recs if 'select_by' in r}
    ranked = {i: (r['passkey'][str(L_T)], r['key_logprob'][str(L_T)]) for i, r in checks.items()}
    best = max(sorted(ranked), key=ranked.get)  # the earliest of equals
    assert json.load(open(runs / 'passkey/hf-best/selected.json'))['iter'] == best
    assert [i for i, r in checks.items() if r['best']][-1] == best
    passed, lp = passkey_by_transformers(str(runs / 'passkey/hf-best'),
                                         os.path.join(data, 'tokenizer.model'))
    assert passed == ranked[best][0] and abs(lp - ranked[best][1]) < 1e-3, (passed, lp, ranked)
    for r in one:
        twin = next(t for t in recs if t['iter'] == r['iter'] and t.keys() == r.keys())
        for k in ('loss', 'val_loss', 'ppl'):
            if k in r:
                assert abs(r[k] - twin[k]) < 1e-4 * max(1, abs(r[k])), (k, r, twin)
        if 'passkey' in r:
            assert r['passkey'] == twin['passkey']
            assert all(abs(v - twin['key_logprob'][L]) < 1e-3 for L, v in r['key_logprob'].items())


@pytest.fixture
def train(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['train.py', '--device=cpu'])  # the config, set as by a user
    return importlib.import_module('train')


def test_resume_keeps_the_best_of_the_log(train, monkeypatch, tmp_path):
    """resume_best: the last record flagged best in log.jsonl (which open_log cut at the
    checkpoint); an hf-best of a later step (exported after the checkpoint) is removed, one of the
    logged best step kept; a replacement cut between its renames is restored first."""
    monkeypatch.setattr(train, 'out_dir', str(tmp_path))
    monkeypatch.setattr(train, 'init_from', 'resume')
    log = [{'iter': 0, 'select_value': 5.0, 'best': True}, {'iter': 2, 'select_value': 4.0,
                                                           'best': True},
           {'iter': 4, 'select_value': 4.5, 'best': False}]
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in log))
    (tmp_path / 'hf-best').mkdir()
    for held, kept in ((6, False), (2, True)):
        (tmp_path / 'hf-best').mkdir(exist_ok=True)
        (tmp_path / 'hf-best/selected.json').write_text(json.dumps({'iter': held}))
        assert train.resume_best(4) == (2, 4.0)
        assert (tmp_path / 'hf-best').exists() == kept
    (tmp_path / 'hf-best').rename(tmp_path / 'hf-best.old')  # cut between the two renames
    (tmp_path / 'hf-best.tmp').mkdir()
    assert train.resume_best(4) == (2, 4.0)
    assert sorted(os.listdir(tmp_path)) == ['hf-best', 'log.jsonl']
    (tmp_path / 'log.jsonl').write_text('')  # no best yet: an hf-best is not this run's
    assert train.resume_best(0) is None and not (tmp_path / 'hf-best').exists()


@pytest.mark.parametrize('settings, needles', [
    (dict(select_by='best'), ["select_by='best'"]),
    (dict(select_by='loss', eval_interval=0), ['eval_interval']),
    (dict(select_by='passkey', select_keys=0), ['select_keys']),
    (dict(select_by='ppl', select_ppl_docs=0), ['select_ppl_docs']),
    (dict(select_by='loss', select_keys=-1), ['select_keys']),
])
def test_bad_select_settings(train, monkeypatch, settings, needles):
    for k, v in settings.items():
        monkeypatch.setattr(train, k, v)
    with pytest.raises(train.UserError) as e:
        train.check_select_config()
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_what_the_checks_need_is_checked_before_training(train, monkeypatch, data):
    """The passkey needs the model's tokenizer and prompts that fit train_len; the perplexity
    needs val documents of target_len tokens: one line that names the key to turn each off."""
    meta = json.load(open(os.path.join(data, 'meta.json')))
    split = train.open_split(data, 'val')
    val = (*split, None)
    monkeypatch.setattr(train, 'select_by', 'loss')
    monkeypatch.setattr(train, 'data_dir', data)
    margs = train.ModelArgs(vocab_size=meta['vocab_size'])
    for k, v in dict(train_len=L_C, target_len=L_T, select_keys=KEYS, select_seed=SEED,
                     select_ppl_docs=3).items():
        monkeypatch.setattr(train, k, v)
    sel = train.prepare_select({'val': val}, meta, [meta['tokenizer']], margs)
    assert [t[0] for t in sel['trials']] == [L_T] * KEYS + [L_C] * KEYS
    lens = np.diff(split[1])
    assert len(sel['docs']) == min(3, int((lens >= L_T).sum())) >= 1
    assert all(len(d) == L_T for d in sel['docs'])
    cases = [(dict(), None, ['select_keys=0', 'no tokenizer']),
             (dict(train_len=64), [meta['tokenizer']], ['length 64', 'select_keys=0']),
             (dict(select_keys=0, target_len=1000), None, ['select_ppl_docs=0', '1000 tokens'])]
    for settings, tok, needles in cases:
        with monkeypatch.context() as m:
            for k, v in settings.items():
                m.setattr(train, k, v)
            with pytest.raises(train.UserError) as e:
                train.prepare_select({'val': val}, meta, tok, margs)
            assert all(n in str(e.value) for n in needles), str(e.value)
    small = train.ModelArgs(vocab_size=64)  # the tokenizer's ids past the model's vocab
    with pytest.raises(train.UserError, match='vocab_size 64'):
        train.prepare_select({'val': val}, meta, [meta['tokenizer']], small)
