"""
The LLaMA family (Llama 1/2/3, Mistral, Qwen2) in plain PyTorch, for PoSE.

PoSE only changes position ids, so everything here takes arbitrary (non-contiguous) position ids:
RoPE cos/sin are computed once per forward, in fp32, from the batch's own position ids (no cached
tables, positions up to 1M work), for every RoPE type of rope.py. Hugging Face directories
(config.json, weights, export) are read and written by hf_checkpoint.py, with transformers-identical
logits; this file never touches a directory. Below the model: its FLOPs per token and MFU, and the
per-block wrapping (activation checkpointing, torch.compile) that train.py and bench.py share.
"""
import math
import numbers
from dataclasses import InitVar, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

import rope
from errors import UserError

try:  # flash-attn's causal kernel on CUDA bf16/fp16; SDPA everywhere else
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

LOSS_CHUNK = 1024  # tokens per lm_head + fp32 cross-entropy chunk (Transformer.loss_chunk); the
# loss peaks at ~4 [chunk, vocab] fp32 blocks whatever T is (0.5 GB each at chunk 1024, vocab 128k)
# rows per chunk of the no-grad eval forward (Transformer.infer_chunk, set by the eval scripts; 0 =
# off): norms, projections and the MLP run on this many rows, only attention sees all of T
INFER_CHUNK = 512
# the LLaMA variants (hf_checkpoint.ARCHS: their HF class names)
ARCH_NAMES = ('llama', 'mistral', 'qwen2')

# -----------------------------------------------------------------------------
@dataclass
class ModelArgs:
    dim: int = 64  # hidden_size
    n_layers: int = 2  # num_hidden_layers
    n_heads: int = 4  # num_attention_heads
    n_kv_heads: int | None = None  # num_key_value_heads (GQA); None -> n_heads
    head_dim: int | None = None  # None -> dim // n_heads
    hidden_dim: int = 172  # intermediate_size of the SwiGLU MLP
    vocab_size: int = 256
    norm_eps: float = 1e-5  # rms_norm_eps
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF semantics, `rope_type` key; None = plain RoPE
    max_position_embeddings: int = 2048
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v (and only there)
    tie_word_embeddings: bool = False
    arch: str = 'llama'  # 'llama' | 'mistral' | 'qwen2'
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    # Mistral: forward refuses sequences longer than this (see Attention)
    sliding_window: int | None = None
    where: InitVar[str] = 'rope_scaling'  # rope_scaling's source, named in errors (a config.json)

    def __post_init__(self, where):
        for k in ('dim', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'hidden_dim',
                  'vocab_size', 'max_position_embeddings', 'sliding_window'):
            v = getattr(self, k)
            if not (v is None and k in ('n_kv_heads', 'head_dim', 'sliding_window') or is_size(v)):
                raise UserError(f"{k}={v!r}: expected a positive integer")
        for k in ('norm_eps', 'rope_theta'):
            v = getattr(self, k)
            if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                    and v > 0):
                raise UserError(f"{k}={v!r}: expected a finite number > 0")
        if self.head_dim is None and self.dim % self.n_heads:
            raise UserError(f"n_heads={self.n_heads} does not divide dim={self.dim} "
                            "(or give head_dim)")
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.arch not in ARCH_NAMES:
            raise UserError(f"arch={self.arch!r} is not supported "
                            f"(use one of {sorted(ARCH_NAMES)})")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of "
                            f"n_kv_heads={self.n_kv_heads}")
        if self.qkv_bias != (self.arch == 'qwen2'):
            raise UserError(f"qkv_bias={self.qkv_bias} does not match arch={self.arch!r} "
                             "(only qwen2 has q/k/v biases)")
        self.rope_scaling = rope.normalize(self.rope_scaling, self.head_dim,
                                           self.max_position_embeddings, where)


