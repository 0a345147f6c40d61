"""
PoSE fine-tuning of a RoPE LLaMA (and the full-length / RandPos baselines): one process, or
torchrun + FSDP2.

  python train.py config/tiny_pose.py                                  # one process (CPU, one GPU)
  torchrun --standalone --nproc_per_node=8 train.py config/pose_16k.py  # one node, 8 GPUs
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
           --rdzv_endpoint=HOST:29500 train.py config/pose_16k.py       # two nodes (+ node_rank 1)

Each example is one document long enough for the method; SAMPLERS[method] picks train_len (L_c) of
its tokens and the position ids to train them at (PoSE: N chunks shifted by skip offsets u_i, all
< target_len). The target of a token is the token after it in the document, so documents need
train_len + 1 tokens. Draws are derived from (seed, step, micro-step, global example index): world
size only decides which rank computes which example, and a resumed run draws exactly what the
uninterrupted run would have.

out_dir/ckpt-{iter}/  torch.distributed.checkpoint of model + optimizer, and train_state.json (iter,
                      config, model_args, the data's identity); written as ckpt-{iter}.tmp, renamed
out_dir/latest        the name of the newest complete checkpoint (replaced atomically; older ones
                      deleted after)
out_dir/log.jsonl     one JSON object per log line (train and val)
out_dir/hf/           the final model in Hugging Face format (max_position_embeddings = target_len;
                      LoRA adapters merged into the weights)
out_dir/hf-best/      with select_by: the best step's model by that metric, and selected.json (its
                      step and checks)

A new run refuses an out_dir that holds another run; `init_from='resume'` continues it,
`overwrite=True` replaces it. Under torchrun every rank checks the user's input (config, data, model
files) before the process group starts and rank 0 alone prints the error line; torchrun itself then
still adds its ChildFailedError traceback and failure summary (its own output, not ours).
"""
import dataclasses
import gc
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as sd_api  # get_state_dict / set_state_dict
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import rope
import sample_positions  # SAMPLERS (a module: the configurator cannot take it for a config key)
from data_format import open_split, read_meta
from eval_passkey import make_trials, prompt_cache, run_trial, trial_prompt
from eval_ppl import select_docs, sliding_window_nll
from errors import UserError, is_interrupt, read_json, remove, run, write_json_atomic, writing
from hf_checkpoint import load_pretrained, save_pretrained
from model import ModelArgs, RMSNorm, Transformer, gpu_peak_flops, wrap_blocks
from tokenizer import TOKENIZER_FILES, check_same_tokenizer, load_tokenizer

# -----------------------------------------------------------------------------
# default config values; a config file or --key=value overrides them (configurator.py)
# I/O
init_from = 'scratch'  # an HF model dir to fine-tune | 'scratch' (model_args) | 'resume' (out_dir)
out_dir = 'out'  # checkpoints, log.jsonl and the final HF export out_dir/hf
overwrite = False  # a new run may replace the run already in out_dir (else: refused)
data_dir = 'data'  # prepare_data.py output: {train,val}.bin + .idx + meta.json
model_args = {}  # ModelArgs fields for init_from='scratch' (vocab_size: the data's meta.json)
# PoSE
method = 'pose'  # 'pose' | 'randpos' | 'full' (full-length baseline: needs train_len == target_len)
train_len = 2048  # L_c: tokens per example (the model's original window for PoSE)
target_len = 16384  # L_t: position ids lie in [0, target_len); exported as max_position_embeddings
num_chunks = 2  # N: PoSE chunks per example
content = 'uniform'  # PoSE content offsets v_i: 'uniform' (random) | 'zero' | 'aligned' (v_i = u_i)
chunking = 'paper'  # PoSE chunk lengths: 'paper' (uniform composition) | 'official' (N = 2)
# the official PoSE code caps documents at 5 * L_c; Eq. 5 samples from the whole document
doc_cap = 0  # sample from the first doc_cap + 1 tokens of every document; 0 = the whole document
# the official code's full-length baseline also trains on PoSE's (shorter) documents, right-padded
full_min_doc = 0  # method='full': also documents of >= full_min_doc + 1 tokens, padded; 0 = off
rope_scaling = {'rope_type': 'linear'}  # HF semantics; no 'factor': target_len / original window
# optimizer
batch_size = 1  # examples per device per micro-step
gradient_accumulation_steps = 8  # micro-steps per step; global batch: batch_size x this x ranks
max_iters = 1000  # optimizer steps
learning_rate = 2e-5  # peak learning rate
min_lr = 0.0  # where 'linear' and 'cosine' decay to
warmup_iters = 10  # linear warmup steps
lr_decay_iters = 0  # steps over which the lr decays to min_lr (0 = max_iters)
lr_schedule = 'linear'  # 'linear' (the paper) | 'cosine' | 'constant'
weight_decay = 0.0  # AdamW weight decay on matrices (the paper: Trainer defaults, i.e. 0)
beta1 = 0.9  # AdamW beta1
beta2 = 0.999  # AdamW beta2
grad_clip = 1.0  # clip the global grad norm to this (0 = off)
# LoRA (Hu et al. 2021) on frozen weights; LoRA+ (LongLoRA) also trains embeddings and norms
lora_rank = 0  # adapter rank r; 0 = full fine-tuning (every weight trains)
lora_alpha = 16.0  # the low-rank update is scaled by lora_alpha / lora_rank
lora_targets = ['q', 'k', 'v', 'o']  # the projections adapted in every block: q k v o gate up down
train_embeddings_norms = True  # LoRA+: embeddings, lm_head and norms train too (False: plain LoRA)
# system
device = ''  # 'cpu' | 'cuda' (under torchrun: cuda:LOCAL_RANK) | '' = cuda when available, else cpu
dtype = ''  # 'float32' | 'bfloat16' (fp32 master weights, bf16 compute) | '' = bf16 on cuda
compile = True  # torch.compile each block
activation_checkpointing = True  # recompute each block's activations in backward
# eval, logging, checkpoints
eval_interval = 100  # val loss every this many steps, at step 0 and at the end (0 = never)
eval_iters = 10  # val batches per eval (the same draws every time)
save_interval = 200  # checkpoint every this many steps, and at the end (0 = only at the end)
log_interval = 1  # print + log.jsonl every this many steps
# long-context checkpoint selection at every eval: quick checks logged, the best -> out_dir/hf-best
select_by = ''  # '' = off | 'passkey' (ties: key log-lik.) | 'ppl' (at target_len) | 'loss' (val)
select_keys = 5  # quick passkey trials at target_len and at train_len each (0 = no passkey check)
select_ppl_docs = 4  # val documents of >= target_len tokens for the ppl check (0 = no ppl check)
select_seed = 1007  # the checks' keys, depths and documents: not those of the evaluation runs
seed = 1337  # data draws and scratch init
check_tokenizer = True  # refuse data of another tokenizer than the model's (False: skip the check)
peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = model.PEAK_FLOPS's entry for the GPU
wandb_log = False  # log to Weights & Biases (imported only when True)
wandb_project = 'nanopose'  # wandb project
wandb_run_name = 'pose'  # wandb run name
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, dict, list))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

