"""Stage 2 of DICE: score responses with the DPO implicit reward of (policy, reference).

The paper (Chen et al., ICLR 2025, arXiv 2406.09760) ranks the K responses sampled for a prompt by the implicit reward
of the current DPO model (DPO, Rafailov et al. 2023):

    r(x, y) = beta * [ log pi(y|x) - log pi_ref(y|x) ]        log pi(y|x) = sum over the response tokens y_t of
                                                              log pi(y_t | x, y_<t)

Round 1 scores with (DPO model, its SFT model); round t > 1 with (model of round t-1, model of round t-2). beta is one
constant factor for every response, and the paper's code leaves it out, so `rewards` stores the UNSCALED log-ratio
policy_logps - reference_logps.

Exactness: every log-prob is the one TRL 1.16's DPOTrainer computes for the conversational row
prompt = [{"role": "user", "content": p}], chosen = [{"role": "assistant", "content": y}] (fp32: equal to within float
noise, tests/test_score.py checks it against TRL itself). That is: the prompt is the chat template with the generation
prompt (models.chat_prompt_ids), prompt+response is the whole conversation (the end-of-turn tokens belong to the
response), the response starts where the two token lists first differ (earlier than the prompt's end when tokens merge
across the boundary), prompt+response is cut to --max_length (--truncation_mode keep_start, TRL's default, or
keep_end), and the sum runs through TRL's own fused LM head (on its completion-positions-only path, which TRL takes on
GPUs, on every device). Stage 4 reuses these numbers as the reference log-probs.
The chat template is the tokenizers' own, or --chat_template FILE for both models (stage 4 must get the same file):
the official runs' formats are configs/templates/zephyr-dice.jinja, with which the scored tokens of a response are
those of `{response}</s>` after the prompt `<|system|>\\n </s>\\n<|user|>\\n{prompt}</s>\\n<|assistant|>\\n`, and
llama3-dice.jinja (`{response}<|eot_id|>`).
In --pairs mode the split is TRL's min over chosen and rejected; in --responses mode each response has its own split
(the same as TRL's for any pair of responses that split at the same place: all of them, unless a response starts with
whitespace that merges with the prompt's last token; those are counted as `boundary_merges`). Each row records the
splits as `completion_starts`; 03 passes reference log-probs to stage 4 only for pairs whose two splits agree.

Input: a .jsonl file (streamed; errors name file:line), a .json file (a list of objects, or JSON lines as the official
DICE data), a .parquet file, a folder saved with datasets' `save_to_disk`, or a hub dataset id (--split picks the split
of a folder or hub dataset) -- data.read_rows.
Input -> output (JSONL, one row per line; other fields are kept as they are):
  --responses: 01's rows `prompt_id`, `prompt` (string or messages), `responses` (K strings), `finish_reasons` (K of
      "stop"/"length"), `num_tokens`, `generator`  ->  plus `policy_logps` (K floats), `reference_logps` (K),
      `rewards` (K, policy - reference, not scaled by beta), `valid` (K bools), `completion_starts` (K ints: the
      token where each response starts in the tokenized conversation). A response is valid when its finish
      reason is not "length" and --min_chars < len(response) < --max_chars (the paper code's 3 and 6700). Invalid
      responses are still scored; `valid` says they must not be ranked.
  --pairs: pairs in any shape data.read_pair reads: `prompt`, `chosen`, `rejected` strings; TRL's conversational
      format (prompt as messages, chosen/rejected as one assistant turn); or full conversations whose last turn is
      the answer (HuggingFaceH4/ultrafeedback_binarized; `prompt` then optional). The output row is the input row with
      prompt/chosen/rejected rewritten in the project's pair shape, which 03 --offline and 04 read: prompt a string
      (one user turn) or the messages before the answer, chosen/rejected the answer strings; every other field (e.g.
      prompt_id, messages, score_chosen) is kept  ->  plus `policy_chosen_logps`, `policy_rejected_logps`,
      `reference_chosen_logps`, `reference_rejected_logps`, `chosen_reward`, `rejected_reward`; the implicit-reward
      accuracy (share of pairs with chosen_reward > rejected_reward) is printed and saved in the done marker.
  Also OUT.done.json (protocol.stage): the arguments, input fingerprints, counts and, in --pairs mode, the accuracy.
  A rerun with the same arguments and inputs prints "done already" (exit 0) before any model is loaded; other
  arguments or changed inputs are refused unless --overwrite. --batch_tokens, --chunk_rows and the number of
  processes only change speed (the scores agree to float noise), so they are recorded but not compared.

Bad input: a malformed row or field is an error naming file:line (in a .parquet file or a dataset: its row); a
non-finite log-prob is an error (nothing is written: a NaN must never be ranked); responses cut by --max_length are
scored as TRL cuts them and counted (`truncated`); a response whose prompt alone fills --max_length gets log-probs 0.0
(no token left), valid=false, and is counted (`prompt_too_long`; TRL drops such rows before training).

Speed: one forward per sequence per model; the prompt is tokenized once per row; sequences are sorted by length and
batched by a token budget (--batch_tokens, padded tokens; on CPUs one sequence per forward is fastest, measured) in
chunks of --chunk_rows rows written as they finish, so memory stays flat for any number of rows of a .jsonl file or a
dataset (memory-mapped by datasets; a .json or .parquet file is read whole). --dtype bfloat16 loads the weights in
bf16 and runs under bf16 autocast (faster on GPUs and on CPUs with bf16 support; fp32 for exactness). Several
processes split the batches of each chunk (the batches never depend on the number of processes) and write ONE output,
identical to a single-process run:
    accelerate launch --num_processes N 02_score.py ...     (GPUs; also `torchrun --nproc_per_node N 02_score.py ...`)
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes N 02_score.py ...   (N CPU processes, gloo;
    accelerate 1.15's `launch --cpu --num_processes N` starts ONE process unless mpirun is set up)

Smoke run (tiny offline models, seconds):
    python tools/tiny_model.py --out /tmp/tiny_policy --seed 1
    python tools/tiny_model.py --out /tmp/tiny_ref --seed 2
    python 02_score.py --policy /tmp/tiny_policy --reference /tmp/tiny_ref \
        --pairs data/demo/preferences.jsonl --out /tmp/scored_prefs.jsonl --max_length 512
Full run (one 8-GPU node, round t; the official Zephyr prompt format):
    accelerate launch --num_processes 8 02_score.py --policy runs/round1/model --reference runs/sft \
        --responses runs/round1/responses.jsonl --out runs/round1/scores.jsonl --dtype bfloat16 \
        --chat_template configs/templates/zephyr-dice.jinja
Held-out accuracy on a hub preference set (TRL's conversational format):
    python 02_score.py --policy runs/round1/model --reference runs/sft --pairs HuggingFaceH4/ultrafeedback_binarized \
        --split test_prefs --out runs/round1/eval_scores.jsonl --chat_template configs/templates/zephyr-dice.jinja
"""
import contextlib
import json
import math
import os
import time

