#!/usr/bin/env bash
# make demo: the PoSE paper in miniature, on a CPU, in minutes.
#   1. data      the Python standard library's source (real text on every machine) + synthetic passkey
#                prompts; a 1024-piece sentencepiece tokenizer trained on them (prepare_data.py)
#   2. Original  a tiny LLaMA pretrained from scratch at L_c = 128 tokens (config/demo_pretrain.py)
#   3. extend 8x to L_t = 1024, same steps / batch / lr for every method (linear interpolation, factor 8):
#                PoSE (config/demo_pose.py), RandPos (demo_randpos.py), full-length (demo_full.py);
#                PI-only = the Original with rope_scaling linear x8 and no training
#   4. eval      eval_ppl.py (held-out stdlib files, windows L_c .. L_t) and eval_passkey.py
#   5. report    the paper's Table 1 / Fig. 2b layout: out-demo/results.txt, out-demo/demo.png
# Outputs: data-demo/, out-demo/ (both git-ignored). Usage: bash demo.sh   (PY=python to choose the interpreter;
# QUICK=1 bash demo.sh: 5 training steps per run and 4 passkey trials -- a smoke test of the pipeline, not results)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
D=data-demo
O=out-demo
T0=$(date +%s)
step() { echo; echo "=== [demo +$(( $(date +%s) - T0 ))s] $*"; }
[ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "error: python '$PY' not found (run 'make demo', or PY=python bash demo.sh)" >&2; exit 2; }
mkdir -p "$O"
TRAIN_ARGS=(); TRIALS=30
if [ "${QUICK:-0}" = 1 ]; then TRAIN_ARGS=(--max_iters=5 --warmup_iters=1); TRIALS=4; fi

step "1/5 data: stdlib split + tokenizer sample"
$PY demo_report.py --stage=sources --src_dir=$D/src
$PY prepare_data.py --input=$D/src/tok.jsonl --train_tokenizer=1024 --out_dir=$D/tok
step "1/5 data: passkey documents of exactly L_c+1 and L_t+1 tokens"
$PY demo_report.py --stage=passkey --src_dir=$D/src --tokenizer=$D/tok/tokenizer.model
for s in short long; do  # short: pretraining + PoSE/RandPos; long: full-length (same mix, L_t-token prompts)
  $PY prepare_data.py --input=$D/src/python_train.jsonl,$D/src/passkey_$s.jsonl --val_input=$D/src/python_val.jsonl \
      --tokenizer=$D/tok/tokenizer.model --out_dir=$D/$s --num_proc=2
done

step "2/5 pretrain the Original model at L_c = 128"
$PY train.py config/demo_pretrain.py "${TRAIN_ARGS[@]}"

for m in pose randpos full; do
  step "3/5 extend to L_t = 1024: $m"
  $PY train.py config/demo_$m.py "${TRAIN_ARGS[@]}"
done

PK=$(cat $D/src/passkey_lengths.txt)
PI="{'rope_type':'linear','factor':8.0}"
for m in original pi randpos full pose; do
  step "4/5 evaluate: $m"
  case $m in
    original) args=(--model=$O/original/hf) ;;
    pi)       args=(--model=$O/original/hf --rope_scaling="$PI" --max_position_embeddings=1024) ;;
    *)        args=(--model=$O/$m/hf) ;;
  esac
  $PY eval_ppl.py "${args[@]}" --data_dir=$D/short --split=val --lengths="[128,256,512,1024]" --num_docs=20 \
      --device=cpu --out=$O/ppl-$m.json --overwrite=True
  $PY eval_passkey.py "${args[@]}" --lengths="[$PK]" --num_trials=$TRIALS --seed=7 --device=cpu --out=$O/passkey-$m.json --overwrite=True
done

step "5/5 report"
$PY demo_report.py --stage=report --out_dir=$O
echo "demo finished in $(( $(date +%s) - T0 ))s"
