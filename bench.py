"""
Benchmarks: what PoSE costs next to full-length fine-tuning (the paper's Fig. 3), training
throughput and MFU, eval throughput against transformers, sampler speed and data-preparation speed.

    python bench.py                                    # every CPU section, a tiny model (minutes)
    python bench.py --only=fig3 --train_len=128        # Fig. 3 only: L_t = L_c x {1,2,...,64}
    python bench.py --only=train --dtype=bfloat16 --compile=True --batch_size=16 --seq_len=256
    python bench.py --only=lora                        # LoRA+ vs full fine-tuning, SmolLM2-135M
    # one GPU, real shapes (config files; --key=value after them still wins):
    python bench.py config/bench/gpu_1b.py --only=train    # ~1B-shaped model, MFU at 2k
    python bench.py config/bench/gpu_7b.py --only=evalmem  # eval_ppl's peak memory, 128k window, 7B
    python bench.py config/bench/gpu_1b.py --only=fig3     # Fig. 3 at 2k x {1..64} (OOMs recorded)

Sections (`only`, comma-separated):
  fig3     one training step (fwd + bwd + AdamW) of PoSE (train_len tokens, position ids up to L_t)
           and of full-length fine-tuning (L_t tokens) for L_t = train_len * factors, on the same
           model, in one run. Memory: on CUDA torch.cuda.max_memory_allocated (everything). On CPU
           there is no allocator peak to read, so we count what a step must hold, exactly: the bytes
           of every tensor autograd saves for backward (unique storages, parameters excluded, via
           saved_tensors_hooks) = activation memory, plus parameters + gradients + the two AdamW
           moments. Transient buffers are not included.
  train    tokens/s and MFU of training steps at (batch_size, seq_len). MFU =
           model.flops_per_token(seq_len)
           * tokens/s / peak; peak = the datasheet bf16 peak of the GPU, or on CPU the measured peak
           of a large matmul on this machine (so a CPU MFU means "fraction of what torch.mm reaches
           here").
  eval     sliding-window perplexity throughput: eval_ppl.sliding_window_nll (our model, chunked
           loss) vs transformers' LlamaForCausalLM on the same checkpoint (tokens/s and ratio; same
           NLL checked).
  sampler  sample_positions.draws_per_second for pose / randpos at 2k->16k and 2k->128k.
  prepare  prepare_data.py (run as a process) on stdlib text with a given tokenizer vs the bare
           tokenizer's encode.
  evalmem  (CUDA) peak memory of eval_ppl.py on one window of eval_len input tokens: its
           sliding_window_nll over the model as load_model sets it up (the row-chunked no-grad
           forward, only the scored positions through lm_head, no [T, vocab] logits); weights
           included.
  lora     a LoRA+ training step (train.py's add_lora: rank lora_rank on lora_targets, embeddings
           and norms trained, frozen weights in bf16 under dtype=bfloat16) beside a full
           fine-tuning step: the same weights (the converted SmolLM2-135M by default), the same
           batch, in one run, alternating. Step time (median, min; CPU seconds), memory as fig3
           counts it (CUDA: the step's peak growth + parameters + AdamW state), trainable
           parameters, AdamW-state and gradient bytes as held after a step, and both first losses
           (equal: B = 0).
  evalcpu  one window of SmolLM2-135M's shape (or evalcpu_model), fp32 on this CPU: eval_ppl's NLL
           path vs transformers' model(x).logits + log_softmax. Peak RSS growth over the loaded
           models (VmHWM, reset through /proc/self/clear_refs after malloc_trim, so each run starts
           from what it really holds) and wall time (alternating, best of `iters`), with the ratios
           side by side; same NLL checked.
Results: printed tables + one JSON (`out`, written atomically) + the Fig. 3 plot (`plot`, needs
matplotlib).
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch

from data_format import corpus_files
from errors import PLOT_EXTS, UserError, check_writable, pyplot, run, save_figure, write_json_atomic
from eval_ppl import load_model, sliding_window_nll
from hf_checkpoint import load_pretrained, save_pretrained
from model import INFER_CHUNK, ModelArgs, Transformer, gpu_peak_flops, wrap_blocks
import sample_positions
from tokenizer import load_tokenizer
from train import LORA_TARGETS, add_lora

# -----------------------------------------------------------------------------
only = 'fig3,train,eval,sampler,prepare'  # sections (comma-separated): the names in SECTIONS below
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu' | 'cuda'
dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (autocast over fp32 weights, as train.py)
compile = False  # torch.compile each block (as train.py)
activation_checkpointing = False  # recompute each block in backward (as train.py)
threads = 0  # torch.set_num_threads (0 = torch's default)
seed = 1337  # random tokens, positions and init
# model shape (ModelArgs fields; the demo's tiny LLaMA by default)
dim = 256  # hidden size
n_layers = 4  # blocks
n_heads = 4  # attention heads
n_kv_heads = 4  # KV heads (GQA when < n_heads)
hidden_dim = 768  # SwiGLU intermediate size
vocab_size = 2048  # vocabulary
# fig3
train_len = 128  # L_c: PoSE's (fixed) training length
factors = [1, 2, 4, 8, 16, 32, 64]  # L_t = train_len * factor
fig3_batch = 1  # examples per step in the sweep
# train throughput
batch_size = 8  # examples per step
seq_len = 256  # tokens per example
# eval throughput / memory
eval_len = 1024  # window length (evalmem: the window whose peak memory is measured)
eval_tokens = 8192  # tokens scored per model in the eval section
# evalcpu: one long window of a real model shape, eval_ppl vs transformers (memory and time)
evalcpu_model = ''  # HF model dir; '' = random weights of SmolLM2-135M's shape (cost: same)
evalcpu_lengths = [4096, 8192, 16384]  # window lengths: our peak RSS growth at each (linear in T?)
evalcpu_hf_max = 8192  # transformers up to here only (its logits + log_softmax: 6.4 GB at 16k)
# lora: LoRA+ vs full fine-tuning, one step each on the same model and batch
lora_model = ''  # HF dir; '' = SMOLLM2_DIR when converted, else random weights of SmolLM2's shape
lora_rank = 8  # adapter rank (as train.py's lora_* keys; LoRA+: embeddings and norms train)
lora_alpha = 16.0  # the update is scaled by lora_alpha / lora_rank
lora_targets = ['q', 'k', 'v', 'o']  # the adapted projections: q k v o gate up down
lora_seq_len = 512  # tokens of the one example per step
# timing
warmup = 2  # untimed steps first (allocator, compile)
iters = 5  # timed steps; the median (and the min) is reported
pose_rounds = 20  # fig3: timed PoSE steps per L_t (cheap; round-robin over the lengths)
sampler_seconds = 1.0  # CPU seconds per sampler measurement (sample_positions.draws_per_second)
prepare_mb = 4.0  # MB of stdlib text for the prepare section
out = 'out-bench/bench.json'  # results JSON
plot = 'out-bench/fig3.png'  # Fig. 3 plot ('' = none)
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

cuda = device.startswith('cuda')
autocast = torch.autocast('cuda' if cuda else 'cpu', dtype=torch.bfloat16) if dtype == 'bfloat16' \
    else nullcontext()
results = {}  # section -> its numbers; written to `out` after every section


def sync():
    if cuda:
        torch.cuda.synchronize()


def build_model(max_len):
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     hidden_dim=hidden_dim, vocab_size=vocab_size, max_position_embeddings=max_len,
                     tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):  # a 7B shape is built on the GPU directly (no fp32 CPU copy)
        model = Transformer(args)
        model.init_weights()
    wrap_blocks(model, activation_checkpointing, compile)
    return model


def make_optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]  # (LoRA: what trains)
    return torch.optim.AdamW(params, lr=1e-4, fused=cuda)


def saved_activation_bytes(fn, params):
    """Run fn() (a forward) and return (its result, bytes of the tensors autograd saved for
    backward): unique storages only (a view and its base count once), parameters excluded (they
    exist anyway)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs and s.data_ptr() != 0:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = fn()
    return res, sum(storages.values())