# what a resume may change: none of these alters what is trained (batch_size only with the same
# global batch; data_dir only to the same data, by its fingerprint)
RESUME_MAY_CHANGE = {'init_from', 'out_dir', 'overwrite', 'data_dir', 'max_iters', 'eval_interval',
                     'eval_iters', 'save_interval', 'log_interval', 'device', 'dtype', 'compile',
                     'activation_checkpointing', 'peak_flops', 'wandb_log', 'wandb_project',
                     'wandb_run_name', 'batch_size', 'check_tokenizer'}
# meta.json keys that make a prepared dataset what it is (its tokenizer, BOS/EOS convention and
# documents), recorded in every checkpoint: a resume must train on the same data
DATA_IDENTITY = ('tokenizer_sha256', 'vocab_size', 'dtype', 'bos_id', 'eos_id', 'add_bos',
                 'add_eos', 'splits')
STREAMS = {'train': 0, 'val': 1}  # separate random streams for the two splits
# lora_targets' names -> the projection of a block they adapt
LORA_TARGETS = {'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj',
                'o': 'self_attn.o_proj', 'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj',
                'down': 'mlp.down_proj'}
SCAN_TOKENS = 1 << 26  # tokens per block of the scan for ids past the vocab (128 MB of uint16)
RUN_FILE = re.compile(r'latest|hf|hf-best|ckpt-\d+')  # a run in out_dir: checkpoints, exports

warnings.filterwarnings('ignore', message='torch.distributed is disabled')  # dcp in one process
ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ  # launched by torchrun
rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
local_rank = int(os.environ.get('LOCAL_RANK', 0))
master = rank == 0
device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
dtype = dtype or ('bfloat16' if device_type == 'cuda' else 'float32')
if ddp and device_type == 'cuda':
    device = f'cuda:{local_rank}'
latest_path = os.path.join(out_dir, 'latest')
sampler_options = {'num_chunks': num_chunks, 'content': content, 'chunking': chunking} \
    if method == 'pose' else {}
tokens_per_iter = batch_size * gradient_accumulation_steps * world_size * train_len


# -----------------------------------------------------------------------------
# the user's input, checked before any heavy work
def check_config():
    """Every config value: the one place where the settings enter (files are checked where they
    are read)."""
    try:  # the method, the lengths, the sampler's options: sample_positions checks its own inputs
        sample_positions.check_options(method, train_len, target_len, **sampler_options)
    except ValueError as e:
        raise UserError(str(e)) from None
    rules = [
        (device == 'cpu' or device_type == 'cuda',
         f"device='{device}': expected 'cpu', 'cuda' or '' (auto)"),
        (dtype in ('float32', 'bfloat16'),
         f"dtype='{dtype}': expected 'float32', 'bfloat16' or '' (auto); "
         "fp16 would need a grad scaler"),
        (method != 'full' or train_len == target_len,
         f"method='full' trains on target_len-token inputs: set train_len = target_len "
         f"(got {train_len} and {target_len})"),
        (doc_cap == 0 or doc_cap >= train_len,
         f'doc_cap={doc_cap}: must be 0 (whole documents) or >= train_len={train_len}'),
        (full_min_doc == 0 or (method == 'full' and 1 <= full_min_doc <= train_len),
         f"full_min_doc={full_min_doc}: only for method='full', in [1, train_len={train_len}] "
         "(0 = off)"),
        (lr_schedule in ('linear', 'cosine', 'constant'),
         f"lr_schedule='{lr_schedule}': expected 'linear', 'cosine' or 'constant'"),
        (min(batch_size, gradient_accumulation_steps, train_len, log_interval) >= 1,
         'batch_size, gradient_accumulation_steps, train_len and log_interval must be >= 1'),
        (min(max_iters, warmup_iters, lr_decay_iters, eval_interval, save_interval) >= 0,
         'max_iters, warmup_iters, lr_decay_iters, eval_interval and save_interval must be >= 0'),
        (eval_interval == 0 or eval_iters >= 1,
         f'eval_iters={eval_iters}: must be >= 1 when eval_interval > 0 (0 turns evaluation off)'),
        (math.isfinite(learning_rate) and learning_rate > 0,
         f'learning_rate={learning_rate}: must be a finite number > 0'),
        (0 <= min_lr <= learning_rate,
         f'min_lr={min_lr}: must be in [0, learning_rate={learning_rate}]'),
        (0 <= beta1 < 1, f'beta1={beta1}: must be in [0, 1)'),
        (0 <= beta2 < 1, f'beta2={beta2}: must be in [0, 1)'),
        (math.isfinite(weight_decay) and weight_decay >= 0,
         f'weight_decay={weight_decay}: must be >= 0'),
        (math.isfinite(grad_clip) and grad_clip >= 0,
         f'grad_clip={grad_clip}: must be >= 0 (0 = off)'),
        (math.isfinite(peak_flops) and peak_flops >= 0,
         f'peak_flops={peak_flops}: must be >= 0 (0 = the GPU looked up)'),
        (init_from in ('scratch', 'resume')
         or os.path.isfile(os.path.join(init_from, 'config.json')),
         f"init_from='{init_from}': not an HF model directory (no config.json); "
         "expected an HF dir, 'scratch' or 'resume'"),
        (init_from != 'resume' or os.path.isfile(latest_path),
         f"init_from='resume': no checkpoint in out_dir='{out_dir}' ({latest_path} missing)"),
        (not os.path.exists(out_dir) or os.path.isdir(out_dir),
         f"out_dir='{out_dir}' is a file, not a directory"),
        (not wandb_log or importlib.util.find_spec('wandb') is not None,
         'wandb_log=True needs wandb (pip install wandb)'),
        (lora_rank >= 0, f'lora_rank={lora_rank}: must be >= 0 (0 = full fine-tuning)'),
        (math.isfinite(lora_alpha) and lora_alpha > 0,
         f'lora_alpha={lora_alpha}: must be a finite number > 0'),
        (len(lora_targets) > 0 and all(isinstance(t, str) and t in LORA_TARGETS
                                       for t in lora_targets)
         and len(set(lora_targets)) == len(lora_targets),
         f"lora_targets={lora_targets!r}: expected distinct names among "
         f"{', '.join(LORA_TARGETS)}"),
        (lora_rank > 0 or train_embeddings_norms,
         'train_embeddings_norms=False freezes the embeddings and norms of a LoRA run: it needs '
         'lora_rank > 0 (full fine-tuning trains every weight)'),
    ]
    for ok, msg in rules:
        if not ok:
            raise UserError(msg)
    if rope_scaling is not None:
        rope.check(rope_scaling)
    check_select_config()
    check_out_dir()
    check_device()


