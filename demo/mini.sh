#!/usr/bin/env bash
# make demo: the PoSE paper in miniature, on a CPU, in minutes.
#   1. data    the Python standard library's source (real text on every machine) + synthetic
#              passkey prompts; a 1024-piece sentencepiece tokenizer trained on them (prepare_data).
#              data-demo/short: the pretraining mix (stdlib pieces + passkey prompts + copy drills);
#              data-demo/ext: the extension runs' data, the same stdlib pieces alone -- no passkey
#              prompt, so retrieval past L_c is transfer, as in the paper (which fine-tunes on Pile)
#   2. base    the Original, a tiny LLaMA at L_c = 128: pretrained from scratch with seed BASE_SEED
#              (config/demo_pretrain.py) or given (BASE=dir). Its passkey at L_c on probe keys
#              (eval_passkey seed PROBE_SEED, not the evaluation's) comes first; of several
#              candidates the first >= 0.9 is the base (demo/mini_report.py --stage=select). Its
#              sha256 names its output dir.
#   3. extend  that one base 4x to L_t = 512, once per extension seed (SEEDS: train.py's seed, i.e.
#              the data draws), the same data / steps / batch / lr / YaRN x4 for every method: PoSE
#              (config/demo_pose.py), Contiguous = PoSE with one chunk (demo_contig.py), RandPos
#              (demo_randpos.py), full-length on PoSE's documents (demo_full.py); YaRN-only = the
#              base with rope_scaling yarn x4 and no training (the paper's "PI-only" row)
#   4. eval    eval_ppl.py (held-out stdlib files, windows L_c .. L_t) and eval_passkey.py (seed
#              EVAL_SEED for every model: the same keys and depths, so two methods' trials pair up)
#   5. report  the paper's Table 1 / Fig. 2b layout, passkey counts with 95% Wilson intervals, the
#              paired tests of PoSE vs Contiguous, the claims: out-demo/results.txt, demo.png
# Layout: out-demo/pretrain-B/original/: a pretrained candidate (seed B); out-demo/base-<sha[:12]>/
# per base: base.json, probe-passkey.json, the base's own evals (Original, YaRN-only), seed-S/ per
# extension seed, the report (copied to out-demo/). A stage whose output exists is skipped, so an
# interrupted demo continues where it stopped (`make clean` to redo).
# Every training and eval process runs on one thread, JOBS of them side by side (default: one per
# core), each job's output in a log-*.txt beside its results: the table then depends on the seeds
# alone, not on the core count (another kind of CPU may order float sums, so the digits, otherwise).
# Usage: bash demo/mini.sh
#   PY=python       the interpreter
#   SEEDS="1 2 3"   the extension seeds (default "1")
#   BASE=dir        extend this pretrained Original (an HF dir, e.g. a committed demo/base/; a
#                   model.safetensors.sha256 beside its weights is checked); BASE="a b": candidates;
#                   dir:S records its pretraining seed S in the report (e.g. out-demo/pretrain-3/
#                   original/hf:3)
#   BASE_SEED=3     without BASE: pretrain with this seed; BASE_SEED="1 2 3": candidates
#   TRIALS=30       passkey trials per length;  JOBS=N: jobs at a time
#   QUICK=1         5 training steps per run, 4 passkey trials: a smoke test of the pipeline
#   EXT_PASSKEY=0.1 this share of the extension data is pretraining's L_c-token passkey prompts
#                   (default 0: none). The skill is then rehearsed at L_c only: retrieval past L_c
#                   still has to come from the positions. Into out-demo-pk<share>/
#   METHODS="pose contig"  the extension methods to run (default: full pose contig randpos)
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root: the stages and data / out dirs are relative to it
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-1}
BASE=${BASE:-}
BASE_SEED=${BASE_SEED:-3}  # the pretraining seed of the README table's base (it retrieves at L_c)
TRIALS=${TRIALS:-30}
EXT_PASSKEY=${EXT_PASSKEY:-0}
METHODS=${METHODS:-full pose contig randpos}
EVAL_SEED=7  # eval_passkey's keys and depths for every model and seed: fixed, so trials are paired
PROBE_SEED=1007  # the base probe's keys and depths: not the evaluation's
D=data-demo
O=out-demo
T0=$(date +%s)
step() { echo; echo "=== [demo +$(( $(date +%s) - T0 ))s] $*"; }
die() { echo "error: $*" >&2; exit 2; }
[ -x "$PY" ] || command -v "$PY" >/dev/null || die "python '$PY' not found (make demo; PY=python)"
for s in $SEEDS $BASE_SEED; do
  [[ $s =~ ^[0-9]+$ ]] || die "SEEDS='$SEEDS' BASE_SEED='$BASE_SEED': '$s' is not an integer >= 0"
