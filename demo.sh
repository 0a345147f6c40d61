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
# Every training and eval process runs on one thread, JOBS of them side by side (default: one per core), each job's
# output in out-demo/seed-S/log-*.txt: the table then depends on the seed alone, not on the machine's core count.
# Usage: bash demo.sh   (PY=python to choose the interpreter; SEEDS="1 2 3" for several seeds, default "1";
# JOBS=N jobs at a time; QUICK=1 bash demo.sh: 5 training steps per run and 4 passkey trials -- a smoke test of the
# pipeline, not results)
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

# One thread per process: a float sum's order (hence every number in the table) then does not depend on the machine's
# core count, so the same seed gives the same table anywhere; the runs go side by side instead (JOBS at a time).
JOBS=${JOBS:-$(env -u OMP_NUM_THREADS nproc 2>/dev/null || echo 2)}  # (nproc itself obeys OMP_NUM_THREADS)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "error: JOBS='$JOBS': expected a positive integer" >&2; exit 2; }

pretrain() {  # seed: the Original, trained from scratch at L_c
  local S=$O/seed-$1
  [ -f $S/original/hf/config.json ] && return 0
  rm -rf $S/original $S/*-original.json $S/*-pi.json  # a new model: its old evals go too
  $PY train.py config/demo_pretrain.py --out_dir=$S/original --seed=$1 "${TRAIN_ARGS[@]}"
}
# (the pool runs these under `||`, where set -e does not act: each failure is returned by hand)
evaluate() {  # seed method: perplexity and passkey of one model (pi = the Original + YaRN x4, no training)
  local S=$O/seed-$1 args
  case $2 in
    original) args=(--model=$S/original/hf) ;;
    pi)       args=(--model=$S/original/hf --rope_scaling="$YARN" --max_position_embeddings=$LT) ;;
    *)        args=(--model=$S/$2/hf) ;;
  esac
  [ -f $S/ppl-$2.json ] || $PY eval_ppl.py "${args[@]}" --data_dir=$D/short --split=val --lengths="[$PK]" \
      --num_docs=20 --device=cpu --out=$S/ppl-$2.json || return 1
  [ -f $S/passkey-$2.json ] || $PY eval_passkey.py "${args[@]}" --lengths="[$PK]" --num_trials=$TRIALS \
      --seed=$((7 + $1)) --device=cpu --out=$S/passkey-$2.json
}
extend() {  # seed method: fine-tune the Original to L_t (once it exists), then evaluate
  local S=$O/seed-$1
  wait_for $S/original/hf/config.json || return 1  # its pretrain job was queued before this one
  if [ ! -f $S/$2/hf/config.json ]; then
    rm -rf $S/$2 $S/*-$2.json
    $PY train.py config/demo_$2.py --init_from=$S/original/hf --out_dir=$S/$2 --seed=$1 "${TRAIN_ARGS[@]}" || return 1
  fi
  evaluate $1 $2
}
baselines() { wait_for $O/seed-$1/original/hf/config.json && evaluate $1 original && evaluate $1 pi; }
wait_for() { until [ -f "$1" ]; do [ -f "$FAILED" ] && return 1; sleep 2; done; }
FAILED=$O/.failed  # a job that fails leaves this: the pool stops

pool() {  # run the jobs named on stdin ("function seed [method]"), JOBS at a time; any failure stops them all
  local job log t0
  rm -f "$FAILED"
  while read -r job; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ] && [ ! -f "$FAILED" ]; do sleep 1; done
    [ -f "$FAILED" ] && break
    log=$O/seed-${job#* }; log=${log%% *}/log-${job// /-}.txt
    mkdir -p "$(dirname "$log")"
    step "start $job (log: $log)"
    ( t0=$(date +%s)
      $job > "$log" 2>&1 || { echo "error: $job failed, see $log:" >&2; tail -n 5 "$log" >&2; touch "$FAILED"; exit 1; }
      step "done $job ($(( $(date +%s) - t0 ))s)" ) &
  done
  while [ -n "$(jobs -rp)" ] && [ ! -f "$FAILED" ]; do sleep 1; done
  if [ -f "$FAILED" ]; then  # stop the others (each job's python is a child of its subshell)
    for p in $(jobs -rp); do pkill -TERM -P "$p" 2>/dev/null; kill "$p" 2>/dev/null; done
    wait; rm -f "$FAILED"; exit 1
  fi
  wait
}

step "2-4/5 train and evaluate: seeds $SEEDS, $JOBS jobs at a time, one thread each"
{ for seed in $SEEDS; do echo "pretrain $seed"; done
  for seed in $SEEDS; do echo "extend $seed full"; done  # the longest jobs first
  for seed in $SEEDS; do echo "extend $seed pose"; echo "extend $seed randpos"; echo "baselines $seed"; done
} | pool

step "5/5 report"
$PY demo_report.py --stage=report --out_dir=$O --seeds="$SEEDS"
echo "demo finished in $(( $(date +%s) - T0 ))s"