from dice import DiceError, cli, data, models, protocol, trl_internals

SPEED_ONLY = ("batch_tokens", "chunk_rows", "num_processes")  # change speed, not the scores: not compared on a rerun


# ----------------------------------------------------------------------------- pure functions (tests import these)

def is_valid(response, finish_reason, min_chars=3, max_chars=6700):
    """The paper code's filter: not cut by the token limit and min_chars < characters < max_chars."""
    return finish_reason != "length" and min_chars < len(response) < max_chars


def common_prefix_length(a, b):
    """Number of leading tokens `a` and `b` share (TRL's `common_prefix_length`)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def conversation_ids(tokenizer, prompt, completions):
    """Token ids of prompt+completion for each completion, as TRL tokenizes a conversational row: the whole
    conversation through the chat template, no special tokens added again. One batched call for all completions."""
    messages = data.to_messages(prompt)
    convs = [messages + [{"role": "assistant", "content": c}] for c in completions]
    out = tokenizer.apply_chat_template(convs, tokenize=True, return_dict=True)["input_ids"]
    return [list(ids) for ids in out]


def truncate(full_ids, start, max_length, truncation_mode="keep_start"):
    """TRL's collator cut of prompt+completion to max_length. Returns (ids, completion_start, truncated), or None
    when TRL drops the row (keep_start and the prompt part alone is >= max_length, so no completion token is left)."""
    if max_length is None or len(full_ids) <= max_length:
        return full_ids, start, False
    if truncation_mode == "keep_start":
        if start >= max_length:
            return None
        return full_ids[:max_length], start, True
    offset = len(full_ids) - max_length  # keep_end
    return full_ids[offset:], max(0, start - offset), True


def make_batches(lengths, batch_tokens):
    """Sort sequences by length (longest first) and cut them into batches whose padded size (batch size x longest
    length) stays within batch_tokens; a sequence longer than the budget is a batch of its own. Returns index lists."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def assign_batches(batches, lengths, num_processes):
    """Give each batch to the least-loaded process (padded tokens), longest first. The batches themselves never
    depend on the number of processes, so every log-prob is computed in the same batch as in a single-process run."""
    loads = [0] * num_processes
    owner = []
    for batch in batches:
        rank = loads.index(min(loads))
        loads[rank] += len(batch) * max(lengths[i] for i in batch)
        owner.append(rank)
    return owner


