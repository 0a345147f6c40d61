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
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np

import sample_positions  # SAMPLERS (a module, so the configurator cannot mistake it for a config key)
from prepare_data import open_split, read_meta
# torch and model.py are imported below, after the config and the data are checked: a typo fails in a blink

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
peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = look up the GPU in PEAK_FLOPS (n/a on CPU)
wandb_log = False  # log to Weights & Biases (imported only when True)
wandb_project = 'nanopose'  # wandb project
wandb_run_name = 'pose'  # wandb run name
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, dict))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

# bf16 dense tensor-core peak FLOP/s per device, first substring match on torch.cuda.get_device_name()
PEAK_FLOPS = [('GH200', 989e12), ('H200', 989e12), ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12),
              ('H800', 989e12), ('B200', 2250e12), ('A100', 312e12), ('A800', 312e12), ('A10G', 70e12),
              ('A10', 125e12), ('L40S', 362e12), ('L40', 181e12), ('L4', 121e12), ('RTX 4090', 165e12),
              ('RTX 3090', 71e12), ('A6000', 155e12), ('V100', 125e12), ('T4', 65e12)]
ROPE_TYPES_WITH_ORIGINAL = ('yarn', 'yarn_pose', 'llama3', 'longrope')  # they need original_max_position_embeddings

warnings.filterwarnings('ignore', message='torch.distributed is disabled')  # dcp in one process: intended
ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ  # launched by torchrun
rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
local_rank = int(os.environ.get('LOCAL_RANK', 0))
master = rank == 0
model = optimizer = sd = x = y = pos = loss = dist = None  # module-level references that cleanup() drops


def cleanup():
    # drop every model/optimizer/tensor reference, collect, then destroy the process group: without this a
    # torchrun/gloo process aborts at exit ("terminate called without an active exception") in 5-25% of runs
    global model, optimizer, sd, x, y, pos, loss
    model = optimizer = sd = x = y = pos = loss = None
    gc.collect()
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def fail(msg, code=2):
    """The user's input (or the run) cannot go on: one line on stderr, no traceback."""
    if master:
        print(f'error: {msg}', file=sys.stderr, flush=True)
    cleanup()
    sys.exit(code)


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- validate the config before any heavy work
if device not in ('', 'cpu') and not device.startswith('cuda'):
    fail(f"device='{device}': expected 'cpu', 'cuda' or '' (auto)")
if dtype not in ('', 'float32', 'bfloat16'):
    fail(f"dtype='{dtype}': expected 'float32', 'bfloat16' or '' (auto) (fp16 would need a grad scaler)")
if method not in sample_positions.SAMPLERS:
    fail(f"method='{method}': expected one of {sorted(sample_positions.SAMPLERS)}")
if target_len < train_len:
    fail(f'target_len={target_len} < train_len={train_len}: target_len is the extended window, it must be >= train_len')
if method == 'full' and train_len != target_len:
    fail(f"method='full' trains on target_len-token inputs: set train_len = target_len (got {train_len} and {target_len})")
if method == 'pose' and not 1 <= num_chunks <= train_len:
    fail(f'num_chunks={num_chunks}: expected 1 <= num_chunks <= train_len={train_len}')
if method == 'pose' and content not in ('uniform', 'zero', 'aligned'):
    fail(f"content='{content}': expected 'uniform', 'zero' or 'aligned'")
if lr_schedule not in ('linear', 'cosine', 'constant'):
    fail(f"lr_schedule='{lr_schedule}': expected 'linear', 'cosine' or 'constant'")
if min(batch_size, gradient_accumulation_steps, train_len, log_interval) < 1 or max_iters < 0:
    fail('batch_size, gradient_accumulation_steps, train_len and log_interval must be >= 1, max_iters >= 0')
if rope_scaling is not None and not ('rope_type' in rope_scaling or 'type' in rope_scaling):
    fail(f"rope_scaling={rope_scaling!r}: needs a 'rope_type' (or None to keep the model's own)")
if init_from not in ('scratch', 'resume') and not os.path.isfile(os.path.join(init_from, 'config.json')):
    fail(f"init_from='{init_from}': not an HF model directory (no config.json); expected an HF dir, 'scratch' or 'resume'")
latest_path = os.path.join(out_dir, 'latest')
if init_from == 'resume' and not os.path.isfile(latest_path):
    fail(f"init_from='resume': no checkpoint in out_dir='{out_dir}' ({latest_path} missing)")

# ---------------------------------------------------------------- data
sampler_options = {'num_chunks': num_chunks, 'content': content, 'chunking': chunking} if method == 'pose' else {}
STREAMS = {'train': 0, 'val': 1}  # separate random streams for the two splits


