"""03_build_pairs.py's files around its rule: 02's scores read into a prompts x K table, the offline pairs, the output
rows, stats.json, the printed summary and the policy behind the reference log-probs (for 04's check). A bad input row
is a DiceError naming file:line, raised before anything is written."""
import math
from itertools import chain

import numpy as np

from dice import DiceError, data, protocol

# ----------------------------------------------------------------------------- 02's scores.jsonl

def _number(value, where):
    """A JSON number as a float, NaN for null; anything else is a DiceError."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DiceError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise DiceError(f"{where}: a number is too large") from None


def _numbers(values, where):
    if set(map(type, values)) <= {float}:  # the fast path: 02 writes floats
        return values
    return [_number(v, f"{where}[{j}]") for j, v in enumerate(values)]


def read_scores(path):
    """02's rows in file order, repeated prompts included, checked: K entries in every per-response field (those 03
    ignores too), rewards and policy_logps as floats (NaN for null), key = data.prompt_id of the prompt."""
    records = []
    for line, row in data.read_jsonl(path):
        where = f"{path}:{line}"
        for field in ("prompt", "responses", "rewards", "valid"):
            if field not in row:
                raise DiceError(f"{where}: missing field '{field}' (expected 02_score.py output)")
        data.to_messages(row["prompt"], where)
        responses = row["responses"]
        if not isinstance(responses, list) or not set(map(type, responses)) <= {str}:
            raise DiceError(f"{where}: 'responses' must be a list of strings")
        for field in ("rewards", "valid", "policy_logps", "reference_logps", "finish_reasons", "num_tokens",
                      "completion_starts"):
            if field in row and (not isinstance(row[field], list) or len(row[field]) != len(responses)):
                n = len(row[field]) if isinstance(row[field], list) else "not a list"
                raise DiceError(f"{where}: '{field}' has {n} values but 'responses' has {len(responses)}")
        if not set(map(type, row["valid"])) <= {bool}:
            raise DiceError(f"{where}: 'valid' must be a list of true/false")
        logps, starts = row.get("policy_logps"), row.get("completion_starts")
        if starts is not None and not set(map(type, starts)) <= {int}:
            raise DiceError(f"{where}: 'completion_starts' must be a list of ints")
        key = data.prompt_id(row["prompt"])
        records.append(dict(prompt_id=row.get("prompt_id", key), key=key, prompt=row["prompt"], responses=responses,
                            rewards=_numbers(row["rewards"], f"{where}: rewards"), valid=row["valid"],
                            policy_logps=None if logps is None else _numbers(logps, f"{where}: policy_logps"),
                            completion_starts=starts))
    if not records:
        raise DiceError(f"{path}: no rows")
    return records


def make_table(records):
    """The records as (prompts x K) arrays: rewards, policy_logps (NaN where absent), lengths (characters), valid,
    usable (valid, finite reward and, where the row has them, finite log-prob; padding is not), text_id (equal ids =
    identical texts within a row), and k (responses per row)."""
    ks = np.array([len(r["responses"]) for r in records], dtype=np.int64)
    n, k = len(records), int(ks.max(initial=0))
    cells = np.arange(k) < ks[:, None]  # the cells holding a response, filled row by row

    def padded(values, fill, dtype):
        table = np.full((n, k), fill, dtype=dtype)
        table[cells] = np.array(list(values), dtype=dtype)
        return table

    rewards = padded(chain.from_iterable(r["rewards"] for r in records), math.nan, np.float64)
    logps = padded(chain.from_iterable(r.get("policy_logps") or [math.nan] * len(r["responses"]) for r in records),
                   math.nan, np.float64)
    lengths = padded(map(len, chain.from_iterable(r["responses"] for r in records)), 0, np.int64)
    valid = padded(chain.from_iterable(r["valid"] for r in records), False, bool)
    has_logps = np.array([r.get("policy_logps") is not None for r in records], dtype=bool)
    usable = valid & np.isfinite(rewards) & (np.isfinite(logps) | ~has_logps[:, None])
    # identical texts have equal lengths: only rows with two equal lengths need their texts compared
    text_id = np.tile(np.arange(k), (n, 1))
    ordered = np.sort(lengths, axis=1)
    for i in np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1)):
        first = {}
        text_id[i, :ks[i]] = [first.setdefault(t, j) for j, t in enumerate(records[i]["responses"])]
    return dict(rewards=rewards, policy_logps=logps, lengths=lengths, valid=valid, usable=usable, text_id=text_id,
                k=ks)


def usable_prompts(records, min_valid):
    """(records, table, counts) of the prompts to pair: the first row of each prompt, with at least min_valid usable
    responses; the counts are over every row read."""
    table = make_table(records)
    first, seen = np.zeros(len(records), dtype=bool), set()
    for i, r in enumerate(records):
        first[i] = r["key"] not in seen
        seen.add(r["key"])
    enough = table["usable"].sum(axis=1) >= min_valid
    counts = dict(n_rows=len(records), n_duplicate_prompts=int((~first).sum()), n_responses=int(table["k"].sum()),
                  n_responses_invalid=int(table["k"].sum() - table["valid"].sum()),
                  n_responses_nonfinite=int((table["valid"] & ~table["usable"]).sum()),
                  n_prompts_in=int(first.sum()), n_dropped_min_valid=int((first & ~enough).sum()),
                  n_dropped_tie=0, n_dropped_identical=0, n_pairs_built=0)
    keep = first & enough
    return [r for r, ok in zip(records, keep) if ok], {name: a[keep] for name, a in table.items()}, counts


# ----------------------------------------------------------------------------- the offline pairs and the output rows

def read_offline(path, split):
    """Offline preference pairs as output rows, in any shape data.read_rows and data.read_pair take, with 02_score.py
    --pairs' optional policy_chosen/rejected_logps (-> ref_chosen/rejected_logps) and chosen/rejected_reward."""
    rows = []
    for where, row in data.read_rows(path, split):
        pair = data.read_pair(row, where)
        out = dict(prompt_id=data.prompt_id(pair["prompt"]), prompt=pair["prompt"], chosen=pair["chosen"],
                   rejected=pair["rejected"], chosen_reward=None, rejected_reward=None, source="offline",
                   ref_chosen_logps=None, ref_rejected_logps=None)
        for src, dst in (("policy_chosen_logps", "ref_chosen_logps"), ("policy_rejected_logps", "ref_rejected_logps"),
                         ("chosen_reward", "chosen_reward"), ("rejected_reward", "rejected_reward")):
            if row.get(src) is not None:
                out[dst] = _number(row[src], f"{where}: {src}")
                if not math.isfinite(out[dst]):
                    raise DiceError(f"{where}: '{src}' is not finite ({row[src]!r})")
        rows.append(out)
    if not rows:
        raise DiceError(f"{path}: no offline pairs")
    return rows