def train_step(model, opt, x, y, pos, count_saved=False):
    """One fwd + bwd + AdamW step; returns (seconds, saved activation bytes or None)."""
    sync()
    t0 = time.perf_counter()
    with autocast:
        if count_saved:
            (_, loss), saved = saved_activation_bytes(lambda: model(x, position_ids=pos, targets=y),
                                                      model.parameters())
        else:
            (_, loss), saved = model(x, position_ids=pos, targets=y), None
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0, saved


def static_bytes(model):
    """Parameters + the gradients and AdamW exp_avg / exp_avg_sq of those that train (each the size
    of its parameter): what any training step holds."""
    return sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1)
               for p in model.parameters())


def matmul_peak_flops():
    """Peak FLOP/s of this device: the datasheet bf16 figure for known GPUs, else a measured large
    matmul."""
    if cuda:
        name = torch.cuda.get_device_name()
        if gpu_peak_flops(name):
            return gpu_peak_flops(name), f'datasheet bf16 ({name})'
    n = 4096 if cuda else 1024
    dt = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    for _ in range(2):
        a @ b
    sync()
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    flops = 2 * n ** 3 * reps / (time.perf_counter() - t0)
    return flops, f'measured {n}x{n} {dtype} matmul on {device}'


def human(nbytes):
    return f'{nbytes / 2 ** 20:,.1f} MiB'