done
[[ $TRIALS =~ ^[1-9][0-9]*$ ]] || die "TRIALS='$TRIALS': expected a positive integer"
[[ $EXT_PASSKEY =~ ^(0|0?\.[0-9]+)$ ]] \
  || die "EXT_PASSKEY='$EXT_PASSKEY': expected a share in [0, 1), e.g. 0.1"
for m in $METHODS; do
  [[ $m =~ ^(full|pose|contig|randpos)$ ]] \
    || die "METHODS='$METHODS': '$m' is not one of full pose contig randpos"
done
# the base candidates: "model-dir pretraining-seed" (-1: not known); a given BASE's dir:S gives S
cands=()
for b in $BASE; do
  if [[ $b =~ ^(.*):([0-9]+)$ ]]; then cands+=("${BASH_REMATCH[1]} ${BASH_REMATCH[2]}")
  else cands+=("$b -1"); fi
done
TRAIN_ARGS=()
if [ "${QUICK:-0}" = 1 ]; then
  TRAIN_ARGS=(--max_iters=5 --warmup_iters=1); TRIALS=4; O=out-demo-quick
fi
EXT=$D/ext  # the extension runs' data
if [ "$EXT_PASSKEY" != 0 ]; then EXT=$D/ext-pk$EXT_PASSKEY; O=$O-pk$EXT_PASSKEY; fi
mkdir -p "$O"

if [ ! -f $D/short/meta.json ]; then
  step "1/5 data: stdlib split + tokenizer sample"
  $PY demo/mini_report.py --stage=sources --src_dir=$D/src
  if [ -n "$BASE" ]; then  # a given base brings its tokenizer: the data must be tokenized with it
    mkdir -p $D/tok && cp "${cands[0]% *}/tokenizer.model" $D/tok/tokenizer.model
  else
    $PY prepare_data.py --input=$D/src/tok.jsonl --train_tokenizer=1024 --out_dir=$D/tok
  fi
  step "1/5 data: passkey documents of exactly L_c+1 tokens"
  $PY demo/mini_report.py --stage=passkey --src_dir=$D/src --tokenizer=$D/tok/tokenizer.model
  rm -rf $D/short  # pretraining: stdlib in 512-token pieces + passkey prompts + copy drills
  $PY prepare_data.py --input=$D/src/python_short.jsonl,$D/src/passkey_short.jsonl \
      --val_input=$D/src/python_val.jsonl --tokenizer=$D/tok/tokenizer.model --out_dir=$D/short \
      --num_proc=2
else
  step "1/5 data: $D/short exists (rm -rf $D to rebuild)"
fi
if [ ! -f $D/ext/meta.json ]; then
  step "1/5 data: the extension runs' data, the stdlib pieces alone (no passkey prompt)"
  rm -rf $D/ext
  $PY prepare_data.py --input=$D/src/python_short.jsonl --val_input=$D/src/python_val.jsonl \
      --tokenizer=$D/tok/tokenizer.model --out_dir=$D/ext --num_proc=2
fi
if [ ! -f $EXT/meta.json ]; then
  step "1/5 data: the extension data with a share $EXT_PASSKEY of L_c-token passkey prompts"
  rm -rf $EXT
  $PY demo/mini_report.py --stage=rehearsal --ext_passkey=$EXT_PASSKEY --src_dir=$D/src
  $PY prepare_data.py --input=$D/src/python_short.jsonl,$D/src/passkey_ext.jsonl \
      --val_input=$D/src/python_val.jsonl --tokenizer=$D/tok/tokenizer.model --out_dir=$EXT \
      --num_proc=2
fi
PK=$(cat $D/src/passkey_lengths.txt)
LT=512  # L_t (config/demo_pose.py)
YARN="{'rope_type':'yarn','factor':4.0,'original_max_position_embeddings':128}"

# One thread per process: a float sum's order (hence every number in the table) then does not depend
# on the core count, so the same seeds give the same table on the same kind of CPU; the runs go side
# by side instead (JOBS at a time).
JOBS=${JOBS:-$(env -u OMP_NUM_THREADS nproc 2>/dev/null || echo 2)}  # (nproc obeys OMP_NUM_THREADS)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "JOBS='$JOBS': expected a positive integer"