def generated_rows(records, table, chosen, rejected, keep, counts):
    """The output rows of the kept pairs. The scoring policy's log-probs become the next round's reference log-probs,
    except where the two responses start at different tokens (02's completion_starts): TRL splits such a pair at the
    earlier start, so 02's per-response log-probs are not the ones stage 4 would compute (left null; counted)."""
    rows = np.flatnonzero(keep)
    c, r = chosen[rows], rejected[rows]
    values = [table[name][rows, idx].tolist() for name in ("rewards", "policy_logps") for idx in (c, r)]
    out, counts["n_pairs_split_mismatch"] = [], 0
    for i, ci, ri, rew_c, rew_r, logp_c, logp_r in zip(rows.tolist(), c.tolist(), r.tolist(), *values):
        rec = records[i]
        starts, with_logps = rec["completion_starts"], rec["policy_logps"] is not None
        if starts is not None and starts[ci] != starts[ri]:
            counts["n_pairs_split_mismatch"] += 1
            with_logps = False
        out.append(dict(prompt_id=rec["prompt_id"], prompt=rec["prompt"], chosen=rec["responses"][ci],
                        rejected=rec["responses"][ri], chosen_reward=rew_c, rejected_reward=rew_r, source="generated",
                        ref_chosen_logps=logp_c if with_logps else None,
                        ref_rejected_logps=logp_r if with_logps else None))
    return out


