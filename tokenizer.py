"""
Tokenizers: sentencepiece (.model) or HF tokenizers (tokenizer.json) behind one interface, and the
fingerprint check that keeps data made with one tokenizer away from a model of another.

    tok = load_tokenizer('/models/Llama-2-7b-hf')  # a tokenizer file, or a model directory
    ids = tok.encode(text)  # BOS prepended when the model's tokenizer uses one
    text = tok.decode(ids)

Its own module (as gpt-fast's tokenizer.py) because every stage uses it: prepare_data.py tokenizes
with it, train.py and eval_*.py check fingerprints and tokenize prompts with it, and none of them
should import the data pipeline (its process pool, its sentencepiece trainer) for that.
"""
import hashlib
import os

from errors import UserError, read_json

# the tokenizer's files, copied beside an HF export (hf_checkpoint.save_pretrained);
# generation_config.json too: it holds the model's eos ids for generate() (Llama 3: <|eot_id|>
# besides <|end_of_text|>)
TOKENIZER_FILES = ('tokenizer.model', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json', 'generation_config.json')


class Tokenizer:
    """sentencepiece (.model) or HF tokenizers (tokenizer.json) behind one interface.
    bos_id: the id prepended to a document -- None when the model's tokenizer adds no BOS (Qwen2);
    special tokens are added here, explicitly, never by the backend."""

    def __init__(self, path):
        self.path = path
        folder = os.path.dirname(path)
        tcfg = _read_json_if(os.path.join(folder, 'tokenizer_config.json'))
        if path.endswith('.json'):
            import tokenizers
            try:
                self.hf = tokenizers.Tokenizer.from_file(path)
            except Exception as e:
                # the Rust side raises a bare Exception for a file it cannot parse; anything more
                # specific is a bug
                if type(e) is not Exception:
                    raise
                raise UserError(f"{path}: not a tokenizers tokenizer.json "
                                f"({str(e).splitlines()[0]})") from None
            self.sp = None
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            mcfg = _read_json_if(os.path.join(folder, 'config.json'))
            self.bos_id = self._special_id(tcfg, mcfg, 'bos',
                                           ('<s>', '<|begin_of_text|>', '<bos>'), path)
            eos_names = ('</s>', '<|end_of_text|>', '<|endoftext|>', '<eos>')
            self.eos_id = self._special_id(tcfg, mcfg, 'eos', eos_names, path)
        else:
            import sentencepiece as spm
            try:
                self.sp = spm.SentencePieceProcessor(model_file=path)
            except (RuntimeError, OSError) as e:
                # sentencepiece: RuntimeError (older versions: OSError)
                raise UserError(f"{path}: not a sentencepiece model "
                                f"({str(e).splitlines()[0]})") from None
            self.hf = None
            self.vocab_size = self.sp.get_piece_size()
            self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
            self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        if tcfg.get('add_bos_token') is False:
            self.bos_id = None  # the model was trained without BOS
        beside = [os.path.join(folder, n) for n in TOKENIZER_FILES]
        self.files = [path] + [p for p in beside if p != path and os.path.isfile(p)]
    def _special_id(self, tcfg, mcfg, which, names, path):
        # 1) tokenizer_config.json: what transformers uses (Qwen2 says bos_token: null -> no BOS)
        if f'{which}_token' in tcfg:
            tok = tcfg[f'{which}_token']
            tok = tok.get('content') if isinstance(tok, dict) else tok
            if tok is None:
                return None
            tid = self.hf.token_to_id(tok)
            if tid is None:
                raise UserError(f"{path}: {which}_token {tok!r} of tokenizer_config.json is not in "
                                "the vocab")
            return tid
        # 2) the model's config.json
        if mcfg.get(f'{which}_token_id') is not None:
            tid = mcfg[f'{which}_token_id']
            return int(tid[0] if isinstance(tid, list) else tid)
        # 3) the tokenizer itself: BOS from its post-processor template (Llama 2/3), else well-known
        # names
        if which == 'bos':
            spec = read_json(path).get('post_processor') or {}
            for proc in spec.get('processors', [spec]):
                single = []
                if proc.get('type') == 'TemplateProcessing':
                    single = proc.get('single') or []
                if single and 'SpecialToken' in single[0]:
                    return self.hf.token_to_id(single[0]['SpecialToken']['id'])
        for name in names:
            if self.hf.token_to_id(name) is not None:
                return self.hf.token_to_id(name)
        return None

    def encode_batch(self, texts, bos=True, eos=False):
        if self.sp is not None:
            # one core per process: num_proc is the knob
            ids = self.sp.encode(list(texts), num_threads=1)
        else:
            # _fast: tokenizers >= 0.21, no offsets
            encode = getattr(self.hf, 'encode_batch_fast', self.hf.encode_batch)
            ids = [e.ids for e in encode(list(texts), add_special_tokens=False)]
        pre = [self.bos_id] if bos and self.bos_id is not None else []
        post = [self.eos_id] if eos and self.eos_id is not None else []
        return [pre + x + post for x in ids] if pre or post else ids

    def encode(self, text, bos=True, eos=False):
        return self.encode_batch([text], bos, eos)[0]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)  # control tokens (BOS/EOS) decode to ''
        return self.hf.decode(ids, skip_special_tokens=True)