# ----------------------------------------------------------------------------- fig3
# the paper's Fig. 3: memory and time of one training step, PoSE vs full-length, over target lengths


def fig3_batch_for(method, target, rng):
    """(x, y, position ids) of one step: PoSE's train_len tokens at fresh skip offsets (as in
    training), or full-length's L_t tokens at 0..L_t-1 (position ids None)."""
    T = train_len if method == 'pose' else target
    x = torch.from_numpy(rng.integers(0, vocab_size, (fig3_batch, T))).to(device)
    if method == 'full':
        return x, x, None
    pose = sample_positions.SAMPLERS['pose']
    pos = [pose(target, train_len, target, rng)[1] for _ in range(fig3_batch)]
    return x, x, torch.from_numpy(np.stack(pos)).to(device)


def fig3_memory(row, model, opt, step_batch):
    """One step to read the memory: CUDA's allocator peak, or on CPU the saved-for-backward
    count."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _, saved = train_step(model, opt, *step_batch, count_saved=not cuda)
    if cuda:
        row.update(memory_bytes=torch.cuda.max_memory_allocated(),
                   memory_what='torch.cuda.max_memory_allocated')
    else:
        row.update(activation_bytes=saved, static_bytes=static_bytes(model),
                   memory_bytes=saved + static_bytes(model),
                   memory_what='saved-for-backward + params/grads/AdamW')


def fig3_full_rows(model, opt, lengths, rng):
    """Full-length fine-tuning at each L_t: warmup + iters steps; after an OOM, the longer L_t are
    OOM too."""
    rows, oom = [], False
    for f, target in zip(factors, lengths):
        row = {'target_len': target, 'factor': f, 'method': 'full', 'tokens': target}
        rows.append(row)
        try:
            if oom:
                raise torch.cuda.OutOfMemoryError('a shorter length already ran out of memory')
            for _ in range(warmup):
                train_step(model, opt, *fig3_batch_for('full', target, rng))
            fig3_memory(row, model, opt, fig3_batch_for('full', target, rng))
            ts = [train_step(model, opt, *fig3_batch_for('full', target, rng))[0]
                  for _ in range(iters)]
            row.update(step_s=statistics.median(ts), step_s_min=min(ts))
        except torch.cuda.OutOfMemoryError:
            oom = True
            row.update(step_s=None, memory_bytes=None, oom=True)
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return rows


def fig3_pose_rows(model, opt, lengths, rng):
    """PoSE at each L_t. Every L_t has the same shapes, so any difference is the machine's noise:
    the lengths are timed round-robin (pose_rounds rounds), so a drift in the load spreads over all
    of them alike."""
    for _ in range(warmup):
        train_step(model, opt, *fig3_batch_for('pose', lengths[-1], rng))
    times = {t: [] for t in lengths}
    for r in range(pose_rounds):
        for target in (lengths if r % 2 == 0 else lengths[::-1]):
            times[target].append(train_step(model, opt, *fig3_batch_for('pose', target, rng))[0])
    rows = []
    for f, target in zip(factors, lengths):
        rows.append({'target_len': target, 'factor': f, 'method': 'pose', 'tokens': train_len,
                     'step_s': statistics.median(times[target]), 'step_s_min': min(times[target])})
        fig3_memory(rows[-1], model, opt, fig3_batch_for('pose', target, rng))
    return rows


def bench_fig3():
    rng = np.random.default_rng(seed)
    lengths = [train_len * f for f in factors]
    model = build_model(max(lengths))
    opt = make_optimizer(model)
    print(f"\n== fig3: training step, PoSE (L_c={train_len}) vs full-length, batch {fig3_batch}, "
          f"{dtype}, {device}")
    full = fig3_full_rows(model, opt, lengths, rng)
    pose = fig3_pose_rows(model, opt, lengths, rng)
    rows = [r for pair in zip(pose, full) for r in pair]
    print(f"{'L_t':>8} {'method':>6} {'tokens':>7} {'step s':>8} {'min s':>8} {'memory':>12}  "
          f"memory measured")
    for row in rows:
        mem = human(row['memory_bytes']) if row.get('memory_bytes') is not None else 'OOM'
        step, smin = (f"{row[k]:.3f}" if row.get(k) is not None else 'OOM'
                      for k in ('step_s', 'step_s_min'))
        print(f"{row['target_len']:>8} {row['method']:>6} {row['tokens']:>7} {step:>8} {smin:>8} "
              f"{mem:>12}  {row.get('memory_what', '')}")

    def spread(k):
        v = [r[k] for r in pose]
        return (max(v) - min(v)) / min(v)
    summary = {'pose_time_spread': spread('step_s'), 'pose_time_spread_min': spread('step_s_min'),
               'pose_memory_spread': spread('memory_bytes')}
    print(f"PoSE spread over L_t, (max-min)/min: step time "
          f"{100 * summary['pose_time_spread']:.1f}% (median), "
          f"{100 * summary['pose_time_spread_min']:.1f}% (min); memory "
          f"{100 * summary['pose_memory_spread']:.2f}% (flat: the same shapes at every L_t)")
    results['fig3'] = {'train_len': train_len, 'batch': fig3_batch, 'iters': iters, 'rows': rows,
                       **summary}
    if plot:
        plot_fig3(rows)


def plot_fig3(rows):
    # the numbers are in `out` already
    plt = pyplot(f"the Fig. 3 plot (plot={plot!r})", required=False)
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, style in (('full', 'o-'), ('pose', 's-')):
        rs = [r for r in rows if r['method'] == method and r['step_s'] is not None]
        x = [r['target_len'] for r in rs]
        label = 'Full-length' if method == 'full' else 'PoSE'
        axes[0].plot(x, [r['memory_bytes'] / 2 ** 30 for r in rs], style, label=label)
        axes[1].plot(x, [r['step_s'] for r in rs], style, label=label)
    for ax, title in zip(axes, ('memory (GiB)', 'time per step (s)')):
        ax.set_xscale('log', base=2)
        ax.set_xlabel('target length L_t (tokens)')
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f'Training cost vs target length (L_c = {train_len}, {device}, {dtype})')
    fig.tight_layout()
    save_figure(fig, plot)
    print(f'wrote {plot}')


# ----------------------------------------------------------------------------- train: tokens/s, MFU
def bench_train():
    model = build_model(seq_len)
    opt = make_optimizer(model)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
    for _ in range(warmup):
        train_step(model, opt, x, x, None)
    times = [train_step(model, opt, x, x, None)[0] for _ in range(iters)]
    dt = statistics.median(times)
    tok_s = batch_size * seq_len / dt
    fpt = model.flops_per_token(seq_len)
    peak, peak_what = matmul_peak_flops()
    n_params = sum(p.numel() for p in model.parameters())
    r = {'params': n_params, 'batch_size': batch_size, 'seq_len': seq_len, 'step_s': dt,
         'tokens_per_s': tok_s, 'flops_per_token': fpt, 'peak_flops': peak, 'peak_what': peak_what,
         'mfu': fpt * tok_s / peak}
    results['train'] = r
    print(f"\n== train: {n_params / 1e6:.2f}M params, batch {batch_size} x {seq_len}, {dtype}, "
          f"compile={compile}, {device}: {dt:.3f} s/step, {tok_s:,.0f} tokens/s, "
          f"MFU {100 * r['mfu']:.1f}% (peak {peak / 1e12:.2f} TFLOP/s, {peak_what})")


# ----------------------------------------------------------------------------- eval vs transformers
def bench_eval():
    try:
        import transformers
    except ImportError:
        print('\n== eval: skipped: transformers is not installed (a dev dependency: '
              'pip install -r requirements-dev.txt)')
        results['eval'] = {'skipped': 'transformers not installed'}
        return
    with tempfile.TemporaryDirectory() as tmp:
        # random weights: no tokenizer
        save_pretrained(build_model(eval_len), tmp, tokenizer_dir=None)
        ours = load_model(tmp, dtype=dtype, device=device)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.bfloat16 if dtype == 'bfloat16' else torch.float32,
            attn_implementation='sdpa').to(device).eval()
    doc = np.random.default_rng(seed).integers(0, vocab_size, eval_tokens)

    @torch.inference_mode()
    def ref_nll(tokens):  # the same disjoint windows, scored with transformers' full logits
        nll, n = 0.0, 0
        t = torch.as_tensor(tokens, device=device)
        for b in range(0, len(t) - 1, eval_len):
            w = t[b:b + eval_len + 1]
            logits = ref(input_ids=w[None, :-1]).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction='sum').item()
            n += len(w) - 1
        return nll, n

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        nll, n = fn(doc)
        sync()
        return nll / n, n / (time.perf_counter() - t0)

    ours_fn = lambda d: sliding_window_nll(ours, d, eval_len, device=device)  # noqa: E731
    ours_fn(doc[:eval_len + 1]), ref_nll(doc[:eval_len + 1])  # warmup
    runs = {'ours': [], 'hf': []}
    # alternate the two: on a shared machine load drifts; keep each one's best
    for _ in range(max(iters // 2, 1)):
        runs['ours'].append(timed(ours_fn))
        runs['hf'].append(timed(ref_nll))
    (nll_ours, tps_ours), (nll_ref, tps_ref) = (max(runs[k], key=lambda r: r[1])
                                                for k in ('ours', 'hf'))
    r = {'eval_len': eval_len, 'tokens': eval_tokens, 'ours_tokens_per_s': tps_ours,
         'hf_tokens_per_s': tps_ref, 'ratio': tps_ours / tps_ref, 'nll_ours': nll_ours,
         'nll_hf': nll_ref, 'transformers': transformers.__version__}
    results['eval'] = r
    print(f"\n== eval: window {eval_len}, {eval_tokens} tokens, {dtype}, {device}: "
          f"eval_ppl {tps_ours:,.0f} tok/s, transformers {tps_ref:,.0f} tok/s, "
          f"ratio {r['ratio']:.2f}x; mean NLL {nll_ours:.5f} vs {nll_ref:.5f}")


def bench_evalmem():
    model = build_model(eval_len).to(torch.bfloat16 if dtype == 'bfloat16' else torch.float32)
    model.eval()
    # as eval_ppl.load_model sets it: the row-chunked no-grad forward
    model.infer_chunk = INFER_CHUNK
    # one window: eval_len inputs
    doc = np.random.default_rng(seed).integers(0, vocab_size, eval_len + 1)
    torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    nll, n = sliding_window_nll(model, doc, eval_len, device=device)
    sync()
    r = {'eval_len': eval_len, 'peak_bytes': torch.cuda.max_memory_allocated(),
         'seconds': time.perf_counter() - t0, 'nll_per_token': nll / n,
         'weights_bytes': sum(p.numel() * p.element_size() for p in model.parameters())}
    results['evalmem'] = r
    print(f"\n== evalmem: eval_ppl's NLL over one {eval_len}-token window, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {dtype}: peak "
          f"{r['peak_bytes'] / 1e9:.1f} GB (weights {r['weights_bytes'] / 1e9:.1f} GB), "
          f"{r['seconds']:.1f} s")


# ----------------------------------------------------------------------------- evalmem, evalcpu
SMOLLM2_135M = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536,
                    vocab_size=49152,
                    tie_word_embeddings=True, rope_theta=1e5, norm_eps=1e-5)


def rss_mib():  # (current RSS, peak RSS since the last reset) of this process, MiB (Linux)
    status = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return int(status['VmRSS'].split()[0]) / 1024, int(status['VmHWM'].split()[0]) / 1024


def peak_growth(fn):
    """(result of fn(), peak RSS growth in MiB while it ran): freed heap goes back to the OS first
    and the peak counter is reset, so the growth is what fn itself allocated at its worst moment."""
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current RSS
    base = rss_mib()[0]
    r = fn()
    return r, rss_mib()[1] - base


def bench_evalcpu():
    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        path = evalcpu_model
        if not path:  # random weights of the real shape, saved once and loaded by both
            torch.manual_seed(seed)
            m = Transformer(ModelArgs(**SMOLLM2_135M, max_position_embeddings=max(evalcpu_lengths)))
            m.init_weights()
            save_pretrained(m, tmp, tokenizer_dir=None)
            path, m = tmp, None
        ours = load_model(path, dtype='float32')
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                attn_implementation='sdpa').eval()
    V = ours.args.vocab_size
    doc = np.random.default_rng(seed).integers(0, V, max(evalcpu_lengths) + 1)

    @torch.inference_mode()
    def hf_nll(T):  # what a plain transformers eval does: full logits, log_softmax, gather
        x = torch.as_tensor(doc[:T + 1])
        lp = torch.log_softmax(ref(input_ids=x[None, :-1]).logits[0].float(), -1)
        return -lp.gather(1, x[1:, None]).sum().item()
    # one window of T inputs
    ours_nll = lambda T: sliding_window_nll(ours, doc[:T + 1], T + 1)[0]  # noqa: E731
    # warm up: library workspaces and thread pools are not the method's memory
    ours_nll(256), hf_nll(256)
    rows = []
    for T in evalcpu_lengths:
        row = {'T': T}
        (row['nll_ours'], row['mib_ours']) = peak_growth(lambda: ours_nll(T))
        if T <= evalcpu_hf_max:
            (row['nll_hf'], row['mib_hf']) = peak_growth(lambda: hf_nll(T))
        rows.append(row)
        print(f"evalcpu: T={T} measured: {row}", flush=True)
    T = evalcpu_lengths[0]
    times, cpu = {'ours': [], 'hf': []}, {'ours': [], 'hf': []}
    # alternate: load drifts on a shared machine; keep each one's best
    for _ in range(max(iters // 2, 1)):
        for k, fn in (('ours', ours_nll), ('hf', hf_nll)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn(T)
            times[k].append(time.perf_counter() - t0)
            # CPU seconds of all threads: steadier than wall on a busy machine
            cpu[k].append(time.process_time() - c0)
    r = {'model': evalcpu_model or 'random weights, SmolLM2-135M shape', 'rows': rows,
         's_ours': min(times['ours']), 's_hf': min(times['hf']), 'times': times,
         'cpu_s_ours': min(cpu['ours']), 'cpu_s_hf': min(cpu['hf']), 'cpu_times': cpu,
         'threads': torch.get_num_threads()}
    results['evalcpu'] = r
    print(f"\n== evalcpu: {r['model']}, fp32, {r['threads']} threads; peak RSS growth over the "
          f"loaded models")
    print(f"{'T':>6} {'ours MiB':>9} {'hf MiB':>9} {'ours/hf':>8} {'NLL/token ours':>15} {'hf':>9}")
    for row in rows:
        hf = row.get('mib_hf')
        cells = ['-', '-', '-'] if hf is None else \
            [f"{hf:.0f}", f"{row['mib_ours'] / hf:.3f}", f"{row['nll_hf'] / row['T']:.5f}"]
        print(f"{row['T']:>6} {row['mib_ours']:>9.0f} {cells[0]:>9} {cells[1]:>8} "
              f"{row['nll_ours'] / row['T']:>15.5f} {cells[2]:>9}")
    print(f"time at T={T}: wall ours {r['s_ours']:.2f} s, transformers {r['s_hf']:.2f} s, "
          f"speedup {r['s_hf'] / r['s_ours']:.2f}x; CPU ours {r['cpu_s_ours']:.2f} s, "
          f"transformers {r['cpu_s_hf']:.2f} s, speedup {r['cpu_s_hf'] / r['cpu_s_ours']:.2f}x")


# ----------------------------------------------------------------------------- lora vs full
SMOLLM2_DIR = os.path.expanduser('~/.cache/nanopose/smollm2-135m-instruct')  # convert_gguf.py's


def lora_models(tmp):
    """(full, LoRA+) models of the same weights, wrapped as train.py wraps them, and what they
    are: lora_model, else the converted SmolLM2-135M, else random weights of its shape (the same
    cost)."""
    path, what = lora_model, lora_model
    if not path and os.path.isfile(os.path.join(SMOLLM2_DIR, 'config.json')):
        path, what = SMOLLM2_DIR, SMOLLM2_DIR
    if not path:
        torch.manual_seed(seed)
        m = Transformer(ModelArgs(**SMOLLM2_135M, max_position_embeddings=lora_seq_len))
        m.init_weights()
        save_pretrained(m, tmp, tokenizer_dir=None)
        path, what = tmp, 'random weights, SmolLM2-135M shape'
    models = []
    for lora in (False, True):
        model = load_pretrained(path, dtype=torch.float32)
        if lora:
            torch.manual_seed(seed)
            add_lora(model, lora_rank, lora_alpha, lora_targets, True,
                     torch.bfloat16 if dtype == 'bfloat16' else torch.float32)
        wrap_blocks(model, activation_checkpointing, compile)
        models.append(model.to(device).train())
    return models, what


def lora_memory(row, model, opt, batch):
    """One step's memory (fig3's count on CPU; on CUDA this model's own: the step's peak growth +
    its parameters and AdamW state), then the AdamW state and gradient bytes as held."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    _, saved = train_step(model, opt, *batch, count_saved=not cuda)
    opt_bytes = sum(t.nbytes for st in opt.state.values() for t in st.values()
                    if torch.is_tensor(t))
    if cuda:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        row.update(memory_bytes=torch.cuda.max_memory_allocated() - before + params + opt_bytes,
                   memory_what='step peak growth + params + AdamW state')
    else:
        row.update(activation_bytes=saved, memory_bytes=saved + static_bytes(model),
                   memory_what='saved-for-backward + params/grads/AdamW')
    with autocast:
        model(batch[0], batch[2], batch[1])[1].backward()
    row.update(optimizer_bytes=opt_bytes,
               grad_bytes=sum(p.grad.nbytes for p in model.parameters() if p.grad is not None))
    opt.zero_grad(set_to_none=True)


