"""
PoSE fine-tuning of a RoPE LLaMA (and the full-length / RandPos baselines): one process, or torchrun + FSDP2.

  python train.py config/tiny_pose.py                                  # one process (CPU or one GPU)
  torchrun --standalone --nproc_per_node=8 train.py config/pose_16k.py  # one node, 8 GPUs
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
           --rdzv_endpoint=HOST:29500 train.py config/pose_16k.py       # two nodes (node_rank 1 on the other)

Each example is one document long enough for the method; SAMPLERS[method] picks train_len (L_c) of its
tokens and the position ids to train them at (PoSE: N chunks shifted by skip offsets u_i, all < target_len).
The target of a token is the token after it in the document, so documents need train_len + 1 tokens.
Draws are derived from (seed, step, micro-step, global example index): world size only decides which rank
computes which example, and a resumed run draws exactly what the uninterrupted run would have.

out_dir/ckpt-{iter}/   torch.distributed.checkpoint of model + optimizer, and train_state.json (iter, config,
                       model_args); written as ckpt-{iter}.tmp, renamed when complete
out_dir/latest         the name of the newest complete checkpoint (replaced atomically; older ones deleted after)
out_dir/log.jsonl      one JSON object per log line (train and val)
out_dir/hf/            the final model in Hugging Face format (max_position_embeddings = target_len)
"""
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import time
import warnings
from contextlib import nullcontext

import numpy as np

import rope
import sample_positions  # SAMPLERS (a module, so the configurator cannot mistake it for a config key)
from errors import UserError, is_interrupt, remove, run, writing
from data_format import open_split, read_meta
from model import gpu_peak_flops, wrap_blocks
from tokenizer import TOKENIZER_FILES, check_same_tokenizer
# torch and model.py are imported in init_torch(), after the config and the data are checked: a typo fails in a blink

# -----------------------------------------------------------------------------
# default config values; a config file or --key=value overrides them (configurator.py)
# I/O
init_from = 'scratch'  # an HF model dir to fine-tune | 'scratch' (a new model from model_args) | 'resume' (out_dir/latest)
out_dir = 'out'  # checkpoints, log.jsonl and the final HF export out_dir/hf
data_dir = 'data'  # prepare_data.py output: {train,val}.bin + .idx + meta.json
model_args = {}  # ModelArgs fields for init_from='scratch' (vocab_size defaults to the data's meta.json)
# PoSE
method = 'pose'  # 'pose' | 'randpos' | 'full' (full-length baseline: needs train_len == target_len)
train_len = 2048  # L_c: tokens per example (the model's original window for PoSE)
target_len = 16384  # L_t: position ids lie in [0, target_len); exported as max_position_embeddings
num_chunks = 2  # N: PoSE chunks per example
content = 'uniform'  # PoSE content offsets v_i: 'uniform' (random) | 'zero' (v_i = 0) | 'aligned' (v_i = u_i)
chunking = 'paper'  # PoSE chunk lengths: 'paper' (uniform composition) | 'official' (the authors' train_pose.py, N = 2)
doc_cap = 0  # cut every document to its first doc_cap + 1 tokens before sampling (official PoSE code: 5 * L_c); 0 = whole (Eq. 5)
full_min_doc = 0  # method='full': also documents of >= full_min_doc + 1 tokens, right-padded (unscored) to train_len; e.g. L_c = PoSE's documents (official code); 0 = only >= train_len + 1
rope_scaling = {'rope_type': 'linear'}  # HF semantics; no 'factor' -> target_len / original window; None: keep the model's own
# optimizer
batch_size = 1  # examples per device per micro-step
gradient_accumulation_steps = 8  # micro-steps per optimizer step; global batch = batch_size * this * world size
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
# system
device = ''  # 'cpu' | 'cuda' (under torchrun: cuda:LOCAL_RANK) | '' = cuda when available, else cpu
dtype = ''  # 'float32' | 'bfloat16' (fp32 master weights, bf16 compute) | '' = bfloat16 on cuda, else float32
compile = True  # torch.compile each block
activation_checkpointing = True  # recompute each block's activations in backward
# eval, logging, checkpoints
eval_interval = 100  # val loss every this many steps, at step 0 and at the end (0 = never)
eval_iters = 10  # val batches per eval (the same draws every time)
save_interval = 200  # checkpoint every this many steps, and at the end (0 = only at the end)
log_interval = 1  # print + log.jsonl every this many steps
seed = 1337  # data draws and scratch init
check_tokenizer = True  # refuse data whose meta.json tokenizer fingerprint differs from the model's (False: skip)
peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = look up the GPU in model.PEAK_FLOPS (n/a on CPU)
wandb_log = False  # log to Weights & Biases (imported only when True)
wandb_project = 'nanopose'  # wandb project
wandb_run_name = 'pose'  # wandb run name
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, dict))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