pretrain() {  # seed: a candidate Original, trained from scratch at L_c with this seed
  local P=$O/pretrain-$1
  [ -f $P/original/hf/config.json ] && return 0
  rm -rf $P/original
  $PY train.py config/demo_pretrain.py --out_dir=$P/original --seed=$1 "${TRAIN_ARGS[@]}"
}
probe() {  # base-dir model: the base's passkey at L_c on the probe keys
  [ -f $1/probe-passkey.json ] && return 0
  if ! $PY eval_passkey.py --model=$2 --lengths="[${PK%%,*}]" --num_trials=$TRIALS \
      --seed=$PROBE_SEED --device=cpu --out=$1/probe-passkey.json > $1/log-probe.txt 2>&1; then
    echo "error: the probe of $2 failed, see $1/log-probe.txt:" >&2
    tail -n 5 $1/log-probe.txt >&2; exit 1
  fi
}
# (the pool runs these under `||`, where set -e does not act: each failure is returned by hand)
evaluate() {  # dir name model-args: a model's perplexity and passkey, dir/{ppl,passkey}-NAME.json
  local S=$1 n=$2; shift 2
  [ -f $S/ppl-$n.json ] || $PY eval_ppl.py "$@" --data_dir=$D/ext --split=val --lengths="[$PK]" \
      --num_docs=20 --device=cpu --out=$S/ppl-$n.json || return 1
  [ -f $S/passkey-$n.json ] || $PY eval_passkey.py "$@" --lengths="[$PK]" --num_trials=$TRIALS \
      --seed=$EVAL_SEED --device=cpu --out=$S/passkey-$n.json
}
extend() {  # seed method: fine-tune the base to L_t with this method and seed, then evaluate
  local S=$OB/seed-$1
  if [ ! -f $S/$2/hf/config.json ]; then
    rm -rf $S/$2 $S/*-$2.json
    $PY train.py config/demo_$2.py --init_from=$BASE_HF --data_dir=$EXT --out_dir=$S/$2 \
        --seed=$1 "${TRAIN_ARGS[@]}" || return 1
  fi
  evaluate $S $2 --model=$S/$2/hf
}
baselines() {  # the base itself (Original) and with YaRN x4, no training (YaRN-only): once per base
  evaluate $OB original --model=$BASE_HF && \
    evaluate $OB pi --model=$BASE_HF --rope_scaling="$YARN" --max_position_embeddings=$LT
}
FAILED=$O/.failed  # a job that fails leaves this: the pool stops

# run the jobs named on stdin ("function [args]"), JOBS at a time, logs in $1/; a failure stops all
pool() {
  local job log t0
  rm -f "$FAILED"
  mkdir -p "$1"
  while read -r job; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ] && [ ! -f "$FAILED" ]; do sleep 1; done
    [ -f "$FAILED" ] && break
    log=$1/log-${job// /-}.txt
    step "start $job (log: $log)"
    ( t0=$(date +%s)
      if ! $job >> "$log" 2>&1; then  # appended: a resumed demo keeps the earlier output
        echo "error: $job failed, see $log:" >&2; tail -n 5 "$log" >&2; touch "$FAILED"; exit 1
      fi
      step "done $job ($(( $(date +%s) - t0 ))s)" ) &
  done
  while [ -n "$(jobs -rp)" ] && [ ! -f "$FAILED" ]; do sleep 1; done
  if [ -f "$FAILED" ]; then  # stop the others (each job's python is a child of its subshell)
    for p in $(jobs -rp); do pkill -TERM -P "$p" 2>/dev/null; kill "$p" 2>/dev/null; done
    wait; rm -f "$FAILED"; exit 1
  fi
  wait
}

if [ -z "$BASE" ]; then
  step "2/5 base: pretrain the Original, seed(s) $BASE_SEED, $JOBS jobs at a time, one thread each"
  for b in $BASE_SEED; do echo "pretrain $b"; done | pool $O
  for b in $BASE_SEED; do cands+=("$O/pretrain-$b/original/hf $b"); done
fi
step "2/5 base: passkey at L_c on probe keys (eval_passkey seed $PROBE_SEED)"
dirs=()
for c in "${cands[@]}"; do
  set -- $c
  d=$($PY demo/mini_report.py --stage=base --base="$1" --pretrain_seed=$2 --out_dir=$O | tail -n 1)
  probe "$d" "$1"
  dirs+=("$d")
done
sel=$($PY demo/mini_report.py --stage=select --base_dirs="${dirs[*]}" --eval_seed=$EVAL_SEED)
echo "$sel"
OB=${sel##*selected: }
for i in "${!dirs[@]}"; do if [ "${dirs[$i]}" = "$OB" ]; then BASE_HF=${cands[$i]% *}; fi; done

step "3-4/5 extend $BASE_HF and evaluate: seeds $SEEDS, $JOBS jobs at a time, one thread each"
has() { [[ " $METHODS " == *" $1 "* ]]; }
{ if has full; then for seed in $SEEDS; do echo "extend $seed full"; done; fi  # longest first
  echo "baselines"
  for seed in $SEEDS; do
    for m in pose contig randpos; do if has $m; then echo "extend $seed $m"; fi; done
  done
} | pool $OB

step "5/5 report"
$PY demo/mini_report.py --stage=report --out_dir=$OB --seeds="$SEEDS"
for f in results.txt results.json demo.png; do
  if [ -f $OB/$f ]; then cp $OB/$f $O/$f; fi
done
echo "demo finished in $(( $(date +%s) - T0 ))s (report: $O/results.txt, a copy of $OB/results.txt)"