def bench_lora():
    with tempfile.TemporaryDirectory() as tmp:
        models, what = lora_models(tmp)
    x = torch.from_numpy(np.random.default_rng(seed).integers(
        0, models[0].args.vocab_size, (1, lora_seq_len))).to(device)
    batch = (x, x, None)  # (x, targets, position ids)
    opts = [make_optimizer(m) for m in models]
    with torch.no_grad(), autocast:  # B = 0: the adapted model starts as the base
        losses = [m(x, None, x)[1].item() for m in models]
    for _ in range(warmup):
        for m, o in zip(models, opts):
            train_step(m, o, *batch)
    times, cpu = [[], []], [[], []]
    for r in range(iters):  # alternating: a drift in the machine's load hits both alike
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            c0 = time.process_time()
            times[i].append(train_step(models[i], opts[i], *batch)[0])
            # CPU seconds of all threads: steadier than wall on a busy machine
            cpu[i].append(time.process_time() - c0)
    rows = {}
    for name, m, o, t, c, loss in zip(('full', 'lora'), models, opts, times, cpu, losses):
        rows[name] = {'params': sum(p.numel() for p in m.parameters()),
                      'trainable': sum(p.numel() for p in m.parameters() if p.requires_grad),
                      'step_s': statistics.median(t), 'step_s_min': min(t),
                      'cpu_s': statistics.median(c), 'times': t, 'cpu_times': c,
                      'first_loss': loss}
        lora_memory(rows[name], m, o, batch)
    full, lora = rows['full'], rows['lora']
    r = {'model': what, 'rank': lora_rank, 'alpha': lora_alpha, 'targets': lora_targets,
         'seq_len': lora_seq_len, 'iters': iters, 'threads': torch.get_num_threads(), 'rows': rows,
         'step_ratio': lora['step_s'] / full['step_s'],
         'step_ratio_min': lora['step_s_min'] / full['step_s_min'],
         'cpu_ratio': lora['cpu_s'] / full['cpu_s'],
         'memory_ratio': lora['memory_bytes'] / full['memory_bytes']}
    results['lora'] = r
    print(f"\n== lora: LoRA+ (rank {lora_rank} on {','.join(lora_targets)} + embeddings, norms) "
          f"vs full fine-tuning, {what}, 1 x {lora_seq_len} tokens, {dtype}, {device}")
    print(f"{'':>6} {'params':>9} {'trainable':>10} {'step s':>8} {'min s':>8} {'CPU s':>8} "
          f"{'memory':>12} {'AdamW':>12} {'grads':>12} {'first loss':>11}")
    for name, row in rows.items():
        print(f"{name:>6} {row['params'] / 1e6:>8.2f}M {row['trainable'] / 1e6:>9.2f}M "
              f"{row['step_s']:>8.3f} {row['step_s_min']:>8.3f} {row['cpu_s']:>8.3f} "
              f"{human(row['memory_bytes']):>12} {human(row['optimizer_bytes']):>12} "
              f"{human(row['grad_bytes']):>12} {row['first_loss']:>11.5f}")
    print(f"LoRA+ / full: step time {r['step_ratio']:.3f} (median), {r['step_ratio_min']:.3f} "
          f"(min), CPU time {r['cpu_ratio']:.3f}; memory {r['memory_ratio']:.3f} "
          f"({full['memory_what']})")


