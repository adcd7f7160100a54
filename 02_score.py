"""Stage 2 of DICE (Chen et al., ICLR 2025, arXiv 2406.09760): score each sampled response with the DPO implicit reward

    r(x, y) = beta * [ log pi(y|x) - log pi_ref(y|x) ],    log pi(y|x) = sum over response tokens of log pi(y_t|x, y_<t)

Round t scores OUT/round_t/responses.jsonl (K responses per prompt, sampled from pi_{t-1}) with the policy
pi = pi_{t-1} (OUT/round_{t-1}/model) and the reference pi_ref = pi_{t-2} (OUT/round_{t-2}/model; round 1: pi_0 and
the SFT model pi_{-1}). beta, one constant factor for every response, is left out as in the paper's code: `rewards` =
policy_logps - reference_logps. Only a valid response may be ranked (03), the paper code's filter: its finish reason is
not "length" and --min_chars < len(response) < --max_chars (3 and 6700). --pairs scores preference pairs instead (03's
offline pairs; held-out pairs: the implicit-reward accuracy, the share of pairs with chosen_reward > rejected_reward).
Exactness: every log-prob is the one TRL 1.16's DPOTrainer computes for the conversational row (prompt, response)
(dice/scoring.py), so stage 4 reuses them; N processes (accelerate launch / torchrun) write one process's output,
also with models too large for one GPU, sharded over them (configs/accelerate/zero3_scoring.yaml: DeepSpeed ZeRO-3).

Smoke run (tiny offline models, seconds):
    for seed in 1 2; do python tools/tiny_model.py --out /tmp/tiny_$seed --seed $seed; done
    python 02_score.py --policy /tmp/tiny_1 --reference /tmp/tiny_2 --pairs data/demo/preferences.jsonl \
        --out /tmp/scored_prefs.jsonl --max_length 512
Full run (round 2 on one 8-GPU node, the official Llama-3 prompt format):
    accelerate launch --num_processes 8 02_score.py --policy runs/llama3/round_1/model \
        --reference runs/llama3/round_0/model --responses runs/llama3/round_2/responses.jsonl \
        --out runs/llama3/round_2/scores.jsonl --dtype bfloat16 --chat_template configs/templates/llama3-dice.jinja
"""
import contextlib
import itertools
import json
import os
import time
from typing import Literal

from dice import DiceError, cli, data, models, protocol, scoring, trl_internals

SPEED_ONLY = ("batch_tokens", "chunk_rows", "num_processes")  # change speed, not the scores: not compared on a rerun


def is_valid(response, finish_reason, min_chars=3, max_chars=6700):
    """The paper code's filter: not cut by the token limit and min_chars < characters < max_chars."""
    return finish_reason != "length" and min_chars < len(response) < max_chars


def scored_responses(row, policy, reference, valid, starts):
    """01's row plus each response's log-probs and reward r = log pi(y|x) - log pi_ref(y|x) (beta left out)."""
    return {**row, "policy_logps": policy, "reference_logps": reference,
            "rewards": [p - q for p, q in zip(policy, reference)], "valid": valid, "completion_starts": starts}


def scored_pair(row, policy, reference):
    """The pair plus the log-probs and reward of its chosen and rejected responses."""
    return {**row, "policy_chosen_logps": policy[0], "policy_rejected_logps": policy[1],
            "reference_chosen_logps": reference[0], "reference_rejected_logps": reference[1],
            "chosen_reward": policy[0] - reference[0], "rejected_reward": policy[1] - reference[1]}


def score_chunk(chunk, tokenizer, scorers, state, args, counts):
    """The output rows of a chunk of (where, row), in input order, with the validity rule (--responses) or the
    accuracy rule (--pairs: a pair is ranked right when chosen_reward > rejected_reward) counted as they go."""
    rows = []
    logps = scoring.chunk_logps(chunk, tokenizer, scorers, state, args, counts)  # TRL's, per row in input order
    for (_, row), (policy, reference, kept, starts) in zip(chunk, logps):
        if args.mode == "pairs":
            rows.append(scored_pair(row, policy, reference))
            if kept[0]:  # a pair TRL drops (its prompt fills --max_length) is not counted
                margin = rows[-1]["chosen_reward"] - rows[-1]["rejected_reward"]
                counts["scored_pairs"] += 1
                counts["correct"] += margin > 0
                counts["ties"] += margin == 0
            continue
        valid = [is_valid(y, f, args.min_chars, args.max_chars) and k  # k: False where TRL drops the response
                 for y, f, k in zip(row["responses"], row["finish_reasons"], kept)]
        counts["invalid"] += valid.count(False)
        counts["invalid_finish_length"] += row["finish_reasons"].count("length")
        counts["invalid_chars"] += sum(not (args.min_chars < len(y) < args.max_chars) for y in row["responses"])
        rows.append(scored_responses(row, policy, reference, valid, starts))
    return rows