def check_select_config():
    """The checkpoint-selection keys (what they need of tokenizer and data: prepare_select)."""
    rules = [
        (select_by in ('', 'passkey', 'ppl', 'loss'),
         f"select_by='{select_by}': expected '' (off), 'passkey', 'ppl' or 'loss'"),
        (not select_by or eval_interval > 0,
         f"select_by='{select_by}' selects at the evals: needs eval_interval > 0"),
        (min(select_keys, select_ppl_docs) >= 0, 'select_keys and select_ppl_docs must be >= 0'),
        (select_by != 'passkey' or select_keys >= 1,
         f"select_by='passkey' needs select_keys >= 1 (got {select_keys})"),
        (select_by != 'ppl' or select_ppl_docs >= 1,
         f"select_by='ppl' needs select_ppl_docs >= 1 (got {select_ppl_docs})"),
    ]
    for ok, msg in rules:
        if not ok:
            raise UserError(msg)


def check_out_dir():
    """out_dir can be written, and holds no other run unless this one resumes or overwrites it."""
    parent = os.path.abspath(out_dir)  # made when training starts: its first existing ancestor
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"out_dir='{out_dir}': {parent} is not a writable directory")
    held = run_files()
    if held and init_from != 'resume' and not overwrite:
        raise UserError(f"out_dir='{out_dir}' holds another run ({', '.join(held)}): "
                        "--init_from=resume continues it, --overwrite=True replaces it")


def run_files():
    """The checkpoints, `latest` and export of a run in out_dir (its log.jsonl alone is not a run:
    nothing to resume or to lose but the losses of steps no checkpoint kept)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if RUN_FILE.fullmatch(n))


def check_device():
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device='{device}' but CUDA is not available (use --device=cpu)")
    if device_type == 'cuda':  # before any CUDA call: each torchrun rank on its own GPU
        torch.cuda.set_device(device)
    if dtype == 'bfloat16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise UserError("dtype='bfloat16' is not supported on this GPU (e.g. V100): "
                        "use --dtype=float32")


def read_train_state():
    """out_dir/latest -> (checkpoint dir, its train_state.json, its ModelArgs); a resume must not
    change the run."""
    try:
        with open(latest_path, encoding='utf-8') as f:
            name = f.read().strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not re.fullmatch(r'ckpt-\d+', name):
        raise UserError(f"{latest_path}: not the name of a checkpoint (ckpt-N); a corrupt file?")
    ckpt_dir = os.path.join(out_dir, name)
    path = os.path.join(ckpt_dir, 'train_state.json')
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing ({latest_path} names an incomplete checkpoint)")
    state = read_json(path)
    kinds = {'iter': int, 'model_args': dict, 'config': dict, 'world_size': int,
             'tokenizer_src': (str, list, type(None)), 'data': (dict, type(None))}
    for k, kind in kinds.items():
        v = state.get(k)  # (data, the data's identity, is absent from older checkpoints)
        if (k not in state and k != 'data') or not isinstance(v, kind) or isinstance(v, bool):
            raise UserError(f"{path}: unreadable train state ({k}={state.get(k)!r})")
    unknown = set(state['model_args']) - {f.name for f in dataclasses.fields(ModelArgs)}
    if unknown:
        raise UserError(f"{path}: unreadable train state (model_args: unknown {sorted(unknown)})")
    try:
        margs = ModelArgs(**state['model_args'])
    except (UserError, TypeError) as e:
        raise UserError(f"{path}: unreadable train state (model_args: {e})") from None
    check_resume(state, path)
    return ckpt_dir, state, margs


def check_resume(state, path):
    saved = {'lora_rank': 0, **state['config']}  # a checkpoint from before LoRA: full fine-tuning
    for k, v in saved.items():
        now = config.get(k)
        if k not in RESUME_MAY_CHANGE and now != v:
            raise UserError(f"init_from='resume': {k}={now!r} differs from the checkpoint's "
                            f"{k}={v!r} ({path}); a resume may change only max_iters, the "
                            "eval/log/save settings and the system ones (RESUME_MAY_CHANGE)")
    if batch_size * world_size != saved.get('batch_size', batch_size) * state['world_size']:
        raise UserError(f"init_from='resume': global batch {batch_size} x {world_size} processes "
                        f"differs from the checkpoint's {saved.get('batch_size')} x "
                        f"{state['world_size']} ({path})")
    if max_iters < state['iter']:
        raise UserError(f"init_from='resume': max_iters={max_iters} is below the checkpoint's "
                        f"iteration {state['iter']} ({path}): the export would be of the later "
                        "model")


def check_data(meta, state):
    """The data fits the model: on resume the data the checkpoint trained on (by its meta.json, not
    its path); from an HF model, data made with the model's tokenizer."""
    if state is not None:
        trained_on = state.get('data')
        if trained_on is None:  # a checkpoint without the data's identity: by its path
            trained_on = {'path': os.path.abspath(state['config'].get('data_dir', data_dir))}
            meta = dict(meta, path=os.path.abspath(data_dir))
        for k, v in trained_on.items():
            if meta.get(k) != v:
                raise UserError(f"init_from='resume': data_dir='{data_dir}' is not the data the "
                                f"checkpoint trained on: meta.json {k}={meta.get(k)!r}, the "
                                f"checkpoint's {v!r}")
    if init_from not in ('scratch', 'resume') and check_tokenizer:
        check_same_tokenizer(meta.get('tokenizer_sha256'),
                             f"data_dir='{data_dir}' (tokenized with {meta.get('tokenizer')})",
                             init_from, 'check_tokenizer')