# ----------------------------------------------------------------------------- sampler, prepare
def bench_sampler():
    rows = []
    print('\n== sampler: draws per CPU second, one core')
    for method in ('pose', 'randpos'):
        for lc, lt in ((2048, 16384), (2048, 131072)):
            d = sample_positions.draws_per_second(method, lc, lt, seconds=sampler_seconds)
            rows.append({'method': method, 'train_len': lc, 'target_len': lt, 'draws_per_s': d})
            print(f"{method:>8} {lc}->{lt}: {d:,.0f} draws/s")
    results['sampler'] = rows


def bench_prepare():
    """prepare_data.py as a user runs it (a process: its start-up is in the time) vs the bare
    tokenizer."""
    texts, size = [], 0
    for f in corpus_files('python_stdlib'):  # the first prepare_mb MB of the stdlib, as whole files
        t = open(f, encoding='utf-8', errors='replace').read()
        texts.append(t)
        size += len(t.encode())
        if size >= prepare_mb * 2 ** 20:
            break
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare_data.py')

    def prepare(*args):
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"prepare_data.py {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'docs.jsonl')
        with open(src, 'w') as fh:
            for t in texts:
                fh.write(json.dumps({'text': t}) + '\n')
        prepare(f'--input={src}', f"--out_dir={os.path.join(tmp, 'tok')}", '--train_tokenizer=1024',
                '--tokenizer_sample_mb=1.0', '--max_docs=1')
        tok_path = os.path.join(tmp, 'tok', 'tokenizer.model')
        tok = load_tokenizer(tok_path)
        t0 = time.perf_counter()
        n_bare = sum(len(tok.encode(t, bos=True)) for t in texts)
        bare = time.perf_counter() - t0
        row = {'mb': size / 2 ** 20, 'tokens': n_bare, 'bare_s': bare}
        print(f"\n== prepare: {size / 2 ** 20:.1f} MB, {n_bare:,} tokens; bare tokenizer "
              f"{n_bare / bare:,.0f} tok/s")
        for num_proc in (1, 2):
            t0 = time.perf_counter()
            prepare(f'--input={src}', f"--out_dir={os.path.join(tmp, f'out{num_proc}')}",
                    f'--tokenizer={tok_path}', '--shuffle=False', f'--num_proc={num_proc}')
            dt = time.perf_counter() - t0
            row[f'prepare_s_proc{num_proc}'] = dt
            print(f"prepare_data.py num_proc={num_proc}: {n_bare / dt:,.0f} tok/s, "
                  f"overhead vs bare {100 * (dt / bare - 1):+.0f}% (process start-up included)")
    results['prepare'] = row