def load_split(split):
    tokens, offsets = open_split(data_dir, split)
    doc_lens = np.diff(offsets)
    # the last token of a document is only ever a target: a document offers len - 1 inputs
    # (method='full' has train_len == target_len, so this is also the >= target_len rule)
    eligible = np.flatnonzero(doc_lens - 1 >= train_len)
    if len(eligible) == 0:
        longest = int(doc_lens.max()) if len(doc_lens) else 0
        raise ValueError(f"data_dir='{data_dir}' split '{split}': no document is long enough for method='{method}': "
                         f"need >= {train_len + 1} tokens (train_len={train_len} + the next-token target), "
                         f"the longest has {longest}")
    return tokens, offsets, eligible


def get_batch(split, step, micro_step):
    """x, y, pos: [batch_size, train_len] int64; y is the next token of x inside the document."""
    tokens, offsets, eligible = data[split]
    xs, ys, ps = [], [], []
    for b in range(batch_size):
        g = rank * batch_size + b  # global example index: rank r owns a contiguous block of the global batch
        rng = np.random.default_rng([seed, STREAMS[split], step, micro_step, g])
        d = eligible[rng.integers(len(eligible))]
        doc = tokens[offsets[d]:offsets[d + 1]]
        token_idx, position_ids = sample_positions.SAMPLERS[method](len(doc) - 1, train_len, target_len, rng, **sampler_options)
        xs.append(doc[token_idx])
        ys.append(doc[token_idx + 1])
        ps.append(position_ids)
    x, y, p = (torch.from_numpy(np.stack(a).astype(np.int64)) for a in (xs, ys, ps))  # [B, T] each
    if device_type == 'cuda':
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (x, y, p))
    return x, y, p


try:
    meta = read_meta(data_dir)
    data = {'train': load_split('train')}
    if eval_interval > 0:
        data['val'] = load_split('val')
    # a dry run: the sampler rejects bad options here
    sample_positions.SAMPLERS[method](train_len, train_len, target_len, np.random.default_rng(0), **sampler_options)
except (FileNotFoundError, ValueError, TypeError) as e:
    fail(str(e))

import torch  # noqa: E402  (see the imports at the top)
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_state_dict, set_model_state_dict, set_state_dict)

from model import ModelArgs, Transformer  # noqa: E402

device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
dtype = dtype or ('bfloat16' if device_type == 'cuda' else 'float32')
config.update(device=device, dtype=dtype)
if device_type == 'cuda' and not torch.cuda.is_available():
    fail(f"device='{device}' but CUDA is not available (use --device=cpu)")
if dtype == 'bfloat16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
    fail("dtype='bfloat16' is not supported on this GPU (e.g. V100): use --dtype=float32")
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

# ---------------------------------------------------------------- model
def original_window(cfg):
    """The window the checkpoint was pretrained with (HF config.json or ModelArgs fields). A new scaling
    replaces, not composes with, the checkpoint's own, and every HF factor is relative to this window:
    a Llama-3 / YaRN style scaling names it original_max_position_embeddings; a linear one (e.g. our own
    export: max_position_embeddings = L_t, factor = L_t / L_c) covers max_position_embeddings / factor;
    otherwise it is max_position_embeddings."""
    rs, mpe = cfg.get('rope_scaling') or cfg.get('rope_parameters') or {}, cfg['max_position_embeddings']
    if rs.get('original_max_position_embeddings'):
        return rs['original_max_position_embeddings']
    if rs.get('rope_type', rs.get('type')) == 'linear' and rs.get('factor'):
        return round(mpe / rs['factor'])
    return mpe


def resolve_rope_scaling(orig):
    rs = dict(rope_scaling)
    rs.setdefault('factor', target_len / orig)  # linear: position m is trained as m / factor
    if rs.get('rope_type', rs.get('type')) in ROPE_TYPES_WITH_ORIGINAL:
        rs.setdefault('original_max_position_embeddings', orig)  # HF would otherwise take max_position_embeddings
    return rs


