"""
Sample from an HF-format model directory (ours or a stock Llama / Mistral / Qwen2): nanoGPT's
sample.py with a KV cache. The prompt runs once (row-chunked, so a 12k-token prompt fits on a CPU),
then one token per forward; the new text streams to stdout as it is generated.

    python sample.py --model=out-real/pose/hf --prompt="Once upon a time"
    python sample.py --model=out-real/pose/hf --prompt_file=asyncio/tasks.py \\
        --question="Which function here waits for the first task to finish?" --max_new_tokens=100
    python sample.py --model=ckpt/llama-7b --prompt_file=paper.txt --temperature=0  # greedy

The prompt: `prompt`, or the text of `prompt_file`, with `question` (if any) on a line after it; BOS
first when the tokenizer uses one. Generation stops at EOS (the tokenizer's, config.json's or
generation_config.json's) or after max_new_tokens. temperature=0 is greedy decoding (transformers'
generate(do_sample=False), token for token); else each token is drawn from
softmax(logits / temperature) over the top_k most likely tokens. Prompt + max_new_tokens must fit in
the model's max_position_embeddings (after PoSE: its target length L_t) unless allow_beyond_max.
"""
import os
import sys
import time

import torch

from errors import UserError, read_json, run
from model import INFER_CHUNK, KVCache

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
CONTEXT_TOKENS = 4  # prompt tokens decoded before the first new one, so its leading space is kept

# -----------------------------------------------------------------------------
# config (python sample.py [config.py] [--key=value ...])
model = ''  # HF-format model dir (ours or a stock Llama/Mistral/Qwen2)
prompt = ''  # the prompt text (exactly one of prompt / prompt_file)
prompt_file = ''  # a UTF-8 text file used as the prompt (e.g. a long source file)
question = ''  # appended on a new line after the prompt (handy after a prompt_file)
max_new_tokens = 200  # tokens to generate at most (fewer when EOS comes first)
num_samples = 1  # samples from the same prompt (its prefill is run once)
temperature = 0.8  # 0 = greedy; else logits / temperature before softmax (< 1: sharper)
top_k = 200  # sample among the top_k most likely tokens only; None or 0 = the whole vocab
seed = 1337  # the sampling draws: the same seed, the same text
rope_scaling = None  # None = the checkpoint's own; a dict (HF semantics) overrides it
max_position_embeddings = None  # None = the checkpoint's; else an override (the length bound too)
allow_beyond_max = False  # True: run past max_position_embeddings (positions not configured for)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # 'auto' = bfloat16 on CUDA, float32 on CPU; or 'float32' / 'bfloat16' / 'float16'


# -----------------------------------------------------------------------------
# generation

@torch.inference_mode()
def prefill(net, ids, device='cpu'):
    """The prompt `ids` run once: (its KV cache, the fp32 logits [vocab] of its last position)."""
    cache = KVCache(net.args.n_layers)
    h = net.forward_hidden(torch.tensor(ids, dtype=torch.long, device=device)[None], cache=cache)
    return cache, net.lm_head(h[0, -1]).float()  # the last row only: no [T, vocab] logits


def next_token(logits, temperature, top_k, generator=None):
    """One token from fp32 logits [vocab]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the tokens whose logit is at least the top_k-th largest."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.inference_mode()
def generate(net, cache, logits, max_new_tokens, temperature=0.0, top_k=None, eos_ids=(),
             generator=None):
    """Yields the new token ids one by one (the EOS too, last, when it comes). cache / logits:
    prefill's; the cache grows by each token fed back (truncated to the prompt: sample again)."""
    for i in range(max_new_tokens):
        t = next_token(logits, temperature, top_k, generator)
        yield t
        if t in eos_ids or i == max_new_tokens - 1:
            return
        idx = torch.tensor([[t]], dtype=torch.long, device=logits.device)
        h = net.forward_hidden(idx, cache=cache)
        logits = net.lm_head(h[0, -1]).float()


def detokenize(decode, ids, context=()):
    """Yields the text of the token stream `ids` piece by piece, each as soon as it is final:
    decoded after the tokens before it (`context`: the prompt's last ones), since a tokenizer may
    drop a first token's leading space, and held back while it ends in U+FFFD (a character's first
    bytes)."""
    toks = list(context)
    start, done = 0, len(toks)  # decode(toks[start:done]) has been written (or is context)
    text = shown = ''
    for t in ids:
        toks.append(t)
        shown, text = decode(toks[start:done]), decode(toks[start:])
        if len(text) > len(shown) and not text.endswith('\ufffd'):
            yield text[len(shown):]
            start, done = done, len(toks)
            shown = text
    if len(text) > len(shown):  # the stream ended inside a character: what there is
        yield text[len(shown):]


def recorded(tokens, into):
    """The token stream as it is, each token also appended to the list `into`."""
    for t in tokens:
        into.append(t)
        yield t