# -----------------------------------------------------------------------------
# data
def load_split(split, vocab_size):
    """-> (tokens, offsets, ids of the documents long enough); every token id is < vocab_size."""
    tokens, offsets = open_split(data_dir, split)
    # a corrupt file is found here, not as an index error at some step (one pass: seconds per GB)
    top = max((int(tokens[i:i + SCAN_TOKENS].max()) for i in range(0, len(tokens), SCAN_TOKENS)),
              default=-1)
    if top >= vocab_size:
        raise UserError(f"data_dir='{data_dir}' split '{split}': token id {top} >= vocab_size "
                        f"{vocab_size} (meta.json): a corrupt {split}.bin?")
    doc_lens = np.diff(offsets)
    # the last token of a document is only ever a target: a document offers len - 1 inputs
    # (method='full' has train_len == target_len, so this is also the >= target_len rule)
    need = full_min_doc if method == 'full' and full_min_doc else train_len
    eligible = np.flatnonzero(doc_lens - 1 >= need)
    if len(eligible) == 0:
        longest = int(doc_lens.max()) if len(doc_lens) else 0
        raise UserError(f"data_dir='{data_dir}' split '{split}': no document is long enough for "
                        f"method='{method}': need >= {train_len + 1} tokens "
                        f"(train_len={train_len} + the next-token target), "
                        f"the longest has {longest}")
    return tokens, offsets, eligible


def get_batch(data, split, step, micro_step):
    """x, y, pos: [batch_size, train_len] int64; y is the next token of x inside the document."""
    tokens, offsets, eligible = data[split]
    xs, ys, ps = [], [], []
    for b in range(batch_size):
        g = rank * batch_size + b  # global example index: rank r owns a block of the global batch
        rng = np.random.default_rng([seed, STREAMS[split], step, micro_step, g])
        d = eligible[rng.integers(len(eligible))]
        doc = tokens[offsets[d]:offsets[d + 1]][:doc_cap + 1 if doc_cap else None]
        n = min(len(doc) - 1, train_len)  # < train_len only for full_min_doc's short documents
        token_idx, position_ids = sample_positions.SAMPLERS[method](
            len(doc) - 1, n, target_len if n == train_len else n, rng, **sampler_options)
        pad = train_len - n  # right padding: token 0 as input, -100 as target, positions n ..
        xs.append(np.concatenate([doc[token_idx], np.zeros(pad, np.int64)]))
        ys.append(np.concatenate([doc[token_idx + 1], np.full(pad, -100, np.int64)]))
        ps.append(np.concatenate([position_ids, np.arange(n, train_len, dtype=np.int64)]))
    x, y, p = (torch.from_numpy(np.stack(a).astype(np.int64)) for a in (xs, ys, ps))  # [B, T] each
    if device_type == 'cuda':
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (x, y, p))
    return x, y, p


# -----------------------------------------------------------------------------
# the model, the process group, the optimizer
def build_model(meta, resumed_args):
    """-> (model in fp32 on cpu/meta, its ModelArgs, the tokenizer the export copies, rank 0's full
    state dict to scatter under torchrun or None)."""
    if resumed_args is not None:
        return Transformer(resumed_args), resumed_args, None, None
    if init_from == 'scratch':
        unknown = set(model_args) - {f.name for f in dataclasses.fields(ModelArgs)}
        if unknown:
            raise UserError(f'model_args: unknown ModelArgs field(s) {sorted(unknown)}')
        a = {'vocab_size': meta['vocab_size'], 'max_position_embeddings': train_len,
             'bos_token_id': meta.get('bos_id'), 'eos_token_id': meta.get('eos_id'), **model_args}
        rs = rope.rescale(rope_scaling, None, a['max_position_embeddings'], target_len)
        try:
            margs = ModelArgs(**dict(a, max_position_embeddings=target_len, rope_scaling=rs))
        except TypeError as e:  # a value of the wrong kind that ModelArgs' checks do not name
            raise UserError(f'model_args: {e}') from None
        except UserError as e:
            raise UserError(f'model_args={model_args}: {e}') from None
        model = Transformer(margs)
        model.init_weights()
        tok = [p for p in meta.get('tokenizer_files') or [meta.get('tokenizer')]
               if p and os.path.isfile(p)]
        return model, margs, tok, None
    # an HF checkpoint: the new scaling is relative to its original window (rope.rescale).
    # fp32 master weights: FSDP2 / autocast compute in bf16, AdamW updates in fp32. Under torchrun
    # only rank 0 keeps the weights (one CPU copy per node, not one per GPU: 28 GB each for a 7B);
    # the other ranks check the checkpoint on the meta device, get their shards after fully_shard.
    overrides = {'max_position_embeddings': target_len}
    if rope_scaling is not None:
        overrides['rope_scaling'] = rope_scaling
    model = load_pretrained(init_from, dtype=torch.float32,
                            device='cpu' if master or not ddp else 'meta', **overrides)
    model.train()
    return model, model.args, os.path.abspath(init_from), model.state_dict() if ddp else None


def start_process_group():
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo',
                            device_id=torch.device(device) if device_type == 'cuda' else None)


def wrap_model(model, full_sd):
    """Activation checkpointing + torch.compile per block, then FSDP2 (torchrun) or the device.
    -> the autocast context of the forward."""
    wrap_blocks(model, activation_checkpointing, compile)
    if not ddp:
        model.to(device)
        bf16 = dtype == 'bfloat16'
        return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()
    # FSDP2: each block is its own shard group (all-gathered just in time), then the root
    mesh = init_device_mesh(device_type, (world_size,))
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == 'bfloat16' else MixedPrecisionPolicy()
    for block in model.layers:
        if full_sd is None:
            block.to(device)  # one unsharded fp32 block on the GPU at a time
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    if full_sd is None:
        model.to(device)  # embeddings, final norm, lm_head
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    if full_sd is not None:  # from an HF dir: allocate the local shards, rank 0 scatters weights
        model.to_empty(device=device)
        options = sd_api.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        sd_api.set_model_state_dict(model, full_sd if master else {}, options=options)
    return nullcontext()


def make_optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2),
                             fused=device_type == 'cuda')