SECTIONS = {'fig3': bench_fig3, 'train': bench_train, 'eval': bench_eval, 'sampler': bench_sampler,
            'prepare': bench_prepare, 'evalmem': bench_evalmem, 'evalcpu': bench_evalcpu,
            'lora': bench_lora}


def main():
    sections = [s.strip() for s in only.split(',') if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            raise UserError(f"only: unknown section '{s}' (known: {', '.join(SECTIONS)})")
    if device not in ('cpu', 'cuda') and not device.startswith('cuda:'):
        raise UserError(f"device='{device}': expected 'cpu', 'cuda' or 'cuda:N'")
    if cuda and not torch.cuda.is_available():
        raise UserError(f"device='{device}' but CUDA is not available")
    if dtype not in ('float32', 'bfloat16'):
        raise UserError(f"dtype='{dtype}': expected 'float32' or 'bfloat16'")
    if 'evalmem' in sections and not cuda:
        raise UserError("only=evalmem measures CUDA peak memory: it needs device='cuda' "
                        "(config/bench/gpu_7b.py on a GPU)")
    if 'evalcpu' in sections and not os.path.isfile('/proc/self/clear_refs'):
        raise UserError('only=evalcpu reads peak RSS from /proc (Linux only)')
    if 'evalcpu' in sections and importlib.util.find_spec('transformers') is None:
        raise UserError('only=evalcpu compares with transformers: '
                        'pip install -r requirements-dev.txt')
    if 'lora' in sections and not (lora_rank >= 1 and lora_alpha > 0 and lora_targets and all(
            isinstance(t, str) and t in LORA_TARGETS for t in lora_targets)):
        raise UserError(f"lora_rank={lora_rank}, lora_alpha={lora_alpha}, "
                        f"lora_targets={lora_targets!r}: expected a rank >= 1, alpha > 0 and "
                        f"names among {', '.join(LORA_TARGETS)}")
    check_writable(out, 'out', exts=('.json',))
    if plot and 'fig3' in sections:
        check_writable(plot, 'plot', exts=PLOT_EXTS)
    if threads:
        torch.set_num_threads(threads)
    results.update(config={k: globals()[k] for k in (
        'device', 'dtype', 'compile', 'activation_checkpointing', 'threads', 'seed', 'dim',
        'n_layers', 'n_heads', 'n_kv_heads', 'hidden_dim', 'vocab_size')}, machine={
        'torch': torch.__version__, 'cpu_threads': torch.get_num_threads(), 'nproc': os.cpu_count(),
        'gpu': torch.cuda.get_device_name() if cuda else None})
    print(f"bench: {', '.join(sections)} on {device} ({torch.get_num_threads()} threads), {dtype}")
    for s in sections:
        SECTIONS[s]()
        # after every section: a crash later keeps what was measured
        write_json_atomic(out, results)
    print(f'wrote {out}')


if __name__ == '__main__':
    run(main, interrupted=f'interrupted (Ctrl-C): stopped; {out} holds the sections that finished')
