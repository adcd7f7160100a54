#!/usr/bin/env bash
# tools/slurm_task.sh GPUS COMMAND...: one task of a stage that run_rounds.sh starts on every node of a Slurm
# allocation with srun (README "Beyond one node"). It takes the task's own values from the environment Slurm gives it,
# never through a shell string: in every argument, {rank} becomes SLURM_PROCID (the task's global rank) and {node}
# SLURM_NODEID (its node's index in the allocation). GPUS > 0: local task SLURM_LOCALID gets GPUs
# [LOCALID x GPUS, (LOCALID + 1) x GPUS) of its node's (CUDA_VISIBLE_DEVICES as Slurm set it, else 0, 1, ...), through
# `env CUDA_VISIBLE_DEVICES=...`; GPUS = 0 leaves the node's GPUs to the command (one `accelerate launch` per node).
# It prints the command it runs, as run_rounds.sh logs every command (srun's --output sends it to the task's log),
# then execs it.
#   srun --ntasks-per-node 8 ... tools/slurm_task.sh 1 python 01_generate.py ... --shard {rank} --num_shards 16
set -euo pipefail
gpus=$1; shift
rank='{rank}' node='{node}' args=()
for a in "$@"; do a=${a//"$rank"/$SLURM_PROCID}; args+=("${a//"$node"/$SLURM_NODEID}"); done
if ((gpus > 0)); then
  IFS=, read -r -a ids <<<"${CUDA_VISIBLE_DEVICES:-}"
  ((${#ids[@]})) || mapfile -t ids < <(seq 0 $(((SLURM_LOCALID + 1) * gpus - 1)))
  mine=("${ids[@]:$((SLURM_LOCALID * gpus)):$gpus}")
  ((${#mine[@]} == gpus)) || { echo "error: task $SLURM_PROCID on $SLURMD_NODENAME: local task $SLURM_LOCALID" \
    "needs $gpus GPU(s), but the node has ${#ids[@]} (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-})" >&2; exit 2; }
  args=(env "CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${mine[*]}")" "${args[@]}")
fi
printf '# %s task %s on %s (node %s)\n$ %s\n' "$(date -u +%FT%TZ)" "$SLURM_PROCID" "$SLURMD_NODENAME" "$SLURM_NODEID" \
  "$(printf '%q ' "${args[@]}")"
exec "${args[@]}"