def check_same_tokenizer(policy_tok, reference_tok, policy, reference):
    """Policy and reference must read the same tokens: same vocabulary, special tokens and chat template."""
    if policy_tok.get_vocab() != reference_tok.get_vocab():
        raise DiceError(f"policy {policy} and reference {reference} have different vocabularies; they must share a "
                        "tokenizer")
    for name in ("bos_token", "eos_token"):
        if getattr(policy_tok, name) != getattr(reference_tok, name):
            raise DiceError(f"policy and reference tokenizers differ in {name} ({getattr(policy_tok, name)!r} vs "
                            f"{getattr(reference_tok, name)!r}); they must share a tokenizer")
    if policy_tok.chat_template != reference_tok.chat_template:
        raise DiceError(f"policy {policy} and reference {reference} have different chat templates; they must share "
                        "a tokenizer (or pass --chat_template FILE for both)")
    if not policy_tok.chat_template:
        raise DiceError(f"the tokenizer of {policy} has no chat template (scores are computed on chat conversations); "
                        "pass --chat_template FILE")


def check_row(row, where):
    """Raise a DiceError naming `where` (file:line) for a row of 01's output that cannot be scored. Returns K."""
    if "prompt" not in row:
        raise DiceError(f"{where}: missing field 'prompt'")
    data.to_messages(row["prompt"], where=where)
    for key in ("responses", "finish_reasons"):
        if key not in row:
            raise DiceError(f"{where}: missing field '{key}'")
        if not isinstance(row[key], list):
            raise DiceError(f"{where}: '{key}' must be a list, got {type(row[key]).__name__}")
    responses, reasons = row["responses"], row["finish_reasons"]
    if not responses:
        raise DiceError(f"{where}: 'responses' is empty")
    if len(reasons) != len(responses):
        raise DiceError(f"{where}: {len(responses)} responses but {len(reasons)} finish_reasons")
    if "num_tokens" in row and (not isinstance(row["num_tokens"], list) or len(row["num_tokens"]) != len(responses)):
        raise DiceError(f"{where}: 'num_tokens' must be a list of {len(responses)} ints")
    for k, (r, f) in enumerate(zip(responses, reasons)):
        if not isinstance(r, str):
            raise DiceError(f"{where}: responses[{k}] must be a string, got {type(r).__name__}")
        if not isinstance(f, str):
            raise DiceError(f"{where}: finish_reasons[{k}] must be a string such as 'stop' or 'length', got {f!r}")
    for key in ("policy_logps", "policy_chosen_logps"):
        if key in row:
            raise DiceError(f"{where}: the row already has '{key}' (is this a scored file?)")
    return len(responses)


