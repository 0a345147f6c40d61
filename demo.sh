#!/usr/bin/env bash
# make demo: the PoSE paper in miniature, on a CPU, in minutes.
#   1. data      the Python standard library's source (real text on every machine) + synthetic passkey
#                prompts; a 1024-piece sentencepiece tokenizer trained on them (prepare_data.py)
#   2. Original  a tiny LLaMA pretrained from scratch at L_c = 128 tokens (config/demo_pretrain.py)
#   3. extend 4x to L_t = 512, same steps / batch / lr for every method (YaRN, factor 4):
#                PoSE (config/demo_pose.py), RandPos (demo_randpos.py), full-length (demo_full.py);
#                YaRN-only = the Original with rope_scaling yarn x4 and no training (the paper's "PI-only" row)
#   4. eval      eval_ppl.py (held-out stdlib files, windows L_c .. L_t) and eval_passkey.py
#   5. report    the paper's Table 1 / Fig. 2b layout: out-demo/results.txt, out-demo/demo.png
# The data (step 1) does not depend on the seed; steps 2-4 run once per seed into out-demo/seed-S/, and the
# report gives each cell's mean and min-max over the seeds, and which of the paper's claims hold for every seed.
# A stage whose output exists is skipped, so an interrupted demo continues where it stopped (`make clean` to redo).
# Usage: bash demo.sh   (PY=python to choose the interpreter; SEEDS="1 2 3" for several seeds, default "1";
# QUICK=1 bash demo.sh: 5 training steps per run and 4 passkey trials -- a smoke test of the pipeline, not results)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-1}
D=data-demo
O=out-demo
T0=$(date +%s)
step() { echo; echo "=== [demo +$(( $(date +%s) - T0 ))s] $*"; }
[ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "error: python '$PY' not found (run 'make demo', or PY=python bash demo.sh)" >&2; exit 2; }
for s in $SEEDS; do [[ $s =~ ^[0-9]+$ ]] || { echo "error: SEEDS='$SEEDS': '$s' is not a non-negative integer" >&2; exit 2; }; done
TRAIN_ARGS=(); TRIALS=30
if [ "${QUICK:-0}" = 1 ]; then TRAIN_ARGS=(--max_iters=5 --warmup_iters=1); TRIALS=4; O=out-demo-quick; fi
mkdir -p "$O"

if [ ! -f $D/long/meta.json ]; then
  step "1/5 data: stdlib split + tokenizer sample"
  $PY demo_report.py --stage=sources --src_dir=$D/src
  $PY prepare_data.py --input=$D/src/tok.jsonl --train_tokenizer=1024 --out_dir=$D/tok
  step "1/5 data: passkey documents of exactly L_c+1 and L_t+1 tokens"
  $PY demo_report.py --stage=passkey --src_dir=$D/src --tokenizer=$D/tok/tokenizer.model
  # short: pretraining + PoSE/RandPos (stdlib in 512-token pieces); long: full-length (whole files, L_t-token prompts)
  for s in short long; do
    py=$D/src/python_train.jsonl; [ $s = short ] && py=$D/src/python_short.jsonl
    rm -rf $D/$s
    $PY prepare_data.py --input=$py,$D/src/passkey_$s.jsonl --val_input=$D/src/python_val.jsonl \
        --tokenizer=$D/tok/tokenizer.model --out_dir=$D/$s --num_proc=2
  done
else
  step "1/5 data: $D exists (rm -rf $D to rebuild)"
fi
PK=$(cat $D/src/passkey_lengths.txt)
LT=512  # L_t (config/demo_pose.py)
YARN="{'rope_type':'yarn','factor':4.0,'original_max_position_embeddings':128}"

for seed in $SEEDS; do
  S=$O/seed-$seed
  if [ ! -f $S/original/hf/config.json ]; then
    step "2/5 seed $seed: pretrain the Original model at L_c = 128"
    rm -rf $S/original $S/*-original.json $S/*-pi.json  # a new model: its old evals go too
    $PY train.py config/demo_pretrain.py --out_dir=$S/original --seed=$seed "${TRAIN_ARGS[@]}"
  fi
  for m in pose randpos full; do
    [ -f $S/$m/hf/config.json ] && continue
    step "3/5 seed $seed: extend to L_t = $LT: $m"
    rm -rf $S/$m $S/*-$m.json
    $PY train.py config/demo_$m.py --init_from=$S/original/hf --out_dir=$S/$m --seed=$seed "${TRAIN_ARGS[@]}"
  done
  for m in original pi randpos full pose; do
    case $m in
      original) args=(--model=$S/original/hf) ;;
      pi)       args=(--model=$S/original/hf --rope_scaling="$YARN" --max_position_embeddings=$LT) ;;
      *)        args=(--model=$S/$m/hf) ;;
    esac
    [ -f $S/ppl-$m.json ] || { step "4/5 seed $seed: perplexity of $m"
      $PY eval_ppl.py "${args[@]}" --data_dir=$D/short --split=val --lengths="[$PK]" --num_docs=20 \
          --device=cpu --out=$S/ppl-$m.json; }
    [ -f $S/passkey-$m.json ] || { step "4/5 seed $seed: passkey retrieval of $m"
      $PY eval_passkey.py "${args[@]}" --lengths="[$PK]" --num_trials=$TRIALS --seed=$((7 + seed)) --device=cpu \
          --out=$S/passkey-$m.json; }
  done
done

step "5/5 report"
$PY demo_report.py --stage=report --out_dir=$O --seeds="$SEEDS"
echo "demo finished in $(( $(date +%s) - T0 ))s"