# what a resume may change: none of these alters what is trained (batch_size only with the same global batch)
RESUME_MAY_CHANGE = {'init_from', 'out_dir', 'max_iters', 'eval_interval', 'eval_iters', 'save_interval',
                     'log_interval', 'device', 'dtype', 'compile', 'activation_checkpointing', 'peak_flops',
                     'wandb_log', 'wandb_project', 'wandb_run_name', 'batch_size', 'check_tokenizer'}
STREAMS = {'train': 0, 'val': 1}  # separate random streams for the two splits

warnings.filterwarnings('ignore', message='torch.distributed is disabled')  # dcp in one process: intended
ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ  # launched by torchrun
rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
local_rank = int(os.environ.get('LOCAL_RANK', 0))
master = rank == 0
latest_path = os.path.join(out_dir, 'latest')
sampler_options = {'num_chunks': num_chunks, 'content': content, 'chunking': chunking} if method == 'pose' else {}
tokens_per_iter = batch_size * gradient_accumulation_steps * world_size * train_len
torch = dist = dcp = sd_api = ModelArgs = Transformer = None  # imported by init_torch()


# ---------------------------------------------------------------- the user's input, checked before any heavy work
def check_config():
    """Every config value: the one place where the settings enter (files are checked where they are read)."""
    try:  # the method, the lengths and the sampler's options: sample_positions checks its own inputs
        sample_positions.check_options(method, train_len, target_len, **sampler_options)
    except ValueError as e:
        raise UserError(str(e)) from None
    for bad, msg in [
        (device not in ('', 'cpu') and not device.startswith('cuda'), f"device='{device}': expected 'cpu', 'cuda' or '' (auto)"),
        (dtype not in ('', 'float32', 'bfloat16'), f"dtype='{dtype}': expected 'float32', 'bfloat16' or '' (auto) (fp16 would need a grad scaler)"),
        (method == 'full' and train_len != target_len, f"method='full' trains on target_len-token inputs: set train_len = target_len (got {train_len} and {target_len})"),
        (doc_cap != 0 and doc_cap < train_len, f'doc_cap={doc_cap}: must be 0 (whole documents) or >= train_len={train_len}'),
        (full_min_doc != 0 and (method != 'full' or not 1 <= full_min_doc <= train_len), f"full_min_doc={full_min_doc}: only for method='full', in [1, train_len={train_len}] (0 = off)"),
        (lr_schedule not in ('linear', 'cosine', 'constant'), f"lr_schedule='{lr_schedule}': expected 'linear', 'cosine' or 'constant'"),
        (min(batch_size, gradient_accumulation_steps, train_len, log_interval) < 1, 'batch_size, gradient_accumulation_steps, train_len and log_interval must be >= 1'),
        (min(max_iters, warmup_iters, lr_decay_iters, eval_interval, save_interval) < 0, 'max_iters, warmup_iters, lr_decay_iters, eval_interval and save_interval must be >= 0'),
        (eval_interval > 0 and eval_iters < 1, f'eval_iters={eval_iters}: must be >= 1 when eval_interval > 0 (eval_interval=0 turns evaluation off)'),
        (not (math.isfinite(learning_rate) and learning_rate > 0), f'learning_rate={learning_rate}: must be a finite number > 0'),
        (not 0 <= min_lr <= learning_rate, f'min_lr={min_lr}: must be in [0, learning_rate={learning_rate}]'),
        (not 0 <= beta1 < 1, f'beta1={beta1}: must be in [0, 1)'),
        (not 0 <= beta2 < 1, f'beta2={beta2}: must be in [0, 1)'),
        (not (math.isfinite(weight_decay) and weight_decay >= 0), f'weight_decay={weight_decay}: must be >= 0'),
        (not (math.isfinite(grad_clip) and grad_clip >= 0), f'grad_clip={grad_clip}: must be >= 0 (0 = off)'),
        (init_from not in ('scratch', 'resume') and not os.path.isfile(os.path.join(init_from, 'config.json')),
         f"init_from='{init_from}': not an HF model directory (no config.json); expected an HF dir, 'scratch' or 'resume'"),
        (init_from == 'resume' and not os.path.isfile(latest_path), f"init_from='resume': no checkpoint in out_dir='{out_dir}' ({latest_path} missing)"),
        (os.path.exists(out_dir) and not os.path.isdir(out_dir), f"out_dir='{out_dir}' is a file, not a directory"),
    ]:
        if bad:
            raise UserError(msg)
    parent = os.path.abspath(out_dir)  # out_dir is made when training starts; its first existing ancestor must let us
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"out_dir='{out_dir}': {parent} is not a writable directory")
    if rope_scaling is not None:
        rope.check(rope_scaling)