def tokenize_row(tokenizer, row, mode, max_length, truncation_mode):
    """The sequences of one row: a list (one per response, or [chosen, rejected]) of (ids, completion_start) after
    TRL's truncation, or None where TRL would drop it; the untruncated completion starts (one per response; in pairs
    mode TRL's min of the two); plus counts for the report."""
    prompt_ids = models.chat_prompt_ids(tokenizer, row["prompt"])  # once per row, shared by its K responses
    completions = [row["chosen"], row["rejected"]] if mode == "pairs" else row["responses"]
    fulls = conversation_ids(tokenizer, row["prompt"], completions)
    starts = [common_prefix_length(prompt_ids, ids) for ids in fulls]
    counts = {"boundary_merges": sum(s < len(prompt_ids) for s in starts), "truncated": 0, "prompt_too_long": 0}
    if mode == "pairs":  # TRL: the completion of both starts at the shorter common prefix
        starts = [min(starts)] * 2
    seqs = []
    for ids, start in zip(fulls, starts):
        cut = truncate(ids, start, max_length, truncation_mode)
        if cut is None:
            counts["prompt_too_long"] += 1
            seqs.append(None)
            continue
        counts["truncated"] += cut[2]
        seqs.append((cut[0], cut[1]))
    return seqs, starts, counts


def padding_id(tokenizer):
    """TRL's padding id (pad, else EOS); padding is masked out, so any id will do when the tokenizer has neither."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad_id is None else pad_id


def read_input(source, split, mode):
    """Yield (where, row) for every input row (data.read_rows: any file or dataset shape); in pairs mode the row's
    prompt/chosen/rejected are rewritten in the project's pair shape (data.read_pair), its other fields kept."""
    for where, row in data.read_rows(source, split):
        yield where, ({**row, **data.read_pair(row, where)} if mode == "pairs" else row)


def chunks(source, split, mode, chunk_rows):
    """Stream (where, row) in lists of chunk_rows rows (the rows were already checked)."""
    chunk = []
    for where, row in read_input(source, split, mode):
        chunk.append((where, row))
        if len(chunk) == chunk_rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def scored_row(row, mode, policy, reference, valid, starts=None):
    out = dict(row)
    if mode == "pairs":
        out["policy_chosen_logps"], out["policy_rejected_logps"] = policy
        out["reference_chosen_logps"], out["reference_rejected_logps"] = reference
        out["chosen_reward"] = policy[0] - reference[0]
        out["rejected_reward"] = policy[1] - reference[1]
    else:
        out["policy_logps"] = policy
        out["reference_logps"] = reference
        out["rewards"] = [p - r for p, r in zip(policy, reference)]
        out["valid"] = valid
        out["completion_starts"] = starts
    return out


# ----------------------------------------------------------------------------- the steps of main