def reference_policy(path, fingerprint, rows, source):
    """{"path", "fingerprint"} of the policy whose log-probs the `source` rows carry: the `policy` input in the done
    marker 02 wrote for `path`, if that marker records the input as it is now (`fingerprint`); else None. 04 refuses
    to train another model than this one with these log-probs."""
    if not path or not any(r["source"] == source and (r["ref_chosen_logps"] is not None or
                                                      r["ref_rejected_logps"] is not None) for r in rows):
        return None
    try:
        policy = protocol.finished_marker(path, fingerprint)["inputs"]["policy"]
        return {"path": policy["path"], "fingerprint": policy["fingerprint"]}
    except (TypeError, KeyError):  # no marker that matches the input, or one without these fields
        return None


def nothing_left(counts, min_valid, k):
    """The error when no pair is left, with the counts that say why."""
    return DiceError(f"no pairs left: {counts['n_prompts_in']} prompts, {counts['n_dropped_min_valid']} with fewer "
                     f"than --min_valid {min_valid} usable responses (K = {k}), {counts['n_dropped_tie']} ties, "
                     f"{counts['n_dropped_identical']} identical texts; nothing written")


# ----------------------------------------------------------------------------- stats.json and the summary

def pair_columns(table, chosen, rejected, keep):
    """{chosen_len, rejected_len, chosen_reward, rejected_reward}: arrays over the kept pairs."""
    rows = np.flatnonzero(keep)
    c, r = chosen[rows], rejected[rows]
    return dict(chosen_len=table["lengths"][rows, c], rejected_len=table["lengths"][rows, r],
                chosen_reward=table["rewards"][rows, c], rejected_reward=table["rewards"][rows, r])


def summary(values):
    v = np.asarray(values, dtype=float)
    q = np.percentile(v, [0, 25, 50, 75, 100])
    return dict(mean=float(v.mean()), std=float(v.std()), min=float(q[0]), p25=float(q[1]), median=float(q[2]),
                p75=float(q[3]), max=float(q[4]))


def make_stats(args, alpha, sweep, columns, counts, seconds):
    """stats.json: alpha, the sweep, the length gap before (alpha 0) and after shaping (the sweep starts at alpha 0 and
    holds the chosen alpha), summaries of the kept pairs' `columns` (pair_columns), counts, args."""
    gaps, auto = dict(sweep), args["alpha_mode"] == "auto"
    return dict(alpha=alpha, alpha_mode=args["alpha_mode"], alpha_steps=len(sweep) if auto else 0,
                sweep=[[a, d] for a, d in sweep], mean_len_diff_before=gaps[0.0], mean_len_diff_after=gaps[alpha],
                **{name: summary(v) for name, v in columns.items()}, gamma=args["gamma"], seed=args["seed"],
                counts=counts, args=args, seconds=round(seconds, 3))


def print_summary(args, stats, out):
    c, fmt = stats["counts"], lambda d: "n/a" if d is None else f"{d:+.1f}"
    scanned = f", {len(stats['sweep'])} steps scanned" if args["alpha_mode"] == "auto" else ""
    print(f"alpha {stats['alpha']:g} ({args['alpha_mode']}{scanned}): mean len(chosen) - len(rejected) "
          f"{fmt(stats['mean_len_diff_before'])} -> {fmt(stats['mean_len_diff_after'])} chars")
    print(f"chosen: {stats['chosen_len']['mean']:.0f} chars, reward {stats['chosen_reward']['mean']:+.3f} | rejected: "
          f"{stats['rejected_len']['mean']:.0f} chars, reward {stats['rejected_reward']['mean']:+.3f} (means)")
    print(f"prompts {c['n_prompts_in']} (+{c['n_duplicate_prompts']} duplicate rows dropped): {c['n_pairs_built']} "
          f"pairs, dropped {c['n_dropped_min_valid']} with < {args['min_valid']} usable responses, "
          f"{c['n_dropped_tie']} ties, {c['n_dropped_identical']} identical texts; responses {c['n_responses']}: "
          f"{c['n_responses_invalid']} invalid, {c['n_responses_nonfinite']} valid but non-finite")
    print(f"wrote {out}: {c['n_pairs']} pairs = {c['n_pairs_generated']} generated + {c['n_pairs_offline']} offline "
          f"(gamma {args['gamma']:g}, seed {args['seed']}); stats.json{', plots' if args['plots'] else ''} in "
          f"{args['out_dir']}")