def _read_json_if(path):
    # tokenizer_config.json / config.json beside the tokenizer: optional, but checked when present
    return read_json(path) if os.path.isfile(path) else {}


def resolve_tokenizer(path):
    """A tokenizer file, or the tokenizer.model / tokenizer.json inside a model directory."""
    if not path or not os.path.exists(path):
        raise UserError(f"tokenizer not found: {path or '(empty path)'} (set tokenizer=PATH or "
                        "train_tokenizer=VOCAB)")
    if os.path.isdir(path):
        # Llama 1/2 + Mistral ship the .model; Llama 3 / Qwen2 only the .json
        for name in ('tokenizer.model', 'tokenizer.json'):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.abspath(os.path.join(path, name))
        raise UserError(f"tokenizer not found: no tokenizer.model or tokenizer.json in {path}")
    return os.path.abspath(path)


def load_tokenizer(path):
    """-> Tokenizer with .encode(text, bos=True, eos=False), .decode(ids), .bos_id, .eos_id,
    .vocab_size, .files"""
    return Tokenizer(resolve_tokenizer(path))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprints(model_dir):
    """{file: sha256} of the tokenizer files (tokenizer.model / tokenizer.json) in an HF model
    directory."""
    paths = [os.path.join(model_dir, n) for n in ('tokenizer.model', 'tokenizer.json')]
    return {p: sha256_file(p) for p in paths if os.path.isfile(p)}


def check_same_tokenizer(fingerprint, what, model_dir, key):
    """Data (or a tokenizer) made with one tokenizer is never used with a model of another: the
    sha256 `fingerprint` of `what` (meta.json's tokenizer_sha256, or a tokenizer file's) must be one
    of the model's tokenizer files. No fingerprint (hand-made data): nothing to compare (the callers
    still check the token ids against the model's vocab); a model without tokenizer files is
    refused. `key` switches the check off."""
    have = tokenizer_fingerprints(model_dir)
    if not fingerprint or fingerprint in have.values():
        return
    if not have:
        raise UserError(f"{model_dir} has no tokenizer file (tokenizer.model / tokenizer.json) "
                        f"to check {what} against: add the model's tokenizer, or set {key}=False")
    theirs = ', '.join(f'{os.path.basename(p)} sha256 {h[:12]}' for p, h in have.items())
    raise UserError(f"{what} (tokenizer sha256 {fingerprint[:12]}) does not match {model_dir}'s "
                    f"tokenizer ({theirs}): "
                    f"tokenize with the model's own tokenizer, or set {key}=False if you are sure")
