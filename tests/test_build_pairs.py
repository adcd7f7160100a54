"""03_build_pairs.py: every rule on hand-built cases with known answers, agreement of the vectorised code with a
straightforward per-prompt reference written here, experience replay, seeds, bad input and the CLI."""
import json
import math
import os
import random

import pytest

from conftest import load_script, run_script
from dice import DiceError, data, pairs_io, protocol

bp = load_script("03_build_pairs")


# ----------------------------------------------------------------------------- helpers

def srow(prompt, responses, rewards, valid=None, logps=None, **extra):
    """One scores.jsonl row as 02_score.py writes it."""
    k = len(responses)
    logps = [-float(len(t)) for t in responses] if logps is None else logps
    return dict(prompt_id=data.prompt_id(prompt), prompt=prompt, responses=responses, finish_reasons=["stop"] * k,
                num_tokens=[len(t) for t in responses], generator="test", policy_logps=logps,
                reference_logps=[0.0] * k, rewards=rewards, valid=[True] * k if valid is None else valid, **extra)


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def build(tmp_path, rows, **kw):
    """Run main in-process on `rows`; returns (pairs rows, stats)."""
    scores = write(tmp_path / "scores.jsonl", rows)
    out = tmp_path / "out"
    kw.setdefault("plots", False)
    bp.main(scores=scores, out_dir=str(out), overwrite=True, **kw)
    pairs = [json.loads(line) for line in open(out / "pairs.jsonl")]
    return pairs, json.load(open(out / "stats.json"))


def by_prompt(pairs):
    return {p["prompt"]: p for p in pairs}


# ----------------------------------------------------------------------------- the reference implementation

def reference_pairs(rows, alpha, min_valid):
    """Per prompt, in plain Python: {prompt: (chosen index, rejected index)} and the drop counts."""
    pairs, drops, seen = {}, dict(min_valid=0, tie=0, identical=0), set()
    for row in rows:
        if row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        resp, rew = row["responses"], [math.nan if r is None else r for r in row["rewards"]]
        logps = row.get("policy_logps")
        usable = [j for j in range(len(resp)) if row["valid"][j] and math.isfinite(rew[j])
                  and (logps is None or (logps[j] is not None and math.isfinite(logps[j])))]
        if len(usable) < min_valid:
            drops["min_valid"] += 1
            continue
        shaped = {j: rew[j] - alpha * len(resp[j]) for j in usable}
        c = r = usable[0]
        for j in usable:  # strict comparisons: the first index wins among equal values
            if shaped[j] > shaped[c]:
                c = j
            if shaped[j] < shaped[r]:
                r = j
        if shaped[c] == shaped[r]:
            drops["tie"] += 1
        elif resp[c] == resp[r]:
            drops["identical"] += 1
        else:
            pairs[row["prompt"]] = (c, r)
    return pairs, drops


def reference_mean_diff(rows, pairs):
    if not pairs:
        return None
    text = {}
    for row in rows:  # the first row of a repeated prompt is the one kept
        text.setdefault(row["prompt"], row["responses"])
    return sum(len(text[p][c]) - len(text[p][r]) for p, (c, r) in pairs.items()) / len(pairs)


def reference_alpha(rows, min_valid):
    """The issue's words: scan 0, 0.001, ... (< 1.0); stop at the first alpha whose |mean difference| is larger than
    the smallest seen so far; use the alpha with the smallest |mean difference|."""
    sweep = []
    for i in range(1000):
        alpha = i / 1000
        d = reference_mean_diff(rows, reference_pairs(rows, alpha, min_valid)[0])
        a = math.inf if d is None else abs(d)
        smallest_before = min((x for _, _, x in sweep), default=math.inf)
        sweep.append((alpha, d, a))
        if a > smallest_before:
            break
    best = min(range(len(sweep)), key=lambda i: (sweep[i][2], i))
    return sweep[best][0], [(a, d) for a, d, _ in sweep]


def random_rows(seed, n=60):
    """Ragged K, invalid and non-finite rewards, tied rewards, identical texts, length-correlated rewards."""
    rng = random.Random(seed)
    slope = rng.uniform(0.002, 0.03)
    rows = []
    for p in range(n):
        k = rng.randint(3, 9)
        pool = [rng.choice("abc") * rng.randint(0, 300) + str(rng.randint(0, 3)) for _ in range(4)]
        resp = [rng.choice(pool) if rng.random() < 0.3
                else "".join(rng.choice("xyz ") for _ in range(rng.randint(0, 400))) for _ in range(k)]
        if rng.random() < 0.1:  # a degenerate prompt: one text sampled K times, scored the same each time
            resp = [resp[0]] * k
        pool_reward = {t: round(slope * len(t) + rng.gauss(0, 1), 1) for t in pool + resp}
        # rounding makes equal rewards happen; repeated texts often (not always) get the same reward
        rew = [pool_reward[t] if rng.random() < 0.5 else round(slope * len(t) + rng.gauss(0, 1), 1) for t in resp]
        for j in range(k):
            if rng.random() < 0.05:
                rew[j] = rng.choice([None, math.nan, math.inf])
        valid = [rng.random() < 0.85 for _ in range(k)]
        rows.append(srow(f"prompt {p % (n - 3)}", resp, rew, valid=valid))  # the last 3 prompts repeat earlier ones
    return rows


# ----------------------------------------------------------------------------- the rule

def test_argmax_is_chosen_argmin_is_rejected(tmp_path):
    rows = [srow("p", ["aa", "bb", "cc", "dd"], [0.1, 0.5, -0.3, 0.2])]
    pairs, stats = build(tmp_path, rows, min_valid=2, length_control=False)
    assert len(pairs) == 1
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("bb", "cc")
    assert (pairs[0]["chosen_reward"], pairs[0]["rejected_reward"]) == (0.5, -0.3)
    # the scoring policy's log-probs of those two responses become the next round's reference log-probs
    assert (pairs[0]["ref_chosen_logps"], pairs[0]["ref_rejected_logps"]) == (-2.0, -2.0)
    assert pairs[0]["source"] == "generated" and pairs[0]["prompt_id"] == data.prompt_id("p")
    assert stats["alpha"] == 0.0 and stats["alpha_mode"] == "off"


