"""02's machinery: TRL-exact tokenization of a row, batching, multi-process scoring, input checks, counts and report.

Exactness: every log-prob is the one TRL 1.16's DPOTrainer computes for the conversational row prompt = [{"role":
"user", "content": p}], chosen = [{"role": "assistant", "content": y}] (fp32: equal to within float noise;
tests/test_score.py checks it against TRL itself):
  - the prompt is the chat template with the generation prompt (models.chat_prompt_ids); prompt+response is the whole
    conversation, so the end-of-turn tokens belong to the response (`conversation_ids`);
  - the response starts where the two token lists first differ (`common_prefix_length`): earlier than the prompt's end
    when tokens merge across the boundary. In --pairs mode the split is TRL's min over chosen and rejected; in
    --responses mode each response has its own split (TRL's for any pair of responses that split at the same place:
    all of them, unless a response starts with whitespace that merges with the prompt's last token, counted as
    `boundary_merges`). Rows record the splits as `completion_starts`; 03 passes reference log-probs to stage 4 only
    for pairs whose two splits agree;
  - prompt+response is cut to --max_length as TRL's collator cuts it (`truncate`, counted as `truncated`); a response
    whose prompt alone fills --max_length (TRL drops such rows) gets log-probs 0.0, is invalid and is counted
    (`prompt_too_long`);
  - the sum runs through TRL's own fused LM head (trl_internals.batch_logps). A non-finite log-prob is an error:
    nothing is written, a NaN must never be ranked.
Speed: one forward per sequence per model; sequences sorted by length and batched by a token budget (--batch_tokens
padded tokens; on CPUs one sequence per forward is fastest, measured), in chunks of --chunk_rows rows, so memory stays
flat. Several processes split the batches of each chunk (the batches never depend on the number of processes) and the
main process writes ONE output, identical to a single process's:
    accelerate launch --num_processes N 02_score.py ...     (GPUs; also `torchrun --nproc_per_node N 02_score.py ...`)
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes N 02_score.py ...   (N CPU processes, gloo;
    accelerate 1.15's `launch --cpu --num_processes N` starts ONE process unless mpirun is set up)
"""
import math
import os

from dice import DiceError, data, models, protocol, trl_internals

# ----------------------------------------------------------------------------- TRL's tokenization of a row


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


# ----------------------------------------------------------------------------- batches and processes

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


def score_sequences(seqs, scorers, pad_id, state, batch_tokens, dtype, counts):
    """(policy, reference) log-probs of every sequence [(ids, completion_start)], in order. The length-sorted batches
    never depend on the number of processes; each process scores its share and all of them get every result."""
    import torch

    lengths = [len(ids) for ids, _ in seqs]
    batches = make_batches(lengths, batch_tokens)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    mine = []
    for batch, rank in zip(batches, assign_batches(batches, lengths, state.num_processes)):
        if rank == state.process_index:
            group = [seqs[i] for i in batch]
            mine.extend(zip(batch, *(trl_internals.batch_logps(m, group, pad_id, state.device, autocast)
                                     for m in scorers)))
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


def chunk_logps(chunk, tokenizer, scorers, state, args, counts):
    """The log-probs of a chunk of (where, row): each row tokenized as TRL does, all its sequences scored together.
    Returns, per row in input order, (policy log-probs, reference log-probs, kept, completion starts): one entry per
    response (pairs mode: chosen, rejected); a sequence TRL drops (`kept` False) gets 0.0 (nothing left to score)."""
    seqs, owners, row_seqs, row_starts = [], [], [], []  # the chunk's sequences; (row, slot) of each; per row
    for r, (_, row) in enumerate(chunk):
        these, starts, c = tokenize_row(tokenizer, row, args.mode, args.max_length, args.truncation_mode)
        for key in ("truncated", "prompt_too_long", "boundary_merges"):
            counts[key] += c[key]
        counts["rows_with_split_mismatch"] += 0 < c["boundary_merges"] < len(these)
        row_seqs.append(these)
        row_starts.append(starts)
        owners += [(r, k) for k, s in enumerate(these) if s is not None]
        seqs += [s for s in these if s is not None]
    logps = score_sequences(seqs, scorers, padding_id(tokenizer), state, args.batch_tokens, args.dtype, counts)
    lookup = dict(zip(owners, logps))
    for (r, k), (p, q) in lookup.items():
        if not (math.isfinite(p) and math.isfinite(q)):
            raise DiceError(f"{chunk[r][0]}: non-finite log-prob (policy {p}, reference {q}) for "
                            f"sequence {k}; the model produced nan/inf (with --dtype bfloat16 try float32); nothing "
                            "was written")
    out = []
    for r, these in enumerate(row_seqs):
        policy, reference = zip(*(lookup.get((r, k), (0.0, 0.0)) for k in range(len(these))))
        out.append((list(policy), list(reference), [s is not None for s in these], row_starts[r]))
        counts["rows"] += 1
        counts["sequences"] += len(these)
    return out


# ----------------------------------------------------------------------------- input

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


def read_input(source, split, mode):
    """Yield (where, row) for every input row (data.read_rows: any file or dataset shape); in pairs mode the row's
    prompt/chosen/rejected are rewritten in the project's pair shape (data.read_pair), its other fields kept."""
    for where, row in data.read_rows(source, split):
        yield where, ({**row, **data.read_pair(row, where)} if mode == "pairs" else row)


def check_input(source, split, mode):
    """Check every row before any model work (file:line errors, nothing written). Returns (rows, sequences)."""
    num_rows = num_seqs = 0
    for where, row in read_input(source, split, mode):  # pairs: data.read_pair checked it
        num_seqs += 2 if mode == "pairs" else check_row(row, where)
        num_rows += 1
    if num_rows == 0:
        raise DiceError(f"{source} has no rows")
    return num_rows, num_seqs


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


# ----------------------------------------------------------------------------- counts and the report

def new_counts(mode):
    keys = ["rows", "sequences", "invalid", "invalid_finish_length", "invalid_chars", "truncated", "prompt_too_long",
            "boundary_merges", "rows_with_split_mismatch", "forward_tokens", "padded_tokens", "completion_tokens"]
    return dict.fromkeys(keys + (["scored_pairs", "correct", "ties"] if mode == "pairs" else []), 0)


def print_report(state, args, counts, record):
    """The last lines: where the output is, the counts, what was cut or invalid, the accuracy, the speed."""
    state.print(f"wrote {args.out} ({counts['rows']} rows, {counts['sequences']} sequences) and "
                f"{protocol.done_marker(args.out)}")
    state.print("counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if counts["truncated"] or counts["prompt_too_long"]:
        state.print(f"note: {counts['truncated']} sequences were cut to --max_length {args.max_length} "
                    f"({args.truncation_mode}) as TRL cuts them; {counts['prompt_too_long']} had a prompt of >= "
                    f"{args.max_length} tokens (scored 0.0, invalid)")
    if args.mode == "responses":
        state.print(f"valid responses: {counts['sequences'] - counts['invalid']} of {counts['sequences']} "
                    f"(finish_reason length: {counts['invalid_finish_length']}, outside {args.min_chars} < chars < "
                    f"{args.max_chars}: {counts['invalid_chars']})")
    elif record["accuracy"] is None:
        state.print("implicit-reward accuracy: no pair was scored")
    else:
        state.print(f"implicit-reward accuracy: {record['accuracy']:.4f} ({counts['correct']} of "
                    f"{counts['scored_pairs']} pairs with chosen_reward > rejected_reward; ties {counts['ties']})")
    state.print(f"{record['tokens_per_second']} tokens/s ({args.dtype}, {args.num_processes} process(es))")