def is_size(v):  # a positive int (not a bool)
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# -----------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, scale in the model dtype (as transformers)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x, cos, sin):
    # x [B, T, H, d]; the rotate_half convention of HF checkpoints (first half / second half pairs)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def project(self, x, cos, sin):
        """x [B, T, dim] -> q [B, T, H, d], k, v [B, T, Hkv, d], RoPE applied to q and k."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v):
        """Causal attention over token order (not position ids) -> [B, T, H * d], before o_proj. k,
        v may hold S > T tokens (a KV cache: the earlier tokens first); query i then sees keys up to
        S - T + i."""
        B, T, S = q.shape[0], q.shape[1], k.shape[1]
        if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            # [B, T, H, d]; GQA natively; S > T: bottom-right causal
            y = flash_attn_func(q, k, v, causal=True)
        else:
            # K/V heads shared without copies; on CPU this is SDPA's flash kernel: no [H, T, T]
            # scores. After a cache, SDPA's is_causal would align the mask top-left: an explicit
            # [T, S] mask instead
            mask = None
            if S != T:
                mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), attn_mask=mask,
                                               is_causal=mask is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
            y = y.transpose(1, 2)  # [B, T, H, d]
        return y.reshape(B, T, self.n_heads * self.head_dim)

    def forward(self, x, cos, sin):
        return self.o_proj(self.attend(*self.project(x, cos, sin)))


class MLP(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_inference(self, x, cos, sin, chunk, cache=None, layer=0):
        """The same block without autograd, x updated in place: everything but attention itself runs
        on `chunk` rows at a time, so the only [T, ...] tensors are x, q, k, v and the attention
        output (no [T, hidden_dim] MLP activations, cache-sized temporaries). cache (KVCache): x's
        tokens come after the cached ones, and their keys / values are appended to it."""
        (B, T, _), attn = x.shape, self.self_attn
        # filled chunk by chunk: never a second copy
        q = x.new_empty(B, T, attn.n_heads, attn.head_dim)
        k, v = (x.new_empty(B, T, attn.n_kv_heads, attn.head_dim) for _ in range(2))
        for i in range(0, T, chunk):
            j = min(i + chunk, T)
            h = self.input_layernorm(x[:, i:j])
            q[:, i:j], k[:, i:j], v[:, i:j] = attn.project(h, cos[:, i:j], sin[:, i:j])
        if cache is not None:
            # [B, S + T, Hkv, d]: the earlier tokens' keys / values first
            if cache.kv[layer] is not None:
                k, v = torch.cat((cache.kv[layer][0], k), 1), torch.cat((cache.kv[layer][1], v), 1)
            cache.kv[layer] = (k, v)
        y = attn.attend(q, k, v)  # [B, T, H * d]
        del q, k, v
        for i in range(0, T, chunk):
            xc = x[:, i:i + chunk]
            xc += attn.o_proj(y[:, i:i + chunk])
            xc += self.mlp(self.post_attention_layernorm(xc))
        return x


def _ce_sum(h, weight, targets):  # one loss chunk: lm_head + fp32 cross-entropy, summed
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100, reduction='sum')


def chunked_cross_entropy(h, weight, targets, chunk=LOSS_CHUNK):
    """mean CE over targets != -100 without ever holding more than one [chunk, vocab] fp32 logits
    block: each chunk is checkpointed, so backward recomputes its logits instead of keeping them.
    h [N, dim], weight [V, dim], targets [N]. No valid target -> loss 0 (sum 0 / count clamped to
    1)."""
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(_ce_sum, h[i:i + chunk], weight, targets[i:i + chunk],
                                   use_reentrant=False)
    return total / (targets != -100).sum().clamp(min=1)


class KVCache:
    """Keys and values of the tokens already run, per layer, for greedy decoding (eval_passkey.py):
    forward_hidden(idx, cache=c) runs idx after them, at the next positions, and appends idx's own.
    RoPE is applied before caching, so a cached key keeps the rotation it was computed with (as
    transformers' cache: only 'dynamic' scaling, whose frequencies depend on the length, can differ
    from a full recompute)."""
    def __init__(self, n_layers):
        self.kv = [None] * n_layers  # per layer: (k, v) [B, S, Hkv, d] or None

    def __len__(self):  # S: tokens cached
        return 0 if self.kv[0] is None else self.kv[0][0].shape[1]

    def truncate(self, n):  # forget every token from position n on
        self.kv = [None if kv is None else (kv[0][:, :n], kv[1][:, :n]) for kv in self.kv]


# -----------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.loss_chunk = LOSS_CHUNK  # tokens per loss chunk; lower it to save memory at huge vocab
        # eval scripts: INFER_CHUNK rows per chunk without autograd (0: the plain path)
        self.infer_chunk = 0
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, std=0.02):
        """From-scratch init (also after `to_empty` of a meta-device model): N(0, std), zero biases,
        unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, 'bias', None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward_hidden(self, idx, position_ids=None, cache=None):
        """idx [B,T] int64 -> h [B,T,dim] after the final norm. cache (KVCache, no autograd): idx
        follows the cached tokens (default positions len(cache) ...) and its keys / values are
        appended."""
        B, T = idx.shape
        if position_ids is None:
            start = 0 if cache is None else len(cache)
            position_ids = torch.arange(start, start + T, device=idx.device)
        if position_ids.dim() > 2 or position_ids.shape[-1] != T or \
                (position_ids.dim() == 2 and position_ids.shape[0] not in (1, B)):
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not match idx "
                             f"shape {(B, T)}")
        sw = self.args.sliding_window
        if sw is not None and T > sw:
            # HF Mistral masks keys more than sliding_window tokens back; we do not implement that,
            # and with T <= sliding_window the mask is plainly causal, so shorter sequences match
            # exactly.
            raise UserError(f"sequence length {T} > sliding_window={sw}: load with "
                            "sliding_window=None to use full causal attention")
        x = self.embed_tokens(idx)  # [B, T, dim]
        # angles and cos/sin in fp32, once for all layers; then in the model dtype, as transformers
        # (no [T, H, d] fp32 copies of q and k at 128k tokens; under autocast they stay fp32)
        cos, sin = (t.to(x.dtype) for t in rope.cos_sin(self.args, position_ids.to(idx.device)))
        # training, wrapped blocks
        if cache is None and (torch.is_grad_enabled() or not self.infer_chunk):
            for layer in self.layers:
                x = layer(x, cos, sin)
            return self.norm(x)
        if torch.is_grad_enabled():
            raise RuntimeError("forward_hidden(cache=...) is for inference: run it under "
                               "torch.no_grad()")
        chunk = self.infer_chunk or T
        # no autograd (eval): row chunks, x updated in place
        for i, layer in enumerate(self.layers):
            x = layer.forward_inference(x, cos, sin, chunk, cache, i)
        for i in range(0, T, chunk):
            x[:, i:i + chunk] = self.norm(x[:, i:i + chunk])
        return x

    def forward(self, idx, position_ids=None, targets=None):
        h = self.forward_hidden(idx, position_ids)  # [B, T, dim]
        if targets is None:
            return self.lm_head(h), None  # [B, T, vocab] in the model dtype
        loss = chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                     self.loss_chunk)
        return None, loss

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N (N = parameters in matmuls, lm_head included, embedding
        lookup not) + the attention term 12 * n_layers * n_heads * head_dim * seq_len (nanoGPT /
        PaLM convention, non-causal)."""
        a = self.args
        n = sum(p.numel() for p in self.parameters())
        if not a.tie_word_embeddings:
            n -= self.embed_tokens.weight.numel()
        return 6.0 * n + 12.0 * a.n_layers * a.n_heads * a.head_dim * seq_len

    def estimate_mfu(self, seq_len, tokens_per_s, peak_flops):
        """Model FLOPs utilization: flops_per_token(seq_len) * tokens_per_s / peak_flops (the peak
        of every device together, e.g. world_size * gpu_peak_flops(name)); None without a peak."""
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops if peak_flops else None


# -----------------------------------------------------------------------------
# bf16 dense tensor-core peak FLOP/s per device, first substring match on
# torch.cuda.get_device_name() (so the more specific names come first: 'H100 PCIe' before 'H100',
# 'A10G' before 'A10', 'L40S' before 'L4')
PEAK_FLOPS = [('GH200', 989e12), ('H200', 989e12), ('H100 PCIe', 756e12), ('H100 NVL', 835e12),
              ('H100', 989e12), ('H800', 989e12), ('B200', 2250e12), ('A100', 312e12),
              ('A800', 312e12), ('A10G', 70e12), ('A10', 125e12), ('L40S', 362e12), ('L40', 181e12),
              ('L4', 121e12), ('RTX 4090', 165e12), ('RTX 3090', 71e12), ('A6000', 155e12),
              ('V100', 125e12), ('T4', 65e12)]


def gpu_peak_flops(device_name):
    """The datasheet bf16 peak of a GPU named `device_name`, or 0.0 when it is not in PEAK_FLOPS."""
    return next((f for n, f in PEAK_FLOPS if n in device_name), 0.0)


def wrap_blocks(model, activation_checkpointing, compile_blocks):
    """Each transformer block in place: activation checkpointing (non-reentrant
    torch.utils.checkpoint: recompute the block in backward), then torch.compile; train.py and
    bench.py both wrap with this, so the benchmark measures what training runs. The state dict keys
    get the wrappers' prefixes (torch.distributed.checkpoint's get_state_dict strips them)."""
    for i, block in enumerate(model.layers):
        if activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile_blocks:
            block = torch.compile(block)
        model.layers[i] = block