def test_ref_logps_follow_the_chosen_and_rejected_indices(tmp_path):
    rows = [srow("p", ["a", "b", "c"], [0.0, 2.0, -2.0], logps=[-10.0, -11.0, -12.0])]
    (pair,), _ = build(tmp_path, rows, min_valid=2, alpha=0)
    assert (pair["ref_chosen_logps"], pair["ref_rejected_logps"]) == (-11.0, -12.0)


def test_invalid_responses_are_ignored(tmp_path):
    # the best and the worst rewards belong to invalid responses: they are never picked
    rows = [srow("p", ["a", "b", "c", "d", "e"], [9.0, 1.0, 0.0, -1.0, -9.0], valid=[False, True, True, True, False])]
    (pair,), stats = build(tmp_path, rows, min_valid=2, alpha=0)
    assert (pair["chosen"], pair["rejected"]) == ("b", "d")
    assert stats["counts"]["n_responses_invalid"] == 2


def test_nonfinite_rewards_are_counted_never_ranked(tmp_path):
    nan_row = '{"prompt": "p", "responses": ["a", "b", "c", "d"], "rewards": [NaN, 1.0, Infinity, null], ' \
              '"valid": [true, true, true, true]}'
    rows = [nan_row, srow("q", ["a", "b", "c"], [0.0, float("-inf"), 1.0])]
    pairs, stats = build(tmp_path, rows, min_valid=2, alpha=0)
    # p keeps one usable response (< 2): dropped; q ranks only its two finite rewards
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("q", "c", "a")]
    assert stats["counts"]["n_responses_nonfinite"] == 4
    assert stats["counts"]["n_dropped_min_valid"] == 1
    assert pairs[0]["ref_chosen_logps"] == -1.0  # no policy_logps in p's row is fine; q has them


def test_pairs_whose_responses_split_differently_leave_reference_logps_to_stage_4(tmp_path):
    # 02's completion_starts: "b" starts one token earlier (its first token merged with the prompt's last one). TRL
    # splits a pair at the earlier start, so 02's per-response log-probs of such a pair are not TRL's: null, counted.
    rows = [srow("p", ["a", "b", "c"], [0.0, 2.0, -2.0], logps=[-10.0, -11.0, -12.0], completion_starts=[7, 6, 7]),
            srow("q", ["a", "b", "c"], [0.0, 2.0, -2.0], logps=[-10.0, -11.0, -12.0], completion_starts=[7, 6, 6])]
    pairs, stats = build(tmp_path, rows, min_valid=2, alpha=0)
    got = {p["prompt"]: (p["chosen"], p["rejected"], p["ref_chosen_logps"], p["ref_rejected_logps"]) for p in pairs}
    assert got == {"p": ("b", "c", None, None), "q": ("b", "c", -11.0, -12.0)}
    assert stats["counts"]["n_pairs_split_mismatch"] == 1 and stats["counts"]["n_pairs_with_ref_logps"] == 1


def test_missing_policy_logps_give_null_reference_logps(tmp_path):
    row = srow("p", ["a", "b"], [1.0, 0.0])
    del row["policy_logps"]
    (pair,), _ = build(tmp_path, [row], min_valid=2, alpha=0)
    assert pair["ref_chosen_logps"] is None and pair["ref_rejected_logps"] is None


def test_min_valid_drops_prompts_with_too_few_usable_responses(tmp_path):
    rows = [srow("two", ["a", "b", "c"], [1.0, 0.0, 2.0], valid=[True, True, False]),
            srow("three", ["a", "b", "c"], [1.0, 0.0, 2.0])]
    pairs, stats = build(tmp_path, rows, min_valid=3, alpha=0)
    assert [p["prompt"] for p in pairs] == ["three"]
    assert stats["counts"]["n_prompts_in"] == 2 and stats["counts"]["n_dropped_min_valid"] == 1
    pairs, stats = build(tmp_path, rows, min_valid=2, alpha=0)
    assert sorted(p["prompt"] for p in pairs) == ["three", "two"]


def test_equal_maxima_and_minima_pick_the_first_index():
    table = pairs_io.make_table([dict(responses=["a", "b", "c", "d"], rewards=[1.0, 0.0, 1.0, 0.0], valid=[True] * 4)])
    chosen, rejected, tie, identical = bp.select(table, 0.0)
    assert (chosen[0], rejected[0], tie[0], identical[0]) == (0, 1, False, False)


def test_text_ids_mark_identical_texts_only():
    # equal lengths are compared text by text; a ragged row's padding never counts as a text
    table = pairs_io.make_table([dict(responses=["ab", "cd", "ab", "xyz"], rewards=[0.0] * 4, valid=[True] * 4),
                           dict(responses=["a", "bb"], rewards=[0.0] * 2, valid=[True] * 2),
                           dict(responses=["", "", "c"], rewards=[0.0] * 3, valid=[True] * 3)])
    assert table["text_id"][0].tolist() == [0, 1, 0, 3]
    assert table["text_id"][1, :2].tolist() == [0, 1] and table["text_id"][2, :3].tolist() == [0, 0, 2]
    assert table["usable"].tolist() == [[True] * 4, [True, True, False, False], [True, True, True, False]]


def test_ties_and_identical_texts_are_dropped_and_counted(tmp_path):
    rows = [srow("tie", ["a", "b", "c"], [0.5, 0.5, 0.5]),  # every shaped reward equal
            srow("same", ["x", "y", "x"], [2.0, 1.0, 0.0]),  # best and worst are the same text
            srow("ok", ["a", "bb", "a"], [0.0, 1.0, 0.0])]  # equal worst rewards, identical texts, best differs
    pairs, stats = build(tmp_path, rows, min_valid=2, alpha=0)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("ok", "bb", "a")]
    assert stats["counts"]["n_dropped_tie"] == 1 and stats["counts"]["n_dropped_identical"] == 1