def read_train_state():
    """out_dir/latest -> (checkpoint dir, its train_state.json); a resume must not change the run."""
    ckpt_dir = os.path.join(out_dir, open(latest_path).read().strip())
    path = os.path.join(ckpt_dir, 'train_state.json')
    try:
        with open(path) as f:
            state = json.load(f)
        saved = state['config']
        keys = ('iter', 'model_args', 'tokenizer_src', 'world_size')
        missing = [k for k in keys if k not in state]
    except FileNotFoundError:
        raise UserError(f"{path}: missing ({latest_path} names an incomplete checkpoint)") from None
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{path}: unreadable train state ({type(e).__name__}: {e})") from None
    if missing:
        raise UserError(f"{path}: unreadable train state (no {missing[0]!r})")
    for k, v in saved.items():
        now = config.get(k)
        if k not in RESUME_MAY_CHANGE and now != v:
            raise UserError(f"init_from='resume': {k}={now!r} differs from the checkpoint's {k}={v!r} ({path}); "
                            "a resume may change only max_iters, the eval/log/save settings and the system ones (RESUME_MAY_CHANGE)")
    if batch_size * world_size != saved['batch_size'] * state['world_size']:
        raise UserError(f"init_from='resume': global batch {batch_size} x {world_size} processes differs from the "
                        f"checkpoint's {saved['batch_size']} x {state['world_size']} ({path})")
    return ckpt_dir, state


def load_split(split):
    tokens, offsets = open_split(data_dir, split)
    doc_lens = np.diff(offsets)
    # the last token of a document is only ever a target: a document offers len - 1 inputs
    # (method='full' has train_len == target_len, so this is also the >= target_len rule)
    eligible = np.flatnonzero(doc_lens - 1 >= (full_min_doc if method == 'full' and full_min_doc else train_len))
    if len(eligible) == 0:
        longest = int(doc_lens.max()) if len(doc_lens) else 0
        raise UserError(f"data_dir='{data_dir}' split '{split}': no document is long enough for method='{method}': "
                        f"need >= {train_len + 1} tokens (train_len={train_len} + the next-token target), "
                        f"the longest has {longest}")
    return tokens, offsets, eligible


def get_batch(data, split, step, micro_step):
    """x, y, pos: [batch_size, train_len] int64; y is the next token of x inside the document."""
    tokens, offsets, eligible = data[split]
    xs, ys, ps = [], [], []
    for b in range(batch_size):
        g = rank * batch_size + b  # global example index: rank r owns a contiguous block of the global batch
        rng = np.random.default_rng([seed, STREAMS[split], step, micro_step, g])
        d = eligible[rng.integers(len(eligible))]
        doc = tokens[offsets[d]:offsets[d + 1]][:doc_cap + 1 if doc_cap else None]
        n = min(len(doc) - 1, train_len)  # < train_len only for full_min_doc's short documents: padded below
        token_idx, position_ids = sample_positions.SAMPLERS[method](len(doc) - 1, n, target_len if n == train_len else n, rng, **sampler_options)
        pad = train_len - n  # right padding: token 0 as input, -100 as target, positions n .. train_len - 1
        xs.append(np.concatenate([doc[token_idx], np.zeros(pad, np.int64)]))
        ys.append(np.concatenate([doc[token_idx + 1], np.full(pad, -100, np.int64)]))
        ps.append(np.concatenate([position_ids, np.arange(n, train_len, dtype=np.int64)]))
    x, y, p = (torch.from_numpy(np.stack(a).astype(np.int64)) for a in (xs, ys, ps))  # [B, T] each
    if device_type == 'cuda':
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (x, y, p))
    return x, y, p