def eos_token_ids(model_dir, tok, args):
    """Every id that ends generation, as transformers' generate reads them: generation_config.json's
    eos_token_id (Llama 3 instruct lists several), config.json's, and the tokenizer's."""
    ids = set()
    gen_cfg = os.path.join(model_dir, 'generation_config.json')
    for v in (read_json(gen_cfg).get('eos_token_id') if os.path.isfile(gen_cfg) else None,
              args.eos_token_id, tok.eos_id):
        ids.update(v if isinstance(v, list) else [] if v is None else [v])
    return ids


# -----------------------------------------------------------------------------

def check_config():
    """The checks on the config alone, before the model is read; returns the prompt text."""
    if not model:
        raise UserError("--model=<HF model dir> is required")
    if not os.path.isfile(os.path.join(model, 'config.json')):
        raise UserError(f"model dir not found or has no config.json: {model}")
    if bool(prompt) == bool(prompt_file):
        raise UserError("give exactly one of --prompt=TEXT or --prompt_file=PATH "
                        f"(got {'both' if prompt else 'neither'})")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature >= 0:
        raise UserError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise UserError(f"top_k must be None or an int >= 0 (0 = the whole vocab), got {top_k!r}")
    ints = {'max_new_tokens': max_new_tokens, 'num_samples': num_samples}
    if max_position_embeddings is not None:
        ints['max_position_embeddings'] = max_position_embeddings
    for key, v in ints.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{key} must be an int >= 1, got {v!r}")
    if dtype != 'auto' and dtype not in DTYPES:
        raise UserError(f"dtype must be auto/{'/'.join(DTYPES)}, got {dtype!r}")
    text = prompt
    if prompt_file:
        if not os.path.isfile(prompt_file):
            raise UserError(f"prompt_file not found: {prompt_file}")
        try:
            with open(prompt_file, encoding='utf-8') as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"prompt_file {prompt_file}: not UTF-8 text "
                            f"({e.reason} at byte {e.start})") from None
    return text + ('\n' + question if question else '')


def check_prompt(ids, args):
    """The prompt's ids against the model's config.json (ModelArgs, before the weights are read): in
    its vocab, and prompt + max_new_tokens within the positions the model is configured for (the
    max_position_embeddings override, else its own) and Mistral's sliding window."""
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    if max(ids) >= args.vocab_size:
        raise UserError(f"the tokenizer of {model} gives token id {max(ids)} >= the model's "
                        f"vocab_size {args.vocab_size}")
    n_prompt, total, sw = len(ids), len(ids) + max_new_tokens, args.sliding_window
    what = f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) = {total}"
    if sw is not None and total > sw:  # past the window HF Mistral masks what model.py attends to
        raise UserError(f"{what} > sliding_window={sw} of {model}: not supported "
                        "(model.py has no sliding-window mask)")
    mpe = max_position_embeddings or args.max_position_embeddings  # (0 is refused by check_config)
    if total > mpe and not allow_beyond_max:
        raise UserError(f"{what} > max_position_embeddings={mpe} of {model}: shorten the prompt or "
                        "max_new_tokens, or set --max_position_embeddings (with --rope_scaling) or "
                        "--allow_beyond_max=True")
    if total > mpe:
        print(f"warning: {what} > max_position_embeddings={mpe}: positions beyond what the model "
              "is configured for", file=sys.stderr)


def main():
    from hf_checkpoint import args_from_hf_config, load_pretrained
    from tokenizer import load_tokenizer

    text = check_config()
    tok = load_tokenizer(model)
    ids = tok.encode(text, bos=True)
    cfg_path = os.path.join(model, 'config.json')
    check_prompt(ids, args_from_hf_config(read_json(cfg_path), cfg_path))
    overrides = {k: v for k, v in (('rope_scaling', rope_scaling),
                                   ('max_position_embeddings', max_position_embeddings))
                 if v is not None}
    dt = DTYPES.get(dtype) or (torch.bfloat16 if 'cuda' in str(device) else torch.float32)
    net = load_pretrained(model, dtype=dt, device=device, **overrides)
    net.infer_chunk = INFER_CHUNK  # the prompt's forward in row chunks (model.py): long ones fit
    eos = eos_token_ids(model, tok, net.args)
    generator = torch.Generator(device=device).manual_seed(seed)

    t0 = time.time()
    cache, logits = prefill(net, ids, device)
    t_prefill = time.time() - t0
    print(f"prompt: {len(ids)} tokens, prefilled in {t_prefill:.1f}s", file=sys.stderr, flush=True)
    for k in range(num_samples):
        cache.truncate(len(ids))  # every sample starts from the prompt's cache
        t0, gen = time.time(), []
        tokens = generate(net, cache, logits, max_new_tokens, temperature, top_k, eos, generator)
        for piece in detokenize(tok.decode, recorded(tokens, gen), ids[-CONTEXT_TOKENS:]):
            sys.stdout.write(piece)
            sys.stdout.flush()
        dt_gen = time.time() - t0
        sys.stdout.write('\n' + ('---------------\n' if num_samples > 1 else ''))
        print(f"sample {k + 1}: {len(gen)} tokens in {dt_gen:.1f}s "
              f"({len(gen) / max(dt_gen, 1e-9):.1f} tokens/s)", file=sys.stderr, flush=True)


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run(main, interrupted='interrupted (Ctrl-C)')