def start_processes():
    """This run's accelerate PartialState: one process, or one of N (accelerate launch / torchrun) joined by gloo on
    CPUs and NCCL on GPUs. A process started as one of N that joined no group is refused (each would write OUT)."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=cpu)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and state.num_processes == 1:
        raise DiceError(f"started as one of {os.environ['WORLD_SIZE']} processes that did not form a group; refusing "
                        "to let each write the output (launch with accelerate launch --num_processes N or torchrun)")
    return state


def resolve_args(values, state):
    """main's arguments checked and converted (fire ignores type hints), plus the mode and the number of processes."""
    args = cli.legacy_convert(values, {
        "policy": str, "reference": str, "responses": str, "pairs": str, "split": str, "out": str,
        "chat_template": str, "max_length": (int, 2),
        "truncation_mode": ("keep_start", "keep_end"), "min_chars": (int, 0), "max_chars": (int, 1),
        "dtype": ("float32", "bfloat16"), "batch_tokens": (int, 1), "chunk_rows": (int, 1), "overwrite": bool,
        "trust_remote_code": bool})
    if args["policy"] is None or args["reference"] is None:
        raise DiceError("--policy and --reference are required")
    if (args["responses"] is None) == (args["pairs"] is None):
        raise DiceError("give exactly one of --responses (01's output) or --pairs (prompt/chosen/rejected rows)")
    if args["out"] is None:
        raise DiceError("--out is required")
    if os.path.abspath(args["out"]) == os.path.abspath(args["responses"] or args["pairs"]):
        raise DiceError("--out must differ from the input file")
    if args["chat_template"] is not None:
        models.read_chat_template(args["chat_template"])  # a missing or broken file fails here, before any work
    args["split"] = data.split_of(args["responses"] or args["pairs"], args["split"])
    if args["max_chars"] <= args["min_chars"]:
        raise DiceError(f"--max_chars must be > --min_chars ({args['min_chars']}), got {args['max_chars']}")
    if args["batch_tokens"] is None:  # on CPUs one sequence per forward is fastest (measured): no padding
        args["batch_tokens"] = 16384 if state.device.type == "cuda" else 1
    return {**args, "mode": "pairs" if args["pairs"] is not None else "responses", "num_processes": state.num_processes}


def check_input(source, split, mode):
    """Check every row before any model work (file:line errors, nothing written). Returns (rows, sequences)."""
    num_rows = num_seqs = 0
    for where, row in read_input(source, split, mode):  # pairs: data.read_pair checked it
        num_seqs += 2 if mode == "pairs" else check_row(row, where)
        num_rows += 1
    if num_rows == 0:
        raise DiceError(f"{source} has no rows")
    return num_rows, num_seqs


def new_counts(mode):
    keys = ["rows", "sequences", "invalid", "invalid_finish_length", "invalid_chars", "truncated", "prompt_too_long",
            "boundary_merges", "rows_with_split_mismatch", "forward_tokens", "padded_tokens", "completion_tokens"]
    return dict.fromkeys(keys + (["scored_pairs", "correct", "ties"] if mode == "pairs" else []), 0)


def score_sequences(seqs, models, pad_id, state, args, counts):
    """(policy, reference) log-probs of every sequence [(ids, completion_start)], in order. The length-sorted batches
    never depend on the number of processes; each process scores its share and all of them get every result."""
    import torch

    lengths = [len(ids) for ids, _ in seqs]
    batches = make_batches(lengths, args["batch_tokens"])
    autocast = torch.bfloat16 if args["dtype"] == "bfloat16" else None
    mine = []
    for batch, rank in zip(batches, assign_batches(batches, lengths, state.num_processes)):
        if rank == state.process_index:
            group = [seqs[i] for i in batch]
            mine.extend(zip(batch, *(trl_internals.batch_logps(m, group, pad_id, state.device, autocast) for m in models)))
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    results = {i: (p, q) for i, p, q in mine}
    if len(results) != len(seqs):
        raise DiceError(f"internal error: {len(results)} of {len(seqs)} sequences came back")
    counts["forward_tokens"] += sum(lengths)
    counts["padded_tokens"] += sum(len(b) * lengths[b[0]] for b in batches)
    counts["completion_tokens"] += sum(len(ids) - max(start, 1) for ids, start in seqs)
    return [results[i] for i in range(len(seqs))]