full_sd = None  # init_from an HF dir under torchrun: rank 0's full state dict, scattered after fully_shard
iter_num, tokenizer_src = 0, None  # tokenizer_src: what the export copies tokenizer files from (a dir or a file list)
try:
    if init_from == 'resume':
        ckpt_dir = os.path.join(out_dir, open(latest_path).read().strip())
        with open(os.path.join(ckpt_dir, 'train_state.json')) as f:
            train_state = json.load(f)
        iter_num = train_state['iter']
        tokenizer_src = train_state['tokenizer_src']
        margs = ModelArgs(**train_state['model_args'])
        model = Transformer(margs)
    elif init_from == 'scratch':
        unknown = set(model_args) - {f.name for f in dataclasses.fields(ModelArgs)}
        if unknown:
            raise ValueError(f'model_args: unknown ModelArgs field(s) {sorted(unknown)}')
        a = {'vocab_size': meta['vocab_size'], 'max_position_embeddings': train_len,
             'bos_token_id': meta.get('bos_id'), 'eos_token_id': meta.get('eos_id'), **model_args}
        if rope_scaling is not None:
            a['rope_scaling'] = resolve_rope_scaling(original_window(a))
        a['max_position_embeddings'] = target_len
        margs = ModelArgs(**a)
        model = Transformer(margs)
        model.init_weights()
        tokenizer_src = [p for p in meta.get('tokenizer_files') or [meta.get('tokenizer')] if p and os.path.isfile(p)]
    else:
        with open(os.path.join(init_from, 'config.json')) as f:
            hf_config = json.load(f)
        overrides = {'max_position_embeddings': target_len}
        if rope_scaling is not None:
            overrides['rope_scaling'] = resolve_rope_scaling(original_window(hf_config))
        # fp32 master weights: FSDP2 / autocast compute in bf16, AdamW updates in fp32. Under torchrun only
        # rank 0 keeps the weights (one CPU copy per node, not one per GPU: 28 GB each for a 7B); the other
        # ranks check the checkpoint on the meta device and get their shards after fully_shard, below.
        model = Transformer.from_pretrained(init_from, dtype=torch.float32,
                                            device='cpu' if master or not ddp else 'meta', **overrides)
        full_sd = model.state_dict() if ddp else None  # rank 0's full weights, broadcast shard by shard
        model.train()
        margs = model.args
        tokenizer_src = os.path.abspath(init_from)
except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
    fail(f'{init_from}: {type(e).__name__}: {e}' if init_from != 'scratch' else str(e))
if meta['vocab_size'] > margs.vocab_size:
    fail(f"data_dir='{data_dir}' was tokenized with vocab_size={meta['vocab_size']} > the model's {margs.vocab_size}")
n_params = sum(p.numel() for p in model.parameters())
flops_per_token = model.flops_per_token(train_len)

# activation checkpointing and compile wrap each block; get_state_dict strips the wrappers' key prefixes
if activation_checkpointing or compile:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for i, block in enumerate(model.layers):
        if activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)  # non-reentrant torch.utils.checkpoint
        if compile:
            block = torch.compile(block)
        model.layers[i] = block
