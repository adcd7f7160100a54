"""02's machinery: TRL-exact tokenization of a row, batching, multi-process scoring, input checks, counts and report.

Exact against TRL 1.16's DPOTrainer on the conversational row (prompt, response) (tests/test_score.py checks it):
  - prompt+response is the whole conversation through the chat template: the end-of-turn tokens belong to the response;
  - the response starts where the prompt's and the conversation's tokens first differ (earlier than the prompt's end
    when tokens merge across the boundary: `boundary_merges`); --pairs: TRL's min over chosen and rejected;
    --responses: each response's own (`completion_starts`; 03 reuses reference log-probs only where splits agree);
  - cut to --max_length as TRL's collator cuts (`truncated`); a response whose prompt alone fills it (TRL drops such
    rows) gets log-probs 0.0 and is invalid (`prompt_too_long`);
  - summed by TRL's own fused LM head (trl_internals.batch_logps); a non-finite log-prob is an error, nothing written.
Speed: sequences sorted by length, batched by --batch_tokens padded tokens, --chunk_rows rows at a time (memory stays
flat). N processes (accelerate launch / torchrun) split each chunk's batches, which never depend on N; the main process
writes ONE output. N CPU processes (gloo): `CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes N
02_score.py ...` (accelerate 1.15's `launch --cpu --num_processes N` starts ONE process unless mpirun is set up).
Models that do not fit one GPU: `accelerate launch --config_file configs/accelerate/zero3_scoring.yaml` shards them with
DeepSpeed ZeRO-3 as TRL's DPOTrainer shards its policy and reference (`shard`); every forward gathers each layer's
weights from all processes, so they step in lockstep, a process whose share is done running dummy forwards.
"""
import math
import os
import sys

from dice import DiceError, data, models, protocol, trl_internals

# ----------------------------------------------------------------------------- TRL's tokenization of a row

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
    # TRL tokenizes the whole conversation (no special tokens added again); one call for all completions
    convs = [data.to_messages(row["prompt"]) + [{"role": "assistant", "content": c}] for c in completions]
    fulls = [list(ids) for ids in tokenizer.apply_chat_template(convs, tokenize=True, return_dict=True)["input_ids"]]
    starts = [len(os.path.commonprefix([prompt_ids, ids])) for ids in fulls]  # TRL's common_prefix_length
    merges = sum(s < len(prompt_ids) for s in starts)
    if mode == "pairs":  # TRL: the completion of both starts at the shorter common prefix
        starts = [min(starts)] * 2
    cuts = [truncate(ids, start, max_length, truncation_mode) for ids, start in zip(fulls, starts)]
    counts = {"boundary_merges": merges, "truncated": sum(c is not None and c[2] for c in cuts),
              "prompt_too_long": cuts.count(None)}
    return [None if c is None else c[:2] for c in cuts], starts, counts


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
    batches = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def assign_batches(batches, lengths, num_processes):
    """Give each batch to the least-loaded process (padded tokens), longest first. The batches themselves never
    depend on the number of processes, so every log-prob is computed in the same batch as in a single-process run."""
    loads, owner = [0] * num_processes, []
    for batch in batches:
        rank = loads.index(min(loads))
        loads[rank] += len(batch) * max(lengths[i] for i in batch)
        owner.append(rank)
    return owner


def start_processes(dtype="float32"):
    """This run's accelerate PartialState: one process, or one of N (accelerate launch / torchrun) joined by gloo on
    CPUs and NCCL on GPUs; under an accelerate DeepSpeed ZeRO-3 config an Accelerator, whose plugin makes
    from_pretrained load each model sharded (zero.Init), in `dtype` (the DeepSpeed config's bf16 follows --dtype, not
    the launcher). A process started as one of N that joined no group is refused (each would write OUT)."""
    import torch
    from accelerate import Accelerator, PartialState

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":  # accelerate launch with a DeepSpeed config
        PartialState(cpu=False, backend=None if torch.cuda.is_available() else "gloo")  # CPUs: else N counted as 1
        state = Accelerator(mixed_precision="bf16" if dtype == "bfloat16" else "no")
        if state.state.deepspeed_plugin.zero_stage != 3:
            raise DiceError(f"the accelerate config uses DeepSpeed ZeRO stage {state.state.deepspeed_plugin.zero_stage}"
                            "; scoring shards models with ZeRO-3 only (configs/accelerate/zero3_scoring.yaml; "
                            "configs/accelerate/multi_gpu.yaml for one full copy per GPU)")
    else:
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        state = PartialState(cpu=cpu)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and state.num_processes == 1:
        raise DiceError(f"started as one of {os.environ['WORLD_SIZE']} processes that did not form a group; refusing "
                        "to let each write the output (launch with accelerate launch --num_processes N or torchrun)")
    return state


def zero3(state):
    """True when the models are sharded with DeepSpeed ZeRO-3 (start_processes under a DeepSpeed config)."""
    return state.distributed_type == "DEEPSPEED"