def test_shaping_can_create_a_tie_at_one_alpha(tmp_path):
    # 0.5 - 0.1 * 5 == 0.0 - 0.1 * 0 exactly (0.1 * 5 rounds to 0.5): a tie at alpha 0.1, a pair at other alphas
    rows = [srow("t", ["abcde", ""], [0.5, 0.0]), srow("u", ["ab", "abc"], [1.0, 0.0])]
    table = pairs_io.make_table(pairs_io.read_scores(write(tmp_path / "s.jsonl", rows)))
    assert list(bp.select(table, 0.1)[2]) == [True, False]
    assert list(bp.select(table, 0.05)[2]) == [False, False]
    pairs, stats = build(tmp_path, rows, min_valid=2, alpha=0.1)
    assert [p["prompt"] for p in pairs] == ["u"] and stats["counts"]["n_dropped_tie"] == 1


def test_length_penalty_switches_the_pair(tmp_path):
    rows = [srow("p", ["s" * 10, "l" * 110], [0.0, 0.5])]  # long wins by 0.5: shaped gap 0.5 - 100 * alpha
    (pair,), _ = build(tmp_path, rows, min_valid=2, alpha=0.004)
    assert (pair["chosen"], pair["rejected"]) == ("l" * 110, "s" * 10)
    (pair,), stats = build(tmp_path, rows, min_valid=2, alpha=0.006)
    assert (pair["chosen"], pair["rejected"]) == ("s" * 10, "l" * 110)
    assert pair["chosen_reward"] == 0.0  # the stored rewards are the unshaped implicit rewards
    assert stats["alpha_mode"] == "fixed"
    assert stats["mean_len_diff_before"] == 100 and stats["mean_len_diff_after"] == -100


def scan_case():
    """Three prompts, a short (10 chars) and a long (110 chars) response each; the long one leads by 0.15, 0.35 and
    1.55, so it loses its place once 100 * alpha exceeds that: after 0.0015, 0.0035 and 0.0155.
    mean len diff: +100 (alpha 0, 0.001), +33.3 (0.002, 0.003), -33.3 (0.004 .. 0.015), -100 (0.016)."""
    return [srow(f"p{i}", ["s" * 10, "l" * 110], [0.0, lead]) for i, lead in enumerate([0.15, 0.35, 1.55])]


def test_alpha_scan_stopping_rule():
    table = pairs_io.make_table([dict(responses=r["responses"], rewards=r["rewards"], valid=r["valid"])
                                 for r in scan_case()])
    alpha, sweep = bp.sweep_alpha(table)
    # |mean| 100, 100, 33.3, 33.3, 33.3 (equal: no stop) ... 33.3 at 0.015, 100 at 0.016 (larger: stop there);
    # the smallest |mean| is first reached at 0.002
    assert alpha == 0.002
    assert [a for a, _ in sweep] == [i / 1000 for i in range(17)]
    assert [round(d, 6) for _, d in sweep] == [100, 100, 33.333333, 33.333333] + [-33.333333] * 12 + [-100]
    assert (alpha, sweep) == reference_alpha(scan_case(), 2)


def test_alpha_scan_without_a_stop_runs_to_0_999_and_keeps_the_first_minimum():
    # one prompt whose pair flips at alpha 0.0015: |mean| is 10 everywhere, never larger than the smallest seen
    rows = [srow("p", ["s" * 10, "l" * 20], [0.0, 0.015])]
    table = pairs_io.make_table([dict(responses=r["responses"], rewards=r["rewards"], valid=r["valid"]) for r in rows])
    alpha, sweep = bp.sweep_alpha(table)
    assert alpha == 0.0 and len(sweep) == 1000 and sweep[-1][0] == 0.999
    assert [d for _, d in sweep[:3]] == [10, 10, -10]


def test_alpha_scan_through_main(tmp_path):
    pairs, stats = build(tmp_path, scan_case(), min_valid=2)
    assert stats["alpha"] == 0.002 and stats["alpha_mode"] == "auto" and stats["alpha_steps"] == 17
    assert stats["mean_len_diff_before"] == 100 and stats["mean_len_diff_after"] == pytest.approx(100 / 3)
    assert {p["prompt"]: len(p["chosen"]) for p in pairs} == {"p0": 10, "p1": 110, "p2": 110}


@pytest.mark.parametrize("seed", range(12))
def test_vectorised_rule_matches_the_per_prompt_reference(tmp_path, seed):
    rows = random_rows(seed)
    want_alpha, want_sweep = reference_alpha(rows, 3)
    _, table, _ = pairs_io.usable_prompts(pairs_io.read_scores(write(tmp_path / "s.jsonl", rows)), 3)
    alpha, sweep = bp.sweep_alpha(table)
    assert (alpha, sweep) == (want_alpha, want_sweep)  # exact: the same float operations in the same order
    pairs, stats = build(tmp_path, rows, min_valid=3)
    want, drops = reference_pairs(rows, want_alpha, 3)
    text = {r["prompt"]: r["responses"] for r in reversed(rows)}  # first row of a repeated prompt wins
    rew = {r["prompt"]: r["rewards"] for r in reversed(rows)}
    assert {p["prompt"]: (p["chosen"], p["rejected"]) for p in pairs} == \
        {p: (text[p][c], text[p][r]) for p, (c, r) in want.items()}
    assert {p["prompt"]: (p["chosen_reward"], p["rejected_reward"]) for p in pairs} == \
        {p: (rew[p][c], rew[p][r]) for p, (c, r) in want.items()}
    c = stats["counts"]
    assert (c["n_dropped_min_valid"], c["n_dropped_tie"], c["n_dropped_identical"]) == \
        (drops["min_valid"], drops["tie"], drops["identical"])
    assert c["n_duplicate_prompts"] == 3 and stats["alpha"] == want_alpha


def test_random_cases_exercise_every_branch(tmp_path):
    """Guard for the test above: its random cases really contain ties, identical texts, drops and multi-step scans."""
    totals = dict(min_valid=0, tie=0, identical=0)
    steps = []
    for seed in range(12):
        rows = random_rows(seed)
        alpha, sweep = reference_alpha(rows, 3)
        for k, v in reference_pairs(rows, alpha, 3)[1].items():
            totals[k] += v
        steps.append(len(sweep))
    assert all(v > 0 for v in totals.values()), totals
    assert max(steps) >= 5 and min(steps) >= 2