if ddp:  # FSDP2: each block is its own shard group (all-gathered just in time), then the root
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
        set_model_state_dict(model, full_sd if master else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        full_sd = None
    autocast = nullcontext()
else:
    model.to(device)
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()

params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                               {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
if init_from == 'resume':
    msd, osd = get_state_dict(model, optimizer)
    state = {'model': msd, 'optim': osd}
    dcp.load(state, checkpoint_id=ckpt_dir, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optim'])
    del msd, osd, state


def save_checkpoint(it):
    """ckpt-{it}.tmp -> ckpt-{it}, then latest -> ckpt-{it}, then delete the older ones: a crash at any
    point leaves `latest` naming a complete checkpoint."""
    name = f'ckpt-{it}'
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + '.tmp')
    if master and os.path.exists(tmp):
        shutil.rmtree(tmp)  # the leftovers of a crashed save
    barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({'model': msd, 'optim': osd}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    barrier()
    if master:
        state = {'iter': it, 'model_args': dataclasses.asdict(margs), 'config': config, 'world_size': world_size,
                 'tokens_seen': it * tokens_per_iter, 'tokenizer_src': tokenizer_src}
        with open(os.path.join(tmp, 'train_state.json'), 'w') as f:
            json.dump(state, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(latest_path + '.tmp', 'w') as f:
            f.write(name + '\n')
        os.replace(latest_path + '.tmp', latest_path)
        for d in os.listdir(out_dir):  # older checkpoints, and the leftovers of crashed saves
            if re.fullmatch(r'ckpt-\d+(\.tmp)?', d) and d != name:
                shutil.rmtree(os.path.join(out_dir, d))
    barrier()


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


@torch.no_grad()
def estimate_val_loss():
    model.eval()
    total = torch.zeros((), device=device)
    for k in range(eval_iters):  # the same val draws at every eval: step k, micro-step 0 of the val stream
        vx, vy, vpos = get_batch('val', k, 0)
        with autocast:
            total += model(vx, vpos, vy)[1].float()
    model.train()
    return mean_over_ranks(total / eval_iters)


def log(record, line):
    if not master:
        return
    print(line, flush=True)
    log_file.write(json.dumps(record) + '\n')
    log_file.flush()
    if wandb_log:
        wandb.log(record, step=record['iter'])


# ---------------------------------------------------------------- train
tokens_per_iter = batch_size * gradient_accumulation_steps * world_size * train_len
peak = peak_flops or (next((f for n, f in PEAK_FLOPS if n in torch.cuda.get_device_name()), 0.0)
                      if device_type == 'cuda' else 0.0)
if master:
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, 'log.jsonl')
    if init_from == 'resume' and os.path.exists(log_path):  # drop what the interrupted run logged after the
        with open(log_path) as f:                            # checkpoint (and a line cut by the kill)
            lines = [l for l in f if l.endswith('\n') and json.loads(l)['iter'] <= iter_num]
        with open(log_path + '.tmp', 'w') as f:
            f.writelines(lines)
        os.replace(log_path + '.tmp', log_path)
    log_file = open(log_path, 'a' if init_from == 'resume' else 'w')
    print(f'{n_params / 1e6:.2f}M parameters, world size {world_size}, {tokens_per_iter:,} tokens per step, '
          f'method={method} train_len={train_len} target_len={target_len} rope_scaling={margs.rope_scaling}')
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
try:
    if eval_interval > 0 and iter_num == 0:
        v = estimate_val_loss()
        log({'iter': 0, 'val_loss': v}, f'iter 0: val loss {v:.4f}')
    while iter_num < max_iters:
        t0 = time.time()
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group['lr'] = lr
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(gradient_accumulation_steps):
            x, y, pos = get_batch('train', iter_num, micro_step)
            if ddp:  # reduce-scatter the gradients only on the last micro-step
                model.set_requires_gradient_sync(micro_step == gradient_accumulation_steps - 1)
            with autocast:
                _, loss = model(x, pos, y)
            (loss / gradient_accumulation_steps).backward()
            loss_sum += loss.detach().float()
        train_loss = mean_over_ranks(loss_sum / gradient_accumulation_steps)
        if not math.isfinite(train_loss):  # before the optimizer step: the weights and checkpoints stay good
            fail(f'loss is {train_loss} at iter {iter_num + 1}: stopping before the update; the last good checkpoint is '
                 f"{open(latest_path).read().strip() if os.path.exists(latest_path) else 'none'} in {out_dir}", 1)
        grad_norm = None
        if grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, 'full_tensor') else grad_norm).item()
            if not math.isfinite(grad_norm):
                fail(f'grad norm is {grad_norm} at iter {iter_num + 1}: stopping before the update', 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_type == 'cuda':
            torch.cuda.synchronize()
        dt = time.time() - t0
        iter_num += 1
        if iter_num % log_interval == 0 or iter_num == max_iters:
            tok_s = tokens_per_iter / dt
            mfu = flops_per_token * tok_s / (peak * world_size) if peak else None
            log({'iter': iter_num, 'loss': train_loss, 'lr': lr, 'grad_norm': grad_norm, 'dt_ms': dt * 1000,
                 'tok_per_s': tok_s, 'mfu': mfu},
                f'iter {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, ' +
                (f'grad norm {grad_norm:.3f}, ' if grad_norm is not None else '') +
                f"{dt * 1000:.0f} ms, {tok_s:,.0f} tok/s, mfu {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}")
        if eval_interval > 0 and (iter_num % eval_interval == 0 or iter_num == max_iters):
            v = estimate_val_loss()
            log({'iter': iter_num, 'val_loss': v}, f'iter {iter_num}: val loss {v:.4f}')
        if iter_num == max_iters or (save_interval > 0 and iter_num % save_interval == 0):
            save_checkpoint(iter_num)

    # ------------------------------------------------------------ export in HF format (rank 0)
    optimizer = None
    gc.collect()
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if master:
        if dtype == 'bfloat16':
            sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # bf16 on disk, as the Llama checkpoints
        with torch.device('meta'):  # only .args are used: save_pretrained writes the gathered state dict
            export = Transformer(margs)
        hf_dir = os.path.join(out_dir, 'hf')
        if isinstance(tokenizer_src, list):  # (moved since? then export without them)
            tokenizer_src = [p for p in tokenizer_src if os.path.isfile(p)]
        elif tokenizer_src and not os.path.isdir(tokenizer_src):
            tokenizer_src = None
        if not tokenizer_src:
            print(f'note: no tokenizer files to copy into {hf_dir}', flush=True)
        export.save_pretrained(hf_dir, tokenizer_dir=tokenizer_src or None, state_dict=sd)  # temp dir + rename
        export = sd = None
        for p in tokenizer_src if isinstance(tokenizer_src, list) else []:  # a tokenizer under a non-HF name
            canonical = 'tokenizer.json' if p.endswith('.json') else 'tokenizer.model'
            if p.endswith(('.model', '.json')) and os.path.basename(p) != 'tokenizer_config.json' \
                    and not os.path.exists(os.path.join(hf_dir, canonical)):
                shutil.copy(p, os.path.join(hf_dir, canonical))
        print(f'exported {hf_dir} (max_position_embeddings={margs.max_position_embeddings}, '
              f'rope_scaling={margs.rope_scaling})', flush=True)
    barrier()
finally:
    if master:
        log_file.close()
    cleanup()