def main(
    *,
    policy: str,
    reference: str,
    responses: str | None = None,
    pairs: str | None = None,
    split: str = "train",
    out: str,
    chat_template: str | None = None,
    max_length: int = 4096,
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start",
    min_chars: int = 3,
    max_chars: int = 6700,
    dtype: Literal["float32", "bfloat16"] = "float32",
    attn_implementation: str | None = None,
    batch_tokens: int | None = None,
    chunk_rows: int = 256,
    overwrite: bool = False,
    trust_remote_code: bool = False,
):
    """Score responses (or pairs) with the DPO implicit reward log pi(y|x) - log pi_ref(y|x), TRL's own log-probs.

    Args:
        policy: the DPO model whose implicit reward ranks the responses (pi; round t: pi_{t-1}).
        reference: its reference model (pi_ref; round t: pi_{t-2}, round 1: the SFT model).
        responses: 01's responses (K per prompt): .jsonl/.json/.parquet, dataset folder or hub id; or --pairs.
        pairs: preference pairs (strings or TRL's conversational format), same sources (scores and accuracy).
        split: the split of a dataset folder or hub dataset id given to --responses or --pairs.
        out: output JSONL; OUT.done.json is written beside it.
        chat_template: jinja chat template file for both models instead of their own (configs/templates).
        max_length: TRL's max_length: prompt+response is cut to this many tokens (DPOConfig.max_length) (>= 2)
        truncation_mode: TRL's truncation_mode: keep_start (drop the end) or keep_end.
        min_chars: a response with <= min_chars characters is invalid (paper code: 3) (>= 0)
        max_chars: a response with >= max_chars characters is invalid (paper code: 6700) (>= 1)
        dtype: float32 (exact, for checks) or bfloat16 (bf16 weights and autocast: fast).
        attn_implementation: both models' attention: eager, sdpa, flash_attention_2... (default: transformers')
        batch_tokens: padded tokens per forward (batch x longest); default 16384 on GPUs, 1 on CPUs; lower on OOM (>= 1)
        chunk_rows: rows tokenized, sorted, scored and written together (memory stays flat) (>= 1)
        overwrite: redo an output made with other arguments or inputs.
        trust_remote_code: let transformers run code shipped with the model (off: safe default).
    """
    args = cli.flags(main, locals())
    if (args.responses is None) == (args.pairs is None):
        raise DiceError("give exactly one of --responses (01's output) or --pairs (prompt/chosen/rejected rows)")
    source = args.responses or args.pairs
    if os.path.abspath(args.out) == os.path.abspath(source):
        raise DiceError("--out must differ from the input file")
    if args.chat_template is not None:
        models.read_chat_template(args.chat_template)  # a missing or broken file fails here, before any work
    args.split = data.split_of(source, args.split)  # None for a file
    if args.max_chars <= args.min_chars:
        raise DiceError(f"--max_chars must be > --min_chars ({args.min_chars}), got {args.max_chars}")
    state = scoring.start_processes(args.dtype)  # one process, or one of N: only the main process locks and writes
    if args.batch_tokens is None:  # on CPUs one sequence per forward is fastest (measured): no padding
        args.batch_tokens = 16384 if state.device.type == "cuda" else 1
    args.mode, args.num_processes = "pairs" if args.pairs is not None else "responses", state.num_processes
    state.print("02_score " + json.dumps(vars(args)), flush=True)
    inputs = {k: getattr(args, k) for k in ("policy", "reference", "responses", "pairs", "chat_template")}
    with protocol.stage("02_score", args.out, vars(args), inputs=inputs, overwrite=args.overwrite, ignore=SPEED_ONLY,
                        main_process=state.is_main_process) as st:
        # ---- read and check every row before any model is loaded (errors name file:line; nothing is written)
        num_rows, num_seqs = scoring.check_input(source, args.split, args.mode)

        # ---- the two models, pi_{t-1} and pi_{t-2}, which must read the same tokens (--chat_template for both)
        tokenizer, ref_tokenizer = (models.load_tokenizer(path, args.trust_remote_code, args.chat_template)
                                    for path in (args.policy, args.reference))
        scoring.check_same_tokenizer(tokenizer, ref_tokenizer, args.policy, args.reference)
        scorers = scoring.shard([trl_internals.load_scorer(path, args.dtype, state.device, args.trust_remote_code,
                                                          args.attn_implementation)
                                 for path in (args.policy, args.reference)], state)  # ZeRO-3 config: sharded
        state.print(f"scoring {num_rows} rows ({num_seqs} sequences) of {source} with {state.num_processes} "
                    f"process(es) on {state.device}", flush=True)

        # ---- r(x, y) = log pi(y|x) - log pi_ref(y|x), chunk by chunk, written in input order by the main process
        counts, started = scoring.new_counts(args.mode), time.time()
        rows_in = scoring.read_input(source, args.split, args.mode)
        with protocol.atomic_open(st.tmp) if state.is_main_process else contextlib.nullcontext() as f:
            while chunk := list(itertools.islice(rows_in, args.chunk_rows)):  # --chunk_rows rows at a time
                rows = score_chunk(chunk, tokenizer, scorers, state, args, counts)
                if f is not None:
                    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                speed = counts["forward_tokens"] / max(time.time() - started, 1e-9)
                state.print(f"  {counts['rows']}/{num_rows} rows, {speed:.0f} tokens/s", flush=True)
        st.record.update(counts=counts, tokens_per_second=round(speed, 1))
        if args.mode == "pairs":  # the implicit-reward accuracy
            st.record["accuracy"] = counts["correct"] / counts["scored_pairs"] if counts["scored_pairs"] else None
    scoring.print_report(state, args, counts, st.record)
    scoring.finish(state)


if __name__ == "__main__":
    cli.run(main)