# ----------------------------------------------------------------------------- experience replay

@pytest.mark.parametrize("n_off, n_gen, gamma, want", [
    (10, 8, 0.5, (5, 5)), (10, 8, 0.25, (7, 2)), (10, 8, 0.75, (2, 6)), (100, 8, 0.5, (8, 8)), (10, 8, 0.0, (8, 0)),
    (10000, 9000, 0.5, (5000, 5000)),
])
def test_replay_counts_follow_the_paper_formula(n_off, n_gen, gamma, want):
    assert bp.replay_counts(n_off, n_gen, gamma) == want


def test_replay_takes_offline_pairs_only_from_other_prompts(tmp_path):
    gen = [srow(f"q{i}", ["a", "bb"], [1.0, 0.0]) for i in range(8)]
    # 10 offline pairs: 8 share a prompt with a generated pair, 2 do not; 5 + 5 are taken, so exactly the 5 offline
    # pairs whose prompts are not among the 5 sampled generated ones qualify
    off = [dict(prompt=f"q{i}", chosen=f"good {i}", rejected=f"bad {i}", policy_chosen_logps=-1.5 - i,
                policy_rejected_logps=-2.5, chosen_reward=0.3, rejected_reward=0.1) for i in range(10)]
    pairs, stats = build(tmp_path, gen, min_valid=2, alpha=0, offline=write(tmp_path / "off.jsonl", off), gamma=0.5)
    g = [p for p in pairs if p["source"] == "generated"]
    o = [p for p in pairs if p["source"] == "offline"]
    assert (len(g), len(o)) == (5, 5)
    assert (stats["counts"]["n_pairs_generated"], stats["counts"]["n_pairs_offline"]) == (5, 5)
    assert {p["prompt"] for p in g}.isdisjoint({p["prompt"] for p in o})
    assert {p["prompt"] for p in g} | {p["prompt"] for p in o} == {f"q{i}" for i in range(10)}
    for p in o:  # 02 --pairs' policy log-probs become the reference log-probs; its rewards are kept
        i = int(p["prompt"][1:])
        assert (p["chosen"], p["rejected"]) == (f"good {i}", f"bad {i}")
        assert (p["ref_chosen_logps"], p["ref_rejected_logps"], p["chosen_reward"], p["rejected_reward"]) == \
            (-1.5 - i, -2.5, 0.3, 0.1)
        assert p["prompt_id"] == data.prompt_id(p["prompt"])


def test_replay_offline_without_02_fields_gets_nulls(tmp_path):
    gen = [srow(f"q{i}", ["a", "bb"], [1.0, 0.0]) for i in range(4)]
    off = [dict(prompt=f"o{i}", chosen="c", rejected="r") for i in range(4)]
    pairs, _ = build(tmp_path, gen, min_valid=2, alpha=0, offline=write(tmp_path / "off.jsonl", off))  # gamma 0.5
    o = [p for p in pairs if p["source"] == "offline"]
    assert len(o) == 2 and all(p[k] is None for p in o for k in
                                ("ref_chosen_logps", "ref_rejected_logps", "chosen_reward", "rejected_reward"))