def score_chunk(chunk, tokenizer, models, state, args, counts):
    """One chunk of (where, row): tokenize each row as TRL does, score its sequences, and return the output rows in
    input order (log-probs, rewards, validity), counting as it goes."""
    mode, min_chars, max_chars = args["mode"], args["min_chars"], args["max_chars"]
    seqs, owners, row_seqs, row_starts = [], [], [], []  # the chunk's sequences; (row, slot) of each; per row
    for r, (_, row) in enumerate(chunk):
        these, starts, c = tokenize_row(tokenizer, row, mode, args["max_length"], args["truncation_mode"])
        for key in ("truncated", "prompt_too_long", "boundary_merges"):
            counts[key] += c[key]
        counts["rows_with_split_mismatch"] += 0 < c["boundary_merges"] < len(these)
        row_seqs.append(these)
        row_starts.append(starts)
        owners += [(r, k) for k, s in enumerate(these) if s is not None]
        seqs += [s for s in these if s is not None]
    lookup = dict(zip(owners, score_sequences(seqs, models, padding_id(tokenizer), state, args, counts)))
    for (r, k), (p, q) in lookup.items():
        if not (math.isfinite(p) and math.isfinite(q)):
            raise DiceError(f"{chunk[r][0]}: non-finite log-prob (policy {p}, reference {q}) for "
                            f"sequence {k}; the model produced nan/inf (with --dtype bfloat16 try float32); nothing "
                            "was written")
    rows = []
    for r, (_, row) in enumerate(chunk):
        pol, ref = zip(*(lookup.get((r, k), (0.0, 0.0)) for k in range(len(row_seqs[r]))))  # 0.0: nothing left
        valid = None
        if mode == "responses":
            valid = [is_valid(y, f, min_chars, max_chars) and s is not None
                     for y, f, s in zip(row["responses"], row["finish_reasons"], row_seqs[r])]
            counts["invalid"] += valid.count(False)
            counts["invalid_finish_length"] += row["finish_reasons"].count("length")
            counts["invalid_chars"] += sum(not (min_chars < len(y) < max_chars) for y in row["responses"])
        elif row_seqs[r][0] is not None:
            margin = (pol[0] - ref[0]) - (pol[1] - ref[1])
            counts["scored_pairs"] += 1
            counts["correct"] += margin > 0
            counts["ties"] += margin == 0
        counts["rows"] += 1
        counts["sequences"] += len(row_seqs[r])
        rows.append(scored_row(row, mode, list(pol), list(ref), valid, row_starts[r]))
    return rows