def shard(models, state):
    """The models as DeepSpeed ZeRO-3 inference engines (no optimizer) under a DeepSpeed config, as TRL 1.16's
    DPOTrainer makes its policy and reference: the first through accelerator.prepare (accelerate's ZeRO inference; it
    fills the config's "auto" entries), the others through trl.models.prepare_deepspeed. Else the models as they are."""
    if not zero3(state):
        return models
    from trl.models import prepare_deepspeed

    state.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1  # unused (no dataloader)
    models = [state.prepare(models[0])] + [prepare_deepspeed(m, state) for m in models[1:]]
    models[0].eval()  # as prepare_deepspeed leaves the others (a DeepSpeed engine's eval() returns None)
    params = [p for m in models for p in m.parameters()]
    held, total = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
    state.print(f"DeepSpeed ZeRO-3 over {state.num_processes} processes: the main process holds {held} of the {total} "
                "weights", flush=True)
    return models


def finish(state):
    """The end of a run of N processes: a barrier, then the process group destroyed (as accelerate's end_training).
    Without the barrier a process exiting right after the last gather could abort (SIGABRT after the output is written,
    1 run in ~8 of 2 CPU processes measured): a gloo thread still freeing that gather's tensors needs the GIL while
    Python finalizes (pytorch issue 190489; the core dump's thread: ~AsyncAllgatherWork -> decref_pyobject)."""
    import torch

    if state.num_processes > 1:
        state.wait_for_everyone()
        torch.distributed.destroy_process_group()
        # The race can still abort Python's own finalization (seen once in a CI run after the barrier): the output is
        # published and nothing is left to do, so every process of a multi-process run ends here without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def score_sequences(seqs, scorers, pad_id, state, batch_tokens, dtype, counts):
    """(policy, reference) log-probs of every sequence [(ids, completion_start)], in order: each process scores its
    share of the batches and all of them get every result. Under ZeRO-3 every forward gathers the weights from all
    processes, so each runs as many forwards as the busiest one (dummy ones once its share is done)."""
    import torch
    from accelerate.utils import gather_object

    lengths = [len(ids) for ids, _ in seqs]
    batches = make_batches(lengths, batch_tokens)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    owner = assign_batches(batches, lengths, state.num_processes)
    share = [batch for batch, rank in zip(batches, owner) if rank == state.process_index]
    steps = max(map(owner.count, range(state.num_processes))) if zero3(state) else len(share)
    mine = []
    for step in range(steps):
        batch = share[step] if step < len(share) else []
        group = [seqs[i] for i in batch] or [([pad_id] * 2, 1)]  # the dummy: a 2-token sequence, result dropped
        mine.extend(zip(batch, *(trl_internals.batch_logps(m, group, pad_id, state.device, autocast)
                                 for m in scorers)))
    results = {i: (p, q) for i, p, q in gather_object(mine)}  # one process: gather_object returns `mine`
    counts["forward_tokens"] += sum(lengths)
    counts["padded_tokens"] += sum(len(b) * lengths[b[0]] for b in batches)
    counts["completion_tokens"] += sum(len(ids) - max(start, 1) for ids, start in seqs)
    return [results[i] for i in range(len(seqs))]


def chunk_logps(chunk, tokenizer, scorers, state, args, counts):
    """The log-probs of a chunk of (where, row): each row tokenized as TRL does, all its sequences scored together.
    Returns, per row in input order, (policy log-probs, reference log-probs, kept, completion starts): one entry per
    response (pairs mode: chosen, rejected); a sequence TRL drops (`kept` False) gets 0.0 (nothing left to score)."""
    rows = []  # per row: its sequences (None where TRL drops one) and their completion starts
    for _, row in chunk:
        these, starts, c = tokenize_row(tokenizer, row, args.mode, args.max_length, args.truncation_mode)
        for key in c:
            counts[key] += c[key]
        counts["rows_with_split_mismatch"] += 0 < c["boundary_merges"] < len(these)
        counts["rows"] += 1
        counts["sequences"] += len(these)
        rows.append((these, starts))
    # TRL pads with the pad token, else EOS; padding is masked out, so any id will do when the tokenizer has neither
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [s for these, _ in rows for s in these if s is not None]
    logps = iter(score_sequences(seqs, scorers, pad_id or 0, state, args.batch_tokens, args.dtype, counts))
    out = []
    for (where, _), (these, starts) in zip(chunk, rows):
        both = [(0.0, 0.0) if s is None else next(logps) for s in these]  # (policy, reference) per sequence
        for k, (p, q) in enumerate(both):
            if not (math.isfinite(p) and math.isfinite(q)):
                raise DiceError(f"{where}: non-finite log-prob (policy {p}, reference {q}) for sequence {k}; the "
                                "model produced nan/inf (with --dtype bfloat16 try float32); nothing was written")
        out.append(([p for p, _ in both], [q for _, q in both], [s is not None for s in these], starts))
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
    """(where, row) of every input row; pairs: prompt/chosen/rejected as data.read_pair reads them, the rest kept."""
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