def test_message_list_prompts_are_compared_by_prompt_id(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    gen = [srow(chat, ["a", "bb"], [1.0, 0.0]), srow("other", ["a", "bb"], [1.0, 0.0])]
    off = [dict(prompt=chat, chosen="c", rejected="r"), dict(prompt="x", chosen="c", rejected="r"),
           dict(prompt="other", chosen="c", rejected="r"), dict(prompt="y", chosen="c", rejected="r")]
    for seed in range(4):  # n_gen = 2 (both prompts), n_off = 2: only "x" and "y" qualify
        pairs, _ = build(tmp_path, gen, min_valid=2, alpha=0, offline=write(tmp_path / "off.jsonl", off), seed=seed)
        want = [chat, "other", "x", "y"]
        assert sorted(json.dumps(p["prompt"]) for p in pairs) == sorted(json.dumps(p) for p in want)
        assert {p["prompt_id"] for p in pairs if p["prompt"] == chat} == {data.prompt_id(chat)}


def test_gamma_zero_means_generated_only(tmp_path):
    gen = [srow(f"q{i}", ["a", "bb"], [1.0, 0.0]) for i in range(6)]
    off = write(tmp_path / "off.jsonl", [dict(prompt="o", chosen="c", rejected="r")])
    pairs, stats = build(tmp_path, gen, min_valid=2, alpha=0, offline=off, gamma=0)
    assert len(pairs) == 6 and all(p["source"] == "generated" for p in pairs)
    assert stats["counts"]["n_pairs_offline"] == 0 and stats["gamma"] == 0


@pytest.mark.parametrize("gamma, offline, message", [
    (1.0, True, "--gamma must be < 1"), (1.5, True, "--gamma must be < 1"), (-0.1, True, "--gamma must be >= 0"),
    (0.5, False, "--gamma 0.5 needs --offline"),
])
def test_gamma_errors(tmp_path, gamma, offline, message):
    scores = write(tmp_path / "s.jsonl", [srow("q", ["a", "bb"], [1.0, 0.0])])
    off = write(tmp_path / "off.jsonl", [dict(prompt="o", chosen="c", rejected="r")]) if offline else None
    with pytest.raises(DiceError, match=message):
        bp.main(scores=scores, out_dir=str(tmp_path / "out"), offline=off, gamma=gamma, min_valid=2)
    assert not os.path.exists(tmp_path / "out")  # checked before anything is made


def test_too_few_offline_pairs_is_an_error(tmp_path):
    gen = [srow(f"q{i}", ["a", "bb"], [1.0, 0.0]) for i in range(8)]
    off = write(tmp_path / "off.jsonl", [dict(prompt=f"q{i}", chosen="c", rejected="r") for i in range(8)])
    # n_gen = 4, n_off = 4, and only the 4 offline prompts outside the sampled generated ones qualify: just enough
    pairs, _ = build(tmp_path, gen, min_valid=2, alpha=0, offline=off, gamma=0.5)
    assert len(pairs) == 8
    # one generated prompt q0 and 8 offline pairs all on q0: n_gen = 1, n_off = 1, none qualifies
    off_same = write(tmp_path / "off2.jsonl", [dict(prompt="q0", chosen="c", rejected="r")] * 8)
    with pytest.raises(DiceError, match="too few offline pairs"):
        bp.main(scores=write(tmp_path / "s.jsonl", [srow("q0", ["a", "bb"], [1.0, 0.0])]), out_dir=str(tmp_path / "o2"),
                offline=off_same, gamma=0.5, min_valid=2, alpha=0)
    assert not os.path.exists(tmp_path / "o2")  # the folder protocol.stage made for its lock is gone too


def test_replay_keeping_no_generated_pair_is_an_error(tmp_path):
    off = write(tmp_path / "off.jsonl", [dict(prompt="o", chosen="c", rejected="r")])
    with pytest.raises(DiceError, match="keeps no generated pair"):
        bp.main(scores=write(tmp_path / "s.jsonl", [srow("q", ["a", "bb"], [1.0, 0.0])]), out_dir=str(tmp_path / "o"),
                offline=off, gamma=0.5, min_valid=2)


def test_same_seed_same_output_other_seed_other_selection(tmp_path):
    gen = [srow(f"q{i}", ["a", "bb"], [1.0, 0.0]) for i in range(60)]
    off = write(tmp_path / "off.jsonl", [dict(prompt=f"o{i}", chosen="c", rejected="r") for i in range(60)])
    scores = write(tmp_path / "s.jsonl", gen)
    outs = {}
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        bp.main(scores=scores, out_dir=str(tmp_path / name), offline=off, gamma=0.5, seed=seed, min_valid=2,
                plots=False)
        outs[name] = open(tmp_path / name / "pairs.jsonl").read()
    assert outs["a"] == outs["b"]
    pick = {k: {json.loads(line)["prompt"] for line in v.splitlines()} for k, v in outs.items()}
    assert len(pick["a"]) == 60 and pick["a"] != pick["c"]  # 30 of 60 generated + 30 of 60 offline: other subsets
    assert json.load(open(tmp_path / "c" / "stats.json"))["seed"] == 4


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "p"', ], "s.jsonl:1: bad JSON"),
    ([json.dumps(srow("p", ["a", "b"], [1.0, 0.0])), "[1, 2]"], "s.jsonl:2: expected a JSON object"),
    ([json.dumps(srow("p", ["a", "b"], [1.0]))], "s.jsonl:1: 'rewards' has 1 values but 'responses' has 2"),
    ([json.dumps(srow("p", ["a", "b"], [1.0, 0.0], valid=[True]))], "s.jsonl:1: 'valid' has 1 values"),
    ([json.dumps(srow("p", ["a", "b"], [1.0, 0.0], logps=[1.0, 2.0, 3.0]))], "'policy_logps' has 3 values"),
    ([json.dumps({**srow("p", ["a", "b"], [1.0, 0.0]), "finish_reasons": ["stop"]})], "'finish_reasons' has 1"),
    ([json.dumps(srow("p", ["a", "b"], [1.0, "high"]))], r"s.jsonl:1: rewards\[1\]: expected a number"),
    ([json.dumps(srow("p", ["a", "b"], [1.0, 0.0], valid=[1, 0]))], "'valid' must be a list of true/false"),
    ([json.dumps(srow("p", ["a", "b"], [1.0, 0.0], completion_starts=[3]))], "'completion_starts' has 1 values"),
    ([json.dumps(srow("p", ["a", "b"], [1.0, 0.0], completion_starts=[3, 2.5]))], "'completion_starts' must be a list"),
    ([json.dumps({k: v for k, v in srow("p", ["a"], [1.0]).items() if k != "rewards"})], "missing field 'rewards'"),
    ([json.dumps(srow("", ["a", "b"], [1.0, 0.0]))], "s.jsonl:1: empty prompt"),
    ([""], "s.jsonl: no rows"),
])
def test_bad_scores_rows_are_one_line_errors(tmp_path, lines, message):
    scores = write(tmp_path / "s.jsonl", lines)
    with pytest.raises(DiceError, match=message):
        bp.main(scores=scores, out_dir=str(tmp_path / "out"), min_valid=2)
    assert not os.path.exists(tmp_path / "out")  # the folder protocol.stage made for its lock is gone too


def test_bad_offline_rows_are_errors(tmp_path):
    scores = write(tmp_path / "s.jsonl", [srow(f"q{i}", ["a", "bb"], [1.0, 0.0]) for i in range(4)])
    for rows, message in [([dict(prompt="o", chosen="c")], "off.jsonl:1: missing field 'rejected'"),
                          ([dict(prompt="o", chosen="c", rejected=3)], "'rejected' must be a string"),
                          ([dict(prompt="o", chosen="c", rejected="r", policy_chosen_logps=math.nan)], "not finite")]:
        with pytest.raises(DiceError, match=message):
            bp.main(scores=scores, out_dir=str(tmp_path / "out"), offline=write(tmp_path / "off.jsonl", rows),
                    min_valid=2)
        assert not os.path.exists(tmp_path / "out")


def test_empty_result_is_an_error_and_writes_nothing(tmp_path):
    rows = [srow("p", ["a", "b", "c", "d"], [1.0, 0.0, 0.5, 0.2])]
    with pytest.raises(DiceError, match="no pairs left: 1 prompts, 1 with fewer than --min_valid 8 .*K = 4"):
        bp.main(scores=write(tmp_path / "s.jsonl", rows), out_dir=str(tmp_path / "out"))
    with pytest.raises(DiceError, match="1 ties"):
        bp.main(scores=write(tmp_path / "s.jsonl", [srow("p", ["a", "b"], [1.0, 1.0])]), out_dir=str(tmp_path / "out"),
                min_valid=2)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kw, message", [
    (dict(alpha="often"), "--alpha must be float | auto, got 'often'"),
    (dict(alpha=-0.1), "--alpha must be >= 0, got -0.1"),
    (dict(alpha=0.01, length_control=False), "contradicts --length_control false"),
    (dict(min_valid=1), "--min_valid must be >= 2"),
    (dict(length_control="maybe"), "--length_control must be a bool, got 'maybe'"),
])
def test_bad_arguments(tmp_path, kw, message):
    scores = write(tmp_path / "s.jsonl", [srow("p", ["a", "b"], [1.0, 0.0])])
    with pytest.raises(DiceError, match=message):
        bp.main(scores=scores, out_dir=str(tmp_path / "out"), **kw)