def print_report(state, args, counts, record):
    """The last lines: where the output is, the counts, what was cut or invalid, the accuracy, the speed."""
    state.print(f"wrote {args['out']} ({counts['rows']} rows, {counts['sequences']} sequences) and "
                f"{protocol.done_marker(args['out'])}")
    state.print("counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if counts["truncated"] or counts["prompt_too_long"]:
        state.print(f"note: {counts['truncated']} sequences were cut to --max_length {args['max_length']} "
                    f"({args['truncation_mode']}) as TRL cuts them; {counts['prompt_too_long']} had a prompt of >= "
                    f"{args['max_length']} tokens (scored 0.0, invalid)")
    if args["mode"] == "responses":
        state.print(f"valid responses: {counts['sequences'] - counts['invalid']} of {counts['sequences']} "
                    f"(finish_reason length: {counts['invalid_finish_length']}, outside {args['min_chars']} < chars < "
                    f"{args['max_chars']}: {counts['invalid_chars']})")
    elif record["accuracy"] is None:
        state.print("implicit-reward accuracy: no pair was scored")
    else:
        state.print(f"implicit-reward accuracy: {record['accuracy']:.4f} ({counts['correct']} of "
                    f"{counts['scored_pairs']} pairs with chosen_reward > rejected_reward; ties {counts['ties']})")
    state.print(f"{record['tokens_per_second']} tokens/s ({args['dtype']}, {args['num_processes']} process(es))")


# ----------------------------------------------------------------------------- the stage

def main(
    policy: str = None,
    reference: str = None,
    responses: str = None,
    pairs: str = None,
    split: str = "train",
    out: str = None,
    chat_template: str = None,
    max_length: int = 4096,
    truncation_mode: str = "keep_start",
    min_chars: int = 3,
    max_chars: int = 6700,
    dtype: str = "float32",
    batch_tokens: int = None,
    chunk_rows: int = 256,
    overwrite: bool = False,
    trust_remote_code: bool = False,
):
    """Score responses (or pairs) with the DPO implicit reward log pi(y|x) - log pi_ref(y|x), TRL's own log-probs.

    Args:
        policy: the DPO model whose implicit reward ranks the responses (pi; round t: model t-1).
        reference: its reference model (pi_ref; round 1: the SFT model, round t: model t-2).
        responses: 01's responses (K per prompt): .jsonl/.json/.parquet, dataset folder or hub id; or --pairs.
        pairs: preference pairs (strings or TRL's conversational format), same sources (scores and accuracy).
        split: the split of a dataset folder or hub dataset id given to --responses or --pairs.
        out: output JSONL; OUT.done.json is written beside it.
        chat_template: jinja chat template file for both models instead of their own (configs/templates).
        max_length: TRL's max_length: prompt+response is cut to this many tokens (DPOConfig.max_length).
        truncation_mode: TRL's truncation_mode: keep_start (drop the end) or keep_end.
        min_chars: a response with <= min_chars characters is invalid (paper code: 3).
        max_chars: a response with >= max_chars characters is invalid (paper code: 6700).
        dtype: float32 (exact, for checks) or bfloat16 (bf16 weights and autocast: fast).
        batch_tokens: padded tokens per forward (batch x longest); default 16384 on GPUs, 1 on CPUs; lower on OOM.
        chunk_rows: rows tokenized, sorted, scored and written together (memory stays flat).
        overwrite: redo an output made with other arguments or inputs.
        trust_remote_code: let transformers run code shipped with the model (off: safe default).
    """
    values = dict(locals())
    state = start_processes()  # first: only the main process locks and writes
    args = resolve_args(values, state)
    state.print("02_score " + json.dumps(args), flush=True)
    mode, path = args["mode"], args[args["mode"]]
    inputs = {k: args[k] for k in ("policy", "reference", "responses", "pairs", "chat_template")}  # by content
    with protocol.stage("02_score", args["out"], args, inputs=inputs, overwrite=args["overwrite"], ignore=SPEED_ONLY,
                      main_process=state.is_main_process) as st:
        num_rows, num_seqs = check_input(path, args["split"], mode)

        # ---- the two models, which must read the same tokens (rendered with --chat_template when given)
        tokenizer, ref_tokenizer = (models.load_tokenizer(args[who], args["trust_remote_code"], args["chat_template"])
                                    for who in ("policy", "reference"))
        check_same_tokenizer(tokenizer, ref_tokenizer, args["policy"], args["reference"])
        models = [trl_internals.load_scorer(args[who], args["dtype"], state.device, args["trust_remote_code"])
                  for who in ("policy", "reference")]
        state.print(f"scoring {num_rows} rows ({num_seqs} sequences) of {path} with {state.num_processes} "
                    f"process(es) on {state.device}", flush=True)

        # ---- r(x, y) = log pi(y|x) - log pi_ref(y|x), chunk by chunk, written in input order by the main process
        counts, started = new_counts(mode), time.time()
        with protocol.atomic_open(st.tmp) if state.is_main_process else contextlib.nullcontext() as f:
            for chunk in chunks(path, args["split"], mode, args["chunk_rows"]):
                rows = score_chunk(chunk, tokenizer, models, state, args, counts)
                if f is not None:
                    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                speed = counts["forward_tokens"] / max(time.time() - started, 1e-9)
                state.print(f"  {counts['rows']}/{num_rows} rows, {speed:.0f} tokens/s", flush=True)
        st.record.update(counts=counts, tokens_per_second=round(speed, 1))
        if mode == "pairs":
            st.record["accuracy"] = counts["correct"] / counts["scored_pairs"] if counts["scored_pairs"] else None
    print_report(state, args, counts, st.record)


if __name__ == "__main__":
    cli.run(main)