def load_checkpoint(model, optimizer, ckpt_dir):
    # the metadata first: dcp would log two tracebacks of its own before failing on a broken one
    try:
        dcp.FileSystemReader(ckpt_dir).read_metadata()
    except Exception as e:
        raise UserError(f"{ckpt_dir}: unreadable checkpoint, .metadata missing or corrupt "
                        f"({type(e).__name__}: {str(e)[:160]})") from None
    msd, osd = sd_api.get_state_dict(model, optimizer)
    state = {'model': msd, 'optim': osd}
    try:
        dcp.load(state, checkpoint_id=ckpt_dir, no_dist=not dist.is_initialized())
    except (Exception, dcp.api.CheckpointException) as e:  # (a BaseException) a truncated .distcp:
        if is_interrupt(e):                                # the file's error (per rank), not ours
            raise KeyboardInterrupt from None
        failures = getattr(e, 'failures', None) or {}
        e = next((f[0] if isinstance(f, tuple) else f for f in failures.values()), e)
        first = (str(e).strip().splitlines() or [''])[0][:160]
        raise UserError(f"{ckpt_dir}: unreadable checkpoint, truncated or corrupt? "
                        f"({type(e).__name__}: {first})") from None
    sd_api.set_state_dict(model, optimizer, model_state_dict=state['model'],
                          optim_state_dict=state['optim'])