# ----------------------------------------------------------------------------- the CLI, as a user runs it

def test_cli_end_to_end_outputs_refusal_and_overwrite(tmp_path):
    rows = random_rows(0, n=40)
    scores = write(tmp_path / "scores.jsonl", rows)
    off = write(tmp_path / "off.jsonl", [dict(prompt=f"prompt {i}", chosen="c", rejected="r", policy_chosen_logps=-1.0,
                                               policy_rejected_logps=-2.0) for i in range(100)])
    out = tmp_path / "pairs"
    cmd = ["python", "03_build_pairs.py", "--scores", scores, "--out_dir", out, "--offline", off, "--gamma", "0.5",
           "--min_valid", "3", "--seed", "7"]
    proc = run_script(cmd)
    assert sorted(os.listdir(out)) == ["alpha_sweep.png", "length_hist.png", "pairs.jsonl", "pairs.jsonl.done.json",
                                       "reward_hist.png", "stats.json"]
    for png in ("alpha_sweep.png", "length_hist.png", "reward_hist.png"):
        assert open(out / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    stats = json.load(open(out / "stats.json"))
    want_alpha, want_sweep = reference_alpha(rows, 3)
    assert stats["alpha"] == want_alpha and [tuple(s) for s in stats["sweep"]] == want_sweep
    for key in ("mean_len_diff_before", "mean_len_diff_after", "chosen_len", "rejected_len", "chosen_reward",
                "rejected_reward", "seed", "args", "gamma", "alpha_steps"):
        assert key in stats
    c = stats["counts"]
    for key in ("n_prompts_in", "n_dropped_min_valid", "n_dropped_tie", "n_dropped_identical", "n_pairs_generated",
                "n_pairs_offline"):
        assert isinstance(c[key], int)
    pairs = [json.loads(line) for line in open(out / "pairs.jsonl")]
    assert len(pairs) == c["n_pairs"] == c["n_pairs_generated"] + c["n_pairs_offline"]
    assert c["n_pairs_generated"] == min(int(100 * 0.5), c["n_pairs_built"]) and c["n_pairs_offline"] > 0
    assert all(set(p) == {"prompt_id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "source",
                          "ref_chosen_logps", "ref_rejected_logps"} for p in pairs)
    assert json.load(open(out / "pairs.jsonl.done.json"))["args"]["seed"] == 7
    assert f"wrote {out}/pairs.jsonl: {c['n_pairs']} pairs" in proc.stdout
    assert proc.stdout.startswith("03_build_pairs: scores=")



def test_cli_rerun_is_done_already_changes_are_refused_overwrite_redoes(tmp_path):
    scores = write(tmp_path / "scores.jsonl", random_rows(1, n=30))
    off = write(tmp_path / "off.jsonl", [dict(prompt=f"o{i}", chosen="c", rejected="r") for i in range(40)])
    out = tmp_path / "pairs"
    cmd = ["python", "03_build_pairs.py", "--scores", scores, "--out_dir", out, "--offline", off, "--min_valid", "3",
           "--seed", "7", "--plots", "false"]
    run_script(cmd)
    files = {name: open(out / name, "rb").read() for name in os.listdir(out)}
    assert sorted(files) == ["pairs.jsonl", "pairs.jsonl.done.json", "stats.json"]
    marker = json.loads(files["pairs.jsonl.done.json"])
    assert marker["stage"] == "03_build_pairs" and marker["seed"] == 7 and marker["args"]["seed"] == 7
    assert marker["counts"] == json.loads(files["stats.json"])["counts"] and marker["alpha"] > 0
    assert set(marker["inputs"]) == {"scores", "offline"}

    def unchanged():
        return {name: open(out / name, "rb").read() for name in os.listdir(out)} == files

    done = f"{out}/pairs.jsonl: done already (same arguments and inputs; see {out}/pairs.jsonl.done.json)"
    for extra in ([], ["--overwrite"]):  # --overwrite redoes only what differs
        proc = run_script(cmd + extra)
        assert proc.stdout.strip().splitlines()[-1] == done and unchanged()
    proc = run_script(cmd[:-3] + ["8", "--plots", "false"], check=False)
    assert proc.returncode == 2 and proc.stderr == (f"error: {out}/pairs.jsonl was made with other arguments or inputs "
                                                    "(seed: 7 -> 8); pass --overwrite to redo it\n")
    assert unchanged()
    with open(off, "a") as f:
        f.write(json.dumps(dict(prompt="new", chosen="c", rejected="r")) + "\n")
    proc = run_script(cmd, check=False)
    assert proc.returncode == 2 and "(input --offline changed); pass --overwrite" in proc.stderr and unchanged()
    run_script(cmd[:-3] + ["8", "--plots", "false", "--overwrite"])
    assert json.load(open(out / "stats.json"))["seed"] == 8 and not unchanged()
    marker = json.load(open(out / "pairs.jsonl.done.json"))
    assert marker["args"]["seed"] == 8 and marker["counts"]["n_offline_in"] == 41
    assert marker["output"]["fingerprint"] == protocol.fingerprint(str(out / "pairs.jsonl"))


def test_an_overwrite_that_dies_midway_leaves_nothing_that_counts_as_finished(tmp_path, monkeypatch):
    """--overwrite with new settings writes stats.json before the new pairs.jsonl: killed in between, the old pairs must
    not keep a marker that vouches for them beside the new stats (the report and run_rounds.sh would mix the two)."""
    scores = write(tmp_path / "s.jsonl", random_rows(1, n=30))
    out = tmp_path / "out"
    bp.main(scores=scores, out_dir=str(out), min_valid=3, seed=7, plots=False)
    old_pairs = (out / "pairs.jsonl").read_bytes()
    marker = str(out / "pairs.jsonl.done.json")
    assert os.path.isfile(marker)

    def killed(path, rows):
        raise KeyboardInterrupt  # as a kill between stats.json and the new pairs.jsonl

    monkeypatch.setattr(bp.protocol, "write_jsonl", killed)
    with pytest.raises(KeyboardInterrupt):
        bp.main(scores=scores, out_dir=str(out), min_valid=3, seed=8, plots=False, overwrite=True)
    monkeypatch.undo()
    assert json.load(open(out / "stats.json"))["seed"] == 8 and (out / "pairs.jsonl").read_bytes() == old_pairs
    assert not os.path.exists(marker)  # the old pairs no longer count as finished
    with pytest.raises(DiceError, match="is not a finished output of this stage"):
        bp.main(scores=scores, out_dir=str(out), min_valid=3, seed=7, plots=False)
    bp.main(scores=scores, out_dir=str(out), min_valid=3, seed=8, plots=False, overwrite=True)
    assert json.load(open(marker))["output"]["fingerprint"] == protocol.fingerprint(str(out / "pairs.jsonl"))
    # bad input with --overwrite is refused before anything beside the output changes: the marker stays
    with pytest.raises(DiceError):
        bp.main(scores=write(tmp_path / "bad.jsonl", ["{"]), out_dir=str(out), min_valid=3, seed=8, plots=False,
                overwrite=True)
    assert json.load(open(marker))["args"]["seed"] == 8


def test_a_failing_plot_publishes_nothing(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no plots today")

    monkeypatch.setattr(bp, "pair_figures", broken)
    scores = write(tmp_path / "s.jsonl", scan_case())
    with pytest.raises(RuntimeError, match="no plots today"):
        bp.main(scores=scores, out_dir=str(tmp_path / "out"), min_valid=2)
    assert not {"pairs.jsonl", "pairs.jsonl.done.json", "pairs.jsonl.tmp"} & set(os.listdir(tmp_path / "out"))


def test_cli_bad_input_is_one_line_with_file_and_line(tmp_path):
    scores = write(tmp_path / "scores.jsonl", [json.dumps(srow("p", ["a", "b"], [1.0, 0.0])), "{oops"])
    proc = run_script(["python", "03_build_pairs.py", "--scores", scores, "--out_dir", tmp_path / "out"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {scores}:2: bad JSON (Expecting property name enclosed in double quotes)"
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("case, message", [
    ("malformed line", "scores.jsonl:5: bad JSON"),
    ("too few valid responses", "no pairs left: 4 prompts, 4 with fewer than --min_valid 3 usable responses"),
    ("bad offline pairs", "off.jsonl:1: missing field 'rejected'"),
])
def test_cli_one_line_errors_leave_no_folder_behind(tmp_path, case, message):
    rows = [srow(f"q{i}", ["a", "bb"], [1.0, 0.0]) for i in range(4)] + (["{oops"] if case == "malformed line" else [])
    scores = write(tmp_path / "scores.jsonl", rows)
    pairs = [dict(prompt=f"o{i}", chosen="c", rejected="r") for i in range(4)]
    off = write(tmp_path / "off.jsonl", [dict(prompt="o", chosen="c")] if case == "bad offline pairs" else pairs)
    out = tmp_path / "runs" / "round_1" / "pairs"  # three folders that do not exist yet
    proc = run_script(["python", "03_build_pairs.py", "--scores", scores, "--out_dir", out, "--offline", off,
                       "--min_valid", "3" if case == "too few valid responses" else "2"], check=False)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_cli_misspelt_flag_is_one_line_and_touches_nothing_also_when_done_already(tmp_path):
    scores = write(tmp_path / "scores.jsonl", scan_case())
    out = tmp_path / "pairs"
    cmd = ["python", "03_build_pairs.py", "--scores", scores, "--out_dir", out, "--min_valid", "2", "--plots", "false"]
    typo = "error: unknown flag --gama (did you mean --gamma?); see --help\n"
    proc = run_script(cmd + ["--gama", "0.3"], check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", typo)
    assert not os.path.exists(out)
    run_script(cmd)
    files = {name: ((out / name).read_bytes(), os.stat(out / name).st_mtime_ns) for name in os.listdir(out)}
    assert sorted(files) == ["pairs.jsonl", "pairs.jsonl.done.json", "stats.json"]
    proc = run_script(cmd + ["--gama", "0.3"], check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", typo)
    assert {name: ((out / name).read_bytes(), os.stat(out / name).st_mtime_ns) for name in os.listdir(out)} == files
    proc = run_script(["python", "03_build_pairs.py", "--help", "--out_dir", tmp_path / "new"])
    assert proc.stdout.startswith("usage: python 03_build_pairs.py") and not os.path.exists(tmp_path / "new")
    assert "--gamma (float; default None)" in proc.stdout and "--alpha (float | auto; default auto)" in proc.stdout


def test_the_marker_names_the_policy_behind_the_reference_logps(tmp_path):
    """04 refuses to train from another model than the one whose log-probs become its reference log-probs: 03's done
    marker carries, per input, the policy in that input's own done marker (02 wrote it), or None where the input has
    no marker or its pairs carry no log-probs. pairs.jsonl itself does not change."""
    scores = write(tmp_path / "scores.jsonl", [srow(f"q{i}", ["a", "bb"], [1.0, 0.0]) for i in range(4)])
    no_logps = [{k: v for k, v in srow(f"q{i}", ["a", "bb"], [1.0, 0.0]).items() if k != "policy_logps"}
                for i in range(4)]
    scores_no_logps = write(tmp_path / "scores_no_logps.jsonl", no_logps)
    off = write(tmp_path / "off.jsonl", [dict(prompt=f"o{i}", chosen="c", rejected="r", policy_chosen_logps=-1.0,
                                               policy_rejected_logps=-2.0) for i in range(4)])
    off_no_logps = write(tmp_path / "off_no_logps.jsonl", [dict(prompt=f"o{i}", chosen="c", rejected="r")
                                                           for i in range(4)])
    runs = iter(range(100))

    def built(scores, **kw):
        out = tmp_path / f"out{next(runs)}"
        bp.main(scores=scores, out_dir=str(out), min_valid=2, alpha=0, plots=False, **kw)
        marker = json.load(open(out / "pairs.jsonl.done.json"))
        return marker["reference_logps_policy"], (out / "pairs.jsonl").read_bytes()

    none = {"scores": None, "offline": None}
    unmarked, pairs = built(scores, offline=off)
    assert unmarked == none
    policy = {"path": "runs/x/round_0/model", "fingerprint": "14b73b3c102d7c6c"}
    def scored_by(path, policy, output=None):  # 02's done marker (the fields read here)
        protocol.write_json(protocol.done_marker(path), {"stage": "02_score", "inputs": {
            "policy": policy, "reference": {"path": "runs/x/models/sft", "fingerprint": "0" * 16}},
            "output": {"path": path, "fingerprint": output or protocol.fingerprint(path)}})

    for path in (scores, off, scores_no_logps, off_no_logps):
        scored_by(path, policy)
    assert built(scores, offline=off) == ({"scores": policy, "offline": policy}, pairs)
    assert built(scores, offline=off, gamma=0)[0] == {"scores": policy, "offline": None}  # no offline pairs
    assert built(scores, offline=off_no_logps)[0] == {"scores": policy, "offline": None}
    assert built(scores_no_logps, offline=off)[0] == {"scores": None, "offline": policy}
    protocol.write_json(protocol.done_marker(off), {"stage": "02_score", "inputs": {}})  # a marker without a policy
    assert built(scores, offline=off)[0] == {"scores": policy, "offline": None}
    scored_by(off, policy, output="0123456789abcdef")  # a stale marker: it vouches for another file
    assert built(scores, offline=off)[0] == {"scores": policy, "offline": None}


def test_cli_fixed_alpha_and_no_length_control(tmp_path):
    scores = write(tmp_path / "scores.jsonl", scan_case())
    run_script(["python", "03_build_pairs.py", "--scores", scores, "--out_dir", tmp_path / "a", "--min_valid", "2",
                "--alpha", "0.004", "--plots", "false"])
    stats = json.load(open(tmp_path / "a" / "stats.json"))
    assert stats["alpha"] == 0.004 and stats["alpha_mode"] == "fixed"
    assert stats["sweep"] == [[0.0, 100.0], [0.004, pytest.approx(-100 / 3)]]
    assert not os.path.exists(tmp_path / "a" / "alpha_sweep.png")
    run_script(["python", "03_build_pairs.py", "--scores", scores, "--out_dir", tmp_path / "b", "--min_valid", "2",
                "--length_control", "false", "--plots", "false"])
    stats = json.load(open(tmp_path / "b" / "stats.json"))
    assert stats["alpha"] == 0.0 and stats["alpha_mode"] == "off" and stats["mean_len_diff_after"] == 100


def test_offline_pairs_in_every_shape_users_hold_give_the_same_pairs(tmp_path):
    """The replay buffer as strings (JSONL, the official preference.json: JSON lines in a .json file), TRL's
    conversational messages (.json list), full conversations as in HuggingFaceH4/ultrafeedback_binarized (.parquet)
    and a save_to_disk DatasetDict with --split: the same pairs.jsonl, byte for byte."""
    import datasets

    rows = [srow(f"gen {i}?", ["a", "bb", "ccc"], [0.0, 1.0, 2.0]) for i in range(6)]
    plain = [{"prompt": f"off {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    user = lambda p: [{"role": "user", "content": p}]  # noqa: E731
    turn = lambda a: [{"role": "assistant", "content": a}]  # noqa: E731
    conversational = [{"prompt": user(r["prompt"]), "chosen": turn(r["chosen"]), "rejected": turn(r["rejected"])}
                      for r in plain]
    full = [{"prompt": r["prompt"], "chosen": user(r["prompt"]) + turn(r["chosen"]),
             "rejected": user(r["prompt"]) + turn(r["rejected"]), "score_chosen": 8.0} for r in plain]
    sources = {"jsonl": write(tmp_path / "off.jsonl", plain), "official": write(tmp_path / "preference.json", plain)}
    (tmp_path / "conv.json").write_text(json.dumps(conversational))
    sources["conversational"] = str(tmp_path / "conv.json")
    datasets.Dataset.from_list(full).to_parquet(str(tmp_path / "full.parquet"))
    sources["full"] = str(tmp_path / "full.parquet")
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(full),
                          "test_prefs": datasets.Dataset.from_list(full[:1])}).save_to_disk(str(tmp_path / "saved"))
    outputs = {}
    for name, source in sources.items():
        scores = write(tmp_path / "scores.jsonl", rows)
        out = tmp_path / name
        bp.main(scores=scores, out_dir=str(out), offline=source, gamma=0.5, min_valid=2, plots=False)
        outputs[name] = (out / "pairs.jsonl").read_text()
    out = tmp_path / "saved_out"
    bp.main(scores=scores, out_dir=str(out), offline=str(tmp_path / "saved"), split="train_prefs", gamma=0.5,
            min_valid=2, plots=False)
    outputs["saved"] = (out / "pairs.jsonl").read_text()
    assert len(set(outputs.values())) == 1, {k: v[:200] for k, v in outputs.items()}
    offline = [json.loads(line) for line in outputs["jsonl"].splitlines() if '"offline"' in line]
    assert offline and all(p["prompt"].startswith("off ") and p["chosen"].startswith("good ") for p in offline)
    with pytest.raises(DiceError, match=r"full.parquet: row 0: 'chosen' must be a string or messages"):
        broken = [{**full[0], "chosen": user("x")}]
        datasets.Dataset.from_list(broken).to_parquet(str(tmp_path / "full.parquet"))
        bp.main(scores=scores, out_dir=str(tmp_path / "bad"), offline=str(tmp_path / "full.parquet"), gamma=0.5,
                min_valid=2, plots=False)
