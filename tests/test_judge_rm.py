"""tools/judge_rm.py: a local reward model as the judge-free AlpacaEval stand-in, and alpaca_eval's own formats."""
import json
import os

import pytest

import judge_rm
from conftest import run_script


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A tiny reward model (a 2-layer Llama with a 1-output score head) and the tiny ChatML tokenizer, built offline."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    import tiny_model

    out = str(tmp_path_factory.mktemp("rm") / "rm")
    tok = tiny_model.build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def outputs_file(path, texts, generator):
    path.write_text(json.dumps([{"instruction": f"Question {i}?", "output": t, "generator": generator}
                                for i, t in enumerate(texts)]))
    return path


def test_win_rates_count_ties_half_and_match_by_instruction():
    assert judge_rm.win_rate([3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 5.0, -1.0]) == (1 + 0.5 + 0 + 1) / 4
    rows = [{"instruction": "b", "reward": 1.0}, {"instruction": "a", "reward": 0.0}]
    base = [{"instruction": "a", "reward": 0.5}, {"instruction": "b", "reward": 0.5}]
    assert judge_rm.aligned(rows, base) == ([1.0, 0.0], [0.5, 0.5])
    with pytest.raises(judge_rm.DiceError, match="different instructions"):
        judge_rm.aligned(rows, base[:1])


def test_leaderboard_parsing_on_alpaca_evals_real_format(tmp_path):
    """The header and a row as alpaca_eval 0.6.6 writes leaderboard.csv (DataFrame.to_csv, model name as index)."""
    path = tmp_path / "leaderboard.csv"
    path.write_text(",win_rate,standard_error,n_wins,n_wins_base,n_draws,n_total,discrete_win_rate,mode,avg_length,"
                    "length_controlled_winrate,lc_standard_error\n"
                    "dice-round_1,25.77,1.29,204,599,2,805,25.46,community,2021,25.08,0.81\n")
    assert judge_rm.read_leaderboard(str(path), "dice-round_1") == {
        "lc_win_rate": 25.08, "lc_standard_error": 0.81, "win_rate": 25.77, "standard_error": 1.29,
        "avg_length": 2021.0, "n_total": 805.0}
    assert judge_rm.read_leaderboard(str(path), "other") is None


def test_rewards_equal_a_direct_forward_batched_or_not(reward_model, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["A short one.", "A somewhat longer answer with more words in it.", "", "Mid length text."]
    src = outputs_file(tmp_path / "model_outputs.json", texts, "m")
    for batch in (1, 3):
        run_script(["python", "tools/judge_rm.py", "--model", reward_model, "--outputs", src,
                    "--out", tmp_path / f"b{batch}.jsonl", "--batch_size", str(batch)])
    rows = [json.loads(line) for line in open(tmp_path / "b1.jsonl")]
    batched = [json.loads(line) for line in open(tmp_path / "b3.jsonl")]
    tok = AutoTokenizer.from_pretrained(reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    for i, row in enumerate(rows):
        ids = tok.apply_chat_template([{"role": "user", "content": f"Question {i}?"},
                                       {"role": "assistant", "content": texts[i]}], tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([list(ids)])).logits[0, 0].item()
        assert row["reward"] == pytest.approx(expected, abs=1e-5)
        assert batched[i]["reward"] == pytest.approx(expected, abs=1e-5)
        assert (row["instruction"], row["output"], row["generator"], row["chars"]) == \
            (f"Question {i}?", texts[i], "m", len(texts[i]))
    marker = json.load(open(tmp_path / "b1.jsonl.done.json"))
    assert marker["counts"] == {"rows": 4} and marker["stage"] == "judge_rm"
    again = run_script(["python", "tools/judge_rm.py", "--model", reward_model, "--outputs", src,
                        "--out", tmp_path / "b1.jsonl"])
    assert "done already" in again.stdout


def test_a_missing_reward_model_is_one_line_and_writes_nothing(tmp_path):
    src = outputs_file(tmp_path / "model_outputs.json", ["x"], "m")
    proc = run_script(["python", "tools/judge_rm.py", "--model", tmp_path / "nope", "--outputs", src,
                       "--out", tmp_path / "s.jsonl"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "model not found" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["model_outputs.json"]


def test_our_outputs_load_with_alpaca_evals_own_loader(tmp_path):
    utils = pytest.importorskip("alpaca_eval.utils")
    src = outputs_file(tmp_path / "model_outputs.json", ["one", "two"], "dice-round_1")
    frame = utils.load_or_convert_to_dataframe(str(src))
    assert list(frame["output"]) == ["one", "two"] and set(frame["generator"]) == {"dice-round_1"}