# -----------------------------------------------------------------------------
# LoRA / LoRA+: low-rank adapters on frozen weights, merged into them at export
class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight (and bias) plus a trainable low-rank update (Hu et al. 2021):
    y = x W^T + b + (alpha / rank) (x A^T) B^T. A [rank, in] gets nn.Linear's kaiming-uniform init,
    B [out, rank] zeros, so training starts at the base model. State dict: weight, bias (the base's
    names), lora_A, lora_B."""
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.weight, self.bias, self.scale = base.weight, base.bias, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) \
            + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_lora(model, rank, alpha, targets, embeddings_norms, frozen_dtype=torch.float32):
    """In place, before any wrapping: every weight frozen, a LoRALinear on each `targets`
    projection (LORA_TARGETS) of every block; embeddings_norms (LoRA+, LongLoRA: Chen et al. 2024):
    the token embeddings, lm_head and every RMSNorm train too. Biases (Qwen2's q/k/v) stay frozen.
    The frozen weights are then stored in frozen_dtype (bf16 halves them: what never updates needs
    no fp32 master copy); what trains keeps its dtype."""
    model.requires_grad_(False)
    for block in model.layers:
        for t in targets:
            parent, name = LORA_TARGETS[t].split('.')
            parent = getattr(block, parent)
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    if embeddings_norms:
        model.embed_tokens.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)  # (the same tensor when tied)
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.requires_grad_(True)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(frozen_dtype)


def merge_lora(sd, scale):
    """A full state dict with adapters -> the plain one, W' = W + scale * B A (in fp32, then the
    weight's dtype), without the lora_A / lora_B keys."""
    for key in [k for k in sd if k.endswith('.lora_A')]:
        prefix = key[:-len('lora_A')]
        a, b, w = sd.pop(key), sd.pop(prefix + 'lora_B'), sd[prefix + 'weight']
        sd[prefix + 'weight'] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return sd


# -----------------------------------------------------------------------------
# checkpoints, logging, export
def barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(model, optimizer, margs, it, tokenizer_src, data_identity):
    """ckpt-{it}.tmp -> ckpt-{it}, then latest -> ckpt-{it}, then delete the older ones: a crash at
    any point leaves `latest` naming a complete checkpoint; a failure (full disk, Ctrl-C) removes
    the temp files."""
    name = f'ckpt-{it}'
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + '.tmp')
    with writing(tmp, temps=[tmp, latest_path + '.tmp'] if master else []):
        if master:
            remove(tmp)  # the leftovers of a crashed save
        barrier()
        msd, osd = sd_api.get_state_dict(model, optimizer)
        dcp.save({'model': msd, 'optim': osd}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
        del msd, osd
        barrier()
        if master:
            state = {'iter': it, 'model_args': dataclasses.asdict(margs), 'config': config,
                     'world_size': world_size, 'tokens_seen': it * tokens_per_iter,
                     'tokenizer_src': tokenizer_src, 'data': data_identity}
            with open(os.path.join(tmp, 'train_state.json'), 'w') as f:
                json.dump(state, f, indent=1)
            remove(final)
            os.replace(tmp, final)
            with open(latest_path + '.tmp', 'w') as f:
                f.write(name + '\n')
            os.replace(latest_path + '.tmp', latest_path)
            for d in os.listdir(out_dir):  # older checkpoints, and the leftovers of crashed saves
                if re.fullmatch(r'ckpt-\d+(\.tmp)?', d) and d != name:
                    remove(os.path.join(out_dir, d))
    barrier()


def open_log(iter_num):
    """out_dir/log.jsonl; on resume, without what the interrupted run logged after the checkpoint
    (and a line cut by the kill)."""
    log_path = os.path.join(out_dir, 'log.jsonl')
    if init_from == 'resume' and os.path.exists(log_path):
        lines = []
        with open(log_path, 'rb') as f:
            for i, line in enumerate(f, 1):
                if not line.endswith(b'\n'):
                    break  # the last line, cut by a kill
                try:
                    it = json.loads(line)['iter']
                except (ValueError, TypeError, KeyError):  # (UnicodeDecodeError is a ValueError)
                    it = None
                if not isinstance(it, int):
                    raise UserError(f"{log_path}: line {i} is not a log record: a corrupt file? "
                                    "(remove the line to resume)")
                if it <= iter_num:
                    lines.append(line)
        with writing(log_path, temps=[log_path + '.tmp']):
            with open(log_path + '.tmp', 'wb') as f:
                f.writelines(lines)
            os.replace(log_path + '.tmp', log_path)
    return open(log_path, 'a' if init_from == 'resume' else 'w')


def log(log_file, record, line):
    if not master:
        return
    print(line, flush=True)
    with writing(log_file.name):
        log_file.write(json.dumps(record) + '\n')
        log_file.flush()
    if wandb_log:
        import wandb  # optional: only with wandb_log=True
        wandb.log(record, step=record['iter'])


def export(model, margs, tokenizer_src, name='hf'):
    """out_dir/<name> (the final model: hf) in Hugging Face format, from rank 0 (a temp dir renamed
    into place by save_pretrained)."""
    options = sd_api.StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = sd_api.get_model_state_dict(model, options=options)
    if master:
        if lora_rank:  # a plain checkpoint: the adapters merged into their weights, in fp32
            sd = merge_lora(sd, lora_alpha / lora_rank)
        if dtype == 'bfloat16':
            sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # bf16 on disk, as Llama's
        with torch.device('meta'):  # only .args are used: save_pretrained writes the gathered sd
            shell = Transformer(margs)
        hf_dir = os.path.join(out_dir, name)
        if isinstance(tokenizer_src, list):  # (moved since? then export without them)
            tokenizer_src = [p for p in tokenizer_src if os.path.isfile(p)]
        elif tokenizer_src and not os.path.isdir(tokenizer_src):
            tokenizer_src = None
        if not tokenizer_src:
            print(f'note: no tokenizer files to copy into {hf_dir}', flush=True)
        with writing(hf_dir, temps=[hf_dir + '.tmp']):
            save_pretrained(shell, hf_dir, tokenizer_dir=tokenizer_src or None, state_dict=sd)
            for p in tokenizer_src if isinstance(tokenizer_src, list) else []:
                # a tokenizer under a non-HF name, copied under its HF name too; only the tokenizer
                # itself: its siblings (special_tokens_map.json, ...) keep their HF names
                canonical = 'tokenizer.json' if p.endswith('.json') else 'tokenizer.model'
                if p.endswith(('.model', '.json')) and os.path.basename(p) not in TOKENIZER_FILES \
                        and not os.path.exists(os.path.join(hf_dir, canonical)):
                    shutil.copy(p, os.path.join(hf_dir, canonical))
        print(f'exported {hf_dir} (max_position_embeddings={margs.max_position_embeddings}, '
              f'rope_scaling={margs.rope_scaling})', flush=True)
    barrier()


# -----------------------------------------------------------------------------
# long-context checkpoint selection (select_by): at every eval, a quick passkey at target_len and
# at train_len (eval_passkey.py's trials, greedy + the official verdict + the key's log-likelihood)
# and the perplexity at target_len (eval_ppl.py's nanopose protocol at one length), logged with
# their cost; the best step by select_by -> out_dir/hf-best, its step in hf-best/selected.json
def prepare_select(data, meta, tokenizer_src, margs):
    """The checks' fixed inputs, checked before the training: the passkey trials (keys and depths
    from select_seed) with the model's tokenizer, every prompt built once; the val documents of the
    perplexity, cut to target_len. -> the selection's state (a dict), or None (select_by='')."""
    if not select_by:
        return None
    sel = {'tok': None, 'trials': [], 'hints': {}, 'docs': [], 'bos_id': meta.get('bos_id'),
           'best': None}
    if select_keys:
        src = tokenizer_src[0] if isinstance(tokenizer_src, list) and tokenizer_src \
            else tokenizer_src
        what = f"select_by='{select_by}': the quick passkey (select_keys={select_keys})"
        try:
            if not src:
                raise UserError('no tokenizer to build its prompts with (none in the model '
                                "directory or the data's meta.json)")
            sel['tok'] = load_tokenizer(src)
            sel['trials'] = make_trials(sorted({target_len, train_len}, reverse=True),
                                        select_keys, None, select_seed)
            for t in sel['trials']:
                hint = sel['hints'].get(t[0])
                ids, _, _, rec, _, _ = trial_prompt(sel['tok'], 'passkey', t, hint)
                sel['hints'][t[0]] = rec['n_filler']
                if max(ids) >= margs.vocab_size:
                    raise UserError(f"token id {max(ids)} >= the model's vocab_size "
                                    f"{margs.vocab_size}: not the model's tokenizer?")
        except UserError as e:
            raise UserError(f"{what} at lengths {target_len} and {train_len}: {e} "
                            "(select_keys=0 skips it)") from None
    if select_ppl_docs:
        sel['docs'] = select_ppl_documents(data['val'], sel['bos_id'])
    return sel


def select_ppl_documents(val, bos_id):
    """select_ppl_docs val documents of >= target_len tokens (a leading BOS not counted, as
    eval_ppl.py), drawn with select_seed, cut to target_len: each is one full window."""
    tokens, offsets, _ = val
    lens = np.diff(offsets)
    lead = np.zeros(len(lens), np.int64)
    if bos_id is not None:
        lead[lens > 0] = np.asarray(tokens[offsets[:-1][lens > 0]]) == bos_id
    if not (lens - lead >= target_len).any():
        raise UserError(f"select_ppl_docs={select_ppl_docs}: the perplexity at target_len="
                        f"{target_len} needs val documents of >= {target_len} tokens in data_dir="
                        f"'{data_dir}' (the longest has {int((lens - lead).max())}; "
                        "select_ppl_docs=0 skips it)")
    ids = select_docs(lens - lead, target_len, select_ppl_docs, select_seed, 'random')
    if len(ids) < select_ppl_docs and master:
        print(f'note: select_ppl_docs={select_ppl_docs} but only {len(ids)} val document(s) have '
              f'>= {target_len} tokens: the perplexity check is over {len(ids)}')
    return [np.asarray(tokens[offsets[i] + lead[i]:offsets[i] + lead[i] + target_len])
            for i in ids]


def select_net(model, margs):
    """The model the checks run on: in one process the training model itself; under FSDP2 a full
    copy on rank 0 (its weights gathered as export() gathers them; the other ranks get None): the
    checks run the blocks' forward_inference, which FSDP2's hooks (on forward) would not unshard."""
    if not ddp:
        return model
    options = sd_api.StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = sd_api.get_model_state_dict(model, options=options)
    if not master:
        return None
    if lora_rank:  # the plain model's keys: the adapters merged, as the export does
        sd = merge_lora(sd, lora_alpha / lora_rank)
    with torch.device('meta'):
        net = Transformer(margs)
    net.load_state_dict(sd, assign=True)
    return net.to(device, torch.bfloat16 if dtype == 'bfloat16' else torch.float32)


def quick_checks(net, sel, autocast):
    """The passkey (passed and mean key log-likelihood per length) and the perplexity at
    target_len of `net`, in eval mode without autograd (train mode restored) -> log fields."""
    from model import INFER_CHUNK  # (here: an int among the globals would be a config key)
    was_training, chunk = net.training, net.infer_chunk
    net.eval()
    net.infer_chunk = INFER_CHUNK  # the eval scripts' no-grad forward (the wrapped blocks unused)
    by_len, cache, cached = {}, prompt_cache(net), []
    try:
        with torch.no_grad(), autocast:
            for t in sel['trials']:
                r, cached = run_trial(net, sel['tok'], 'passkey', t, sel['hints'].get(t[0]), None,
                                      device, cache, cached)
                by_len.setdefault(str(t[0]), []).append(r)
            nll, n = 0.0, 0
            for d in sel['docs']:
                s, c = sliding_window_nll(net, d, target_len, add_bos=sel['bos_id'] is not None,
                                          bos_id=sel['bos_id'], device=device)
                nll, n = nll + s, n + c
    finally:
        net.infer_chunk = chunk
        net.train(was_training)
    out = {}
    if sel['trials']:
        out['passkey'] = {L: sum(r['pass'] for r in rs) for L, rs in by_len.items()}
        out['passkey_trials'] = select_keys
        out['key_logprob'] = {L: sum(r['key_logprob'] for r in rs) / len(rs)
                              for L, rs in by_len.items()}
    if sel['docs']:
        out['ppl'], out['ppl_tokens'] = math.exp(nll / n), n
    return out


def select_value(checks, val_loss):
    """The select_by metric of one eval: [passed at target_len, mean key log-likelihood] for
    'passkey' (higher is better), the perplexity or the val loss (lower is better)."""
    if select_by == 'passkey':
        return [checks['passkey'][str(target_len)], checks['key_logprob'][str(target_len)]]
    return checks['ppl'] if select_by == 'ppl' else val_loss


def better(value, best):
    """value beats best (None: nothing selected yet); a tie keeps the earlier step."""
    if best is None:
        return True
    return value > best if select_by == 'passkey' else value < best


def resume_best(iter_num):
    """Rank 0, after open_log: on resume the best (iter, value) so far from log.jsonl (its records
    end at the checkpoint), or None. An hf-best that is not that step's (exported after the
    checkpoint, or cut by the kill) is removed: the resumed run exports its best again as it gets
    there."""
    if init_from != 'resume':
        return None
    log_path, best = os.path.join(out_dir, 'log.jsonl'), None
    if os.path.exists(log_path):
        with open(log_path, encoding='utf-8') as f:
            for rec in map(json.loads, f):
                if rec.get('best') is True:
                    best = (rec['iter'], rec['select_value'])
    best_dir = os.path.join(out_dir, 'hf-best')
    if not os.path.exists(best_dir) and os.path.isdir(best_dir + '.old'):
        os.rename(best_dir + '.old', best_dir)  # a replacement cut between its two renames
    remove(best_dir + '.tmp')  # an export cut by the kill
    selected = os.path.join(best_dir, 'selected.json')
    held = read_json(selected).get('iter') if os.path.isfile(selected) else None
    if os.path.exists(best_dir) and (best is None or held != best[0]):
        remove(best_dir)
        print(f'note: removed {best_dir} (step {held}): not the best step up to the checkpoint '
              f'at iter {iter_num}', flush=True)
    return best


def select_step(model, margs, sel, it, val_loss, autocast, tokenizer_src, log_file):
    """At an eval: the quick checks on this step's weights (every rank takes part in the gather);
    when select_by improves, these weights -> out_dir/hf-best and hf-best/selected.json; then one
    log record of the checks, the selection and the seconds they took."""
    t0 = time.time()
    net = select_net(model, margs)
    improved, checks, value = False, None, None
    if master:
        checks = quick_checks(net, sel, autocast)
        value = select_value(checks, val_loss)
        improved = better(value, None if sel['best'] is None else sel['best'][1])
    del net
    if ddp:  # rank 0 decided: every rank takes part in the export's gather
        flag = [improved]
        dist.broadcast_object_list(flag, src=0)
        improved = flag[0]
    if improved:
        export(model, margs, tokenizer_src, 'hf-best')
    if not master:
        return
    if improved:
        sel['best'] = (it, value)
        write_json_atomic(os.path.join(out_dir, 'hf-best', 'selected.json'),
                          {'iter': it, 'select_by': select_by, 'value': value,
                           'val_loss': val_loss, **checks})
    rec = {'iter': it, **checks, 'select_by': select_by, 'select_value': value,
           'best': improved, 'best_iter': sel['best'][0], 'select_s': time.time() - t0}
    log(log_file, rec, select_line(rec))


def select_line(rec):
    """The console line of a selection record."""
    parts = []
    if 'passkey' in rec:
        parts.append('passkey ' + ', '.join(
            f"{k}/{rec['passkey_trials']} at {L} (key log-lik {rec['key_logprob'][L]:.2f})"
            for L, k in rec['passkey'].items()))
    if 'ppl' in rec:
        parts.append(f"ppl {rec['ppl']:.3f} at {target_len}")
    v = rec['select_value']
    v = f'{v[0]}/{select_keys}, {v[1]:.2f}' if select_by == 'passkey' else f'{v:.4f}'
    best = 'new best -> hf-best' if rec['best'] else f"best: iter {rec['best_iter']}"
    parts += [f'{select_by} {v}: {best}', f"{rec['select_s']:.1f} s"]
    return f"iter {rec['iter']}: " + '; '.join(parts)


# -----------------------------------------------------------------------------
# the training loop
def get_lr(it):
    if it < warmup_iters:  # (it + 1): the first step already learns
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_schedule == 'constant':
        return learning_rate
    decay_iters = lr_decay_iters or max_iters
    progress = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    coeff = 1.0 - progress if lr_schedule == 'linear' else cosine
    return min_lr + coeff * (learning_rate - min_lr)


def mean_over_ranks(t):
    if dist.is_initialized():
        dist.all_reduce(t)  # SUM: gloo has no AVG
        t = t / world_size
    return t.item()


def estimate_val_loss(model, data, autocast):
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for k in range(eval_iters):  # the same val draws at every eval: step k, micro-step 0
            vx, vy, vpos = get_batch(data, 'val', k, 0)
            with autocast:
                total += model(vx, vpos, vy)[1].float()
    model.train()
    return mean_over_ranks(total / eval_iters)


def last_checkpoint():
    """What a stop can point the user to: `latest`'s checkpoint, or that there is none yet."""
    if not os.path.isfile(latest_path):
        return f'no checkpoint was written: nothing to resume in {out_dir}'
    with open(latest_path, encoding='utf-8', errors='replace') as f:
        return f'the last complete checkpoint is {f.read().strip()} in {out_dir} ({latest_path})'


def train_step(model, optimizer, data, autocast, it):
    """One optimizer step (gradient accumulation over micro-steps) -> (mean loss, lr, grad norm or
    None). A non-finite loss or grad norm stops the run before the update: the weights and
    checkpoints stay good."""
    lr = get_lr(it)
    for group in optimizer.param_groups:
        group['lr'] = lr
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        x, y, pos = get_batch(data, 'train', it, micro_step)
        if ddp:  # reduce-scatter the gradients only on the last micro-step
            model.set_requires_gradient_sync(micro_step == gradient_accumulation_steps - 1)
        with autocast:
            _, loss = model(x, pos, y)
        (loss / gradient_accumulation_steps).backward()
        loss_sum += loss.detach().float()
    train_loss = mean_over_ranks(loss_sum / gradient_accumulation_steps)
    if not math.isfinite(train_loss):
        raise UserError(f'loss is {train_loss} at iter {it + 1}: stopping before the update; '
                        f'{last_checkpoint()}', code=1)
    grad_norm = None
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if hasattr(grad_norm, 'full_tensor'):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
        if not math.isfinite(grad_norm):
            raise UserError(f'grad norm is {grad_norm} at iter {it + 1}: stopping before the '
                            f'update; {last_checkpoint()}', code=1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device_type == 'cuda':
        torch.cuda.synchronize()
    return train_loss, lr, grad_norm


def log_step(log_file, model, it, loss, lr, grad_norm, dt, peak):
    tok_s = tokens_per_iter / dt
    mfu = model.estimate_mfu(train_len, tok_s, peak * world_size)
    record = {'iter': it, 'loss': loss, 'lr': lr, 'grad_norm': grad_norm, 'dt_ms': dt * 1000,
              'tok_per_s': tok_s, 'mfu': mfu}
    line = f'iter {it}: loss {loss:.4f}, lr {lr:.2e}, '
    line += f'grad norm {grad_norm:.3f}, ' if grad_norm is not None else ''
    line += f"{dt * 1000:.0f} ms, {tok_s:,.0f} tok/s, mfu "
    line += 'n/a' if mfu is None else f'{mfu * 100:.1f}%'
    log(log_file, record, line)


def prepare():
    """Everything the user gave us, checked, before the process group and the heavy work -> (data,
    meta, the checkpoint to resume or None, its train state or None, the model and its pieces)."""
    check_config()
    ckpt_dir, state, resumed_args = None, None, None
    if init_from == 'resume':
        ckpt_dir, state, resumed_args = read_train_state()
    meta = read_meta(data_dir)
    check_data(meta, state)
    data = {'train': load_split('train', meta['vocab_size'])}
    if eval_interval > 0:
        data['val'] = load_split('val', meta['vocab_size'])
    torch.manual_seed(seed)
    model, margs, tokenizer_src, full_sd = build_model(meta, resumed_args)
    if lora_rank:  # adapters before the wrappers; rank 0's full state dict then holds them too
        add_lora(model, lora_rank, lora_alpha, lora_targets, train_embeddings_norms,
                 torch.bfloat16 if dtype == 'bfloat16' else torch.float32)
        full_sd = model.state_dict() if full_sd is not None else None
    if meta['vocab_size'] > margs.vocab_size:
        raise UserError(f"data_dir='{data_dir}' was tokenized with vocab_size={meta['vocab_size']} "
                        f"> the model's {margs.vocab_size}")
    tokenizer_src = state['tokenizer_src'] if state else tokenizer_src
    return data, meta, ckpt_dir, state, model, margs, tokenizer_src, full_sd


def start_run(model, margs, iter_num):
    """Rank 0: out_dir made (a run it held removed first: overwrite=True, else refused above),
    log.jsonl opened, the run described. -> the log file."""
    if init_from != 'resume':
        for n in run_files():  # (but for the model this run starts from)
            if os.path.abspath(os.path.join(out_dir, n)) != os.path.abspath(init_from):
                remove(os.path.join(out_dir, n))
    os.makedirs(out_dir, exist_ok=True)
    log_file = open_log(iter_num)
    print(f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, world size '
          f'{world_size}, {tokens_per_iter:,} tokens per step, method={method} '
          f'train_len={train_len} target_len={target_len} rope_scaling={margs.rope_scaling}')
    if lora_rank:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA{'+' if train_embeddings_norms else ''}: rank {lora_rank} on "
              f"{','.join(lora_targets)}, {trainable / 1e6:.2f}M trainable parameters")
    if wandb_log:
        import wandb  # optional: only with wandb_log=True
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    return log_file


def main():
    try:
        data, meta, ckpt_dir, state, model, margs, tokenizer_src, full_sd = prepare()
        sel = prepare_select(data, meta, tokenizer_src, margs)
    except UserError as e:
        if not master:  # every rank checked the same input: rank 0 alone says what is wrong
            raise SystemExit(e.code) from None
        raise
    if ddp:
        start_process_group()
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = wrap_model(model, full_sd)
    del full_sd
    optimizer = make_optimizer(model)
    iter_num = 0
    if state is not None:
        load_checkpoint(model, optimizer, ckpt_dir)
        iter_num = state['iter']
    peak = peak_flops
    if not peak and device_type == 'cuda':
        peak = gpu_peak_flops(torch.cuda.get_device_name())
    data_identity = {k: meta.get(k) for k in DATA_IDENTITY}
    log_file = start_run(model, margs, iter_num) if master else None
    if sel is not None and master:
        sel['best'] = resume_best(iter_num)
    try:
        if eval_interval > 0 and iter_num == 0:
            v = estimate_val_loss(model, data, autocast)
            log(log_file, {'iter': 0, 'val_loss': v}, f'iter 0: val loss {v:.4f}')
            if sel is not None:
                select_step(model, margs, sel, 0, v, autocast, tokenizer_src, log_file)
        while iter_num < max_iters:
            t0 = time.time()
            loss, lr, grad_norm = train_step(model, optimizer, data, autocast, iter_num)
            dt = time.time() - t0
            iter_num += 1
            if iter_num % log_interval == 0 or iter_num == max_iters:
                log_step(log_file, model, iter_num, loss, lr, grad_norm, dt, peak)
            if eval_interval > 0 and (iter_num % eval_interval == 0 or iter_num == max_iters):
                v = estimate_val_loss(model, data, autocast)
                log(log_file, {'iter': iter_num, 'val_loss': v},
                    f'iter {iter_num}: val loss {v:.4f}')
                if sel is not None:
                    select_step(model, margs, sel, iter_num, v, autocast, tokenizer_src, log_file)
            if iter_num == max_iters or (save_interval > 0 and iter_num % save_interval == 0):
                save_checkpoint(model, optimizer, margs, iter_num, tokenizer_src, data_identity)
        optimizer = None
        gc.collect()
        export(model, margs, tokenizer_src)
    finally:
        if log_file is not None:
            log_file.close()


def cleanup():
    # every model/optimizer/tensor reference is gone with main's frame: collect, then destroy the
    # process group; without this a torchrun/gloo process aborts at exit ("terminate called without
    # an active exception")
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def interrupt(signum, frame):
    # the first Ctrl-C stops the run; later ones are ignored, so they cannot cut the cleanup short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


if __name__ == '__main__':
    signal.signal(signal.SIGINT, interrupt)
    run(main, cleanup, interrupted=lambda: f'interrupted (Ctrl-C): stopped; {last_checkpoint()}')