# ---------------------------------------------------------------- torch, the model, the optimizer
def init_torch():
    """Import torch (late: see the imports), resolve device / dtype, join the process group."""
    global torch, dist, dcp, sd_api, Transformer, ModelArgs, load_pretrained, save_pretrained, device, device_type, dtype
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as sd_api  # get_state_dict / set_state_dict / options
    from hf_checkpoint import load_pretrained, save_pretrained
    from model import ModelArgs, Transformer
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype = dtype or ('bfloat16' if device_type == 'cuda' else 'float32')
    config.update(device=device, dtype=dtype)
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device='{device}' but CUDA is not available (use --device=cpu)")
    if dtype == 'bfloat16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise UserError("dtype='bfloat16' is not supported on this GPU (e.g. V100): use --dtype=float32")
    if ddp:
        if device_type == 'cuda':
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo',
                                device_id=torch.device(device) if device_type == 'cuda' else None)
    torch.manual_seed(seed)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_model(meta, train_state):
    """-> (model in fp32 on cpu/meta, its ModelArgs, the tokenizer the export copies, rank 0's full state
    dict to scatter under torchrun or None)."""
    if init_from == 'resume':
        margs = ModelArgs(**train_state['model_args'])
        return Transformer(margs), margs, train_state['tokenizer_src'], None
    if init_from == 'scratch':
        unknown = set(model_args) - {f.name for f in dataclasses.fields(ModelArgs)}
        if unknown:
            raise UserError(f'model_args: unknown ModelArgs field(s) {sorted(unknown)}')
        a = {'vocab_size': meta['vocab_size'], 'max_position_embeddings': train_len,
             'bos_token_id': meta.get('bos_id'), 'eos_token_id': meta.get('eos_id'), **model_args}
        a['rope_scaling'] = rope.rescale(rope_scaling, None, a['max_position_embeddings'], target_len)
        margs = ModelArgs(**dict(a, max_position_embeddings=target_len))
        model = Transformer(margs)
        model.init_weights()
        tok = [p for p in meta.get('tokenizer_files') or [meta.get('tokenizer')] if p and os.path.isfile(p)]
        return model, margs, tok, None
    # an HF checkpoint: the new scaling is relative to its original window (rope.rescale).
    # fp32 master weights: FSDP2 / autocast compute in bf16, AdamW updates in fp32. Under torchrun only
    # rank 0 keeps the weights (one CPU copy per node, not one per GPU: 28 GB each for a 7B); the other
    # ranks check the checkpoint on the meta device and get their shards after fully_shard, below.
    overrides = {'max_position_embeddings': target_len}
    if rope_scaling is not None:
        overrides['rope_scaling'] = rope_scaling
    model = load_pretrained(init_from, dtype=torch.float32,
                            device='cpu' if master or not ddp else 'meta', **overrides)
    model.train()
    return model, model.args, os.path.abspath(init_from), model.state_dict() if ddp else None


def wrap_model(model, full_sd):
    """Activation checkpointing + torch.compile per block, then FSDP2 (torchrun) or the device. -> autocast."""
    wrap_blocks(model, activation_checkpointing, compile)
    if not ddp:
        model.to(device)
        return torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
    # FSDP2: each block is its own shard group (all-gathered just in time), then the root
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
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
    if full_sd is not None:  # init_from an HF dir: allocate the local shards, then rank 0 scatters the weights
        model.to_empty(device=device)
        sd_api.set_model_state_dict(model, full_sd if master else {},
                                    options=sd_api.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return nullcontext()


def make_optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                             lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')


def load_checkpoint(model, optimizer, ckpt_dir):
    msd, osd = sd_api.get_state_dict(model, optimizer)
    state = {'model': msd, 'optim': osd}
    try:
        dcp.load(state, checkpoint_id=ckpt_dir, no_dist=not dist.is_initialized())
    except (Exception, dcp.api.CheckpointException) as e:  # (a BaseException) a truncated / corrupt .distcp or
        if is_interrupt(e):                                # .metadata: the file's error (per rank), not ours
            raise KeyboardInterrupt from None
        failures = getattr(e, 'failures', None) or {}
        e = next((f[0] if isinstance(f, tuple) else f for f in failures.values()), e)
        first = (str(e).strip().splitlines() or [''])[0][:160]
        raise UserError(f"{ckpt_dir}: unreadable checkpoint, truncated or corrupt? ({type(e).__name__}: {first})") from None
    sd_api.set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optim'])


# ---------------------------------------------------------------- checkpoints, logging, export
def barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(model, optimizer, margs, it, tokenizer_src):
    """ckpt-{it}.tmp -> ckpt-{it}, then latest -> ckpt-{it}, then delete the older ones: a crash at any
    point leaves `latest` naming a complete checkpoint; a failure (full disk, Ctrl-C) removes the temp files."""
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
            state = {'iter': it, 'model_args': dataclasses.asdict(margs), 'config': config, 'world_size': world_size,
                     'tokens_seen': it * tokens_per_iter, 'tokenizer_src': tokenizer_src}
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
    """out_dir/log.jsonl; on resume, without what the interrupted run logged after the checkpoint (and a line
    cut by the kill)."""
    log_path = os.path.join(out_dir, 'log.jsonl')
    if init_from == 'resume' and os.path.exists(log_path):
        with open(log_path) as f:
            lines = [l for l in f if l.endswith('\n') and json.loads(l)['iter'] <= iter_num]
        with writing(log_path, temps=[log_path + '.tmp']):
            with open(log_path + '.tmp', 'w') as f:
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
        import wandb
        wandb.log(record, step=record['iter'])


def export(model, margs, tokenizer_src):
    """out_dir/hf in Hugging Face format, from rank 0 (a temp dir renamed into place by save_pretrained)."""
    sd = sd_api.get_model_state_dict(model, options=sd_api.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if master:
        if dtype == 'bfloat16':
            sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # bf16 on disk, as the Llama checkpoints
        with torch.device('meta'):  # only .args are used: save_pretrained writes the gathered state dict
            shell = Transformer(margs)
        hf_dir = os.path.join(out_dir, 'hf')
        if isinstance(tokenizer_src, list):  # (moved since? then export without them)
            tokenizer_src = [p for p in tokenizer_src if os.path.isfile(p)]
        elif tokenizer_src and not os.path.isdir(tokenizer_src):
            tokenizer_src = None
        if not tokenizer_src:
            print(f'note: no tokenizer files to copy into {hf_dir}', flush=True)
        with writing(hf_dir, temps=[hf_dir + '.tmp']):
            save_pretrained(shell, hf_dir, tokenizer_dir=tokenizer_src or None, state_dict=sd)
            for p in tokenizer_src if isinstance(tokenizer_src, list) else []:  # a tokenizer under a non-HF name
                canonical = 'tokenizer.json' if p.endswith('.json') else 'tokenizer.model'
                # only the tokenizer itself: its siblings (special_tokens_map.json, ...) keep their HF names
                if p.endswith(('.model', '.json')) and os.path.basename(p) not in TOKENIZER_FILES \
                        and not os.path.exists(os.path.join(hf_dir, canonical)):
                    shutil.copy(p, os.path.join(hf_dir, canonical))
        print(f'exported {hf_dir} (max_position_embeddings={margs.max_position_embeddings}, '
              f'rope_scaling={margs.rope_scaling})', flush=True)
    barrier()


# ---------------------------------------------------------------- train
def get_lr(it):
    if it < warmup_iters:  # (it + 1): the first step already learns
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_schedule == 'constant':
        return learning_rate
    decay_iters = lr_decay_iters or max_iters
    progress = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    coeff = 1.0 - progress if lr_schedule == 'linear' else 0.5 * (1.0 + math.cos(math.pi * progress))
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
        for k in range(eval_iters):  # the same val draws at every eval: step k, micro-step 0 of the val stream
            vx, vy, vpos = get_batch(data, 'val', k, 0)
            with autocast:
                total += model(vx, vpos, vy)[1].float()
    model.train()
    return mean_over_ranks(total / eval_iters)


def train_step(model, optimizer, data, autocast, it):
    """One optimizer step (gradient accumulation over micro-steps) -> (mean loss, grad norm or None).
    A non-finite loss or grad norm stops the run before the update: the weights and checkpoints stay good."""
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
    last = open(latest_path).read().strip() if os.path.exists(latest_path) else 'none'
    if not math.isfinite(train_loss):
        raise UserError(f'loss is {train_loss} at iter {it + 1}: stopping before the update; the last good '
                        f'checkpoint is {last} in {out_dir}', code=1)
    grad_norm = None
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, 'full_tensor') else grad_norm).item()
        if not math.isfinite(grad_norm):
            raise UserError(f'grad norm is {grad_norm} at iter {it + 1}: stopping before the update; the last '
                            f'good checkpoint is {last} in {out_dir}', code=1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device_type == 'cuda':
        torch.cuda.synchronize()
    return train_loss, lr, grad_norm


def main():
    check_config()
    ckpt_dir, train_state = read_train_state() if init_from == 'resume' else (None, None)
    meta = read_meta(data_dir)
    if init_from not in ('scratch', 'resume') and check_tokenizer:
        check_same_tokenizer(meta.get('tokenizer_sha256'), f"data_dir='{data_dir}' (tokenized with {meta.get('tokenizer')})",
                             init_from, 'check_tokenizer')
    data = {'train': load_split('train')}
    if eval_interval > 0:
        data['val'] = load_split('val')
    init_torch()
    model, margs, tokenizer_src, full_sd = build_model(meta, train_state)
    if meta['vocab_size'] > margs.vocab_size:
        raise UserError(f"data_dir='{data_dir}' was tokenized with vocab_size={meta['vocab_size']} > the model's {margs.vocab_size}")
    n_params, flops_per_token = sum(p.numel() for p in model.parameters()), model.flops_per_token(train_len)
    autocast = wrap_model(model, full_sd)
    full_sd = None
    optimizer = make_optimizer(model)
    iter_num = 0
    if init_from == 'resume':
        load_checkpoint(model, optimizer, ckpt_dir)
        iter_num = train_state['iter']
    peak = peak_flops or (gpu_peak_flops(torch.cuda.get_device_name()) if device_type == 'cuda' else 0.0)
    log_file = None
    if master:
        os.makedirs(out_dir, exist_ok=True)
        log_file = open_log(iter_num)
        print(f'{n_params / 1e6:.2f}M parameters, world size {world_size}, {tokens_per_iter:,} tokens per step, '
              f'method={method} train_len={train_len} target_len={target_len} rope_scaling={margs.rope_scaling}')
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    try:
        if eval_interval > 0 and iter_num == 0:
            v = estimate_val_loss(model, data, autocast)
            log(log_file, {'iter': 0, 'val_loss': v}, f'iter 0: val loss {v:.4f}')
        while iter_num < max_iters:
            t0 = time.time()
            train_loss, lr, grad_norm = train_step(model, optimizer, data, autocast, iter_num)
            dt = time.time() - t0
            iter_num += 1
            if iter_num % log_interval == 0 or iter_num == max_iters:
                tok_s = tokens_per_iter / dt
                mfu = flops_per_token * tok_s / (peak * world_size) if peak else None
                log(log_file, {'iter': iter_num, 'loss': train_loss, 'lr': lr, 'grad_norm': grad_norm,
                               'dt_ms': dt * 1000, 'tok_per_s': tok_s, 'mfu': mfu},
                    f'iter {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, ' +
                    (f'grad norm {grad_norm:.3f}, ' if grad_norm is not None else '') +
                    f"{dt * 1000:.0f} ms, {tok_s:,.0f} tok/s, mfu {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}")
            if eval_interval > 0 and (iter_num % eval_interval == 0 or iter_num == max_iters):
                v = estimate_val_loss(model, data, autocast)
                log(log_file, {'iter': iter_num, 'val_loss': v}, f'iter {iter_num}: val loss {v:.4f}')
            if iter_num == max_iters or (save_interval > 0 and iter_num % save_interval == 0):
                save_checkpoint(model, optimizer, margs, iter_num, tokenizer_src)
        optimizer = None
        gc.collect()
        export(model, margs, tokenizer_src)
    finally:
        if log_file is not None:
            log_file.close()


def cleanup():
    # every model/optimizer/tensor reference is gone with main's frame: collect, then destroy the process group;
    # without this a torchrun/gloo process aborts at exit ("terminate called without an active exception")
    gc.collect()
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    run(main, cleanup, interrupted=f'interrupted (Ctrl-C): stopped; {latest_path} names the last complete checkpoint')
