"""The AlpacaEval 2 judge as run_rounds.sh runs it, offline: the real `alpaca_eval` CLI (0.6.6, the pinned stack) with
local reference outputs in alpaca_eval_gpt4_baseline.json's shape, against a fake OpenAI-compatible server on
127.0.0.1 whose verdict is known (the longer output, with probability 0.9), then tools/report.py on the run folder.
The same server plays a read-only HF hub for the run without --reference_outputs. Nothing leaves the machine."""
import csv
import json
import math
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import SHARED_DATA, run_script
from test_report import model_outputs

pytest.importorskip("alpaca_eval")
ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
ALPACA_EVAL = os.path.join(os.path.dirname(sys.executable), "alpaca_eval")  # the installed command the loop runs
LONGER = [i % 3 != 0 for i in range(20)]  # the model's answer is the longer one for 13 of 20 instructions


@pytest.fixture
def server():
    """(url, requests, hub): POST /v1/chat/completions answers as GPT-4 Turbo does for the weighted annotator (one
    token, 'm' = the first output shown or 'M', with top_logprobs), preferring the longer output with probability 0.9;
    HEAD/GET /datasets/tatsu-lab/alpaca_eval/resolve/REV/NAME serve hub[NAME] (404 for anything else)."""
    requests, hub = [], {}

    class Handler(BaseHTTPRequestHandler):
        def send(self, status, body=b"", **headers):
            self.send_response(status)
            for key, value in dict(headers, **{"Content-Length": str(len(body))}).items():
                self.send_header(key.replace("_", "-"), value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(dict(body, authorization=self.headers["Authorization"], path=self.path))
            first, second = re.findall(r'"output": """(.*?)"""', body["messages"][-1]["content"], re.S)
            best, other = ("m", "M") if len(first) > len(second) else ("M", "m")
            top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
                   for t, p in ((best, 0.9), (other, 0.1))]
            choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": best},
                      "logprobs": {"content": [dict(top[0], top_logprobs=top)]}}
            self.send(200, json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                       "choices": [choice], "usage": {"prompt_tokens": 400, "completion_tokens": 1,
                                                                      "total_tokens": 401}}).encode(),
                      Content_Type="application/json")

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            if self.path.startswith("/datasets/tatsu-lab/alpaca_eval/resolve/") and name in hub:
                self.send(200, hub[name], X_Repo_Commit="1" * 40, ETag=f'"{name}"')
            else:
                self.send(404, X_Error_Code="EntryNotFound")

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", requests, hub
    httpd.shutdown()
    httpd.server_close()


def judge(folder, url, hub, reference=None, **env):
    """The loop's judge command on folder/model_outputs.json (the annotations cache in the run folder, the GLM's
    weights not saved: alpaca_eval would write both into its own site-packages folder), with the judge at `url`
    (OPENAI_BASE_URL; no client config file) and none of the caller's OPENAI_*/HF_* settings; the HF cache is `hub`,
    offline unless env says."""
    args = [ALPACA_EVAL, "--model_outputs", folder / "model_outputs.json", "--annotators_config", ANNOTATOR,
            "--output_path", folder, "--caching_path", folder / "annotations_cache.json",
            "--metric_kwargs", "{'save_weights_dir': None}"] + (["--reference_outputs", reference] if reference else [])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HF_"))},
           "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": url + "/v1",
           "OPENAI_CLIENT_CONFIG_PATH": str(folder / "no-client-config.yaml"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(hub), "HF_DATASETS_CACHE": str(hub / "datasets"),
           **env}
    return subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=300)


def cache_df_gamed(hub, n):
    """A made-up df_gamed.csv (the length-controlled GLM's regularization data, which alpaca_eval fetches with
    hf_hub_download) in the HF cache, as `hf download tatsu-lab/alpaca_eval df_gamed.csv --repo-type dataset` leaves
    the real one: two length-gamed baselines, instruction difficulties for instructions 0..n-1."""
    repo = hub / "datasets--tatsu-lab--alpaca_eval"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    with open(repo / "snapshots" / ("0" * 40) / "df_gamed.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["model", "index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline"])
        for model, delta, preference in (("verbose", -1.0, 0.8), ("concise", 1.0, 0.2)):
            rows.writerows([model, i, preference, delta, (i % 5 - 2) / 2, False] for i in range(n))


def instructions():
    """The first 20 real AlpacaEval instructions when ../shared/data holds them, else hand-written ones."""
    path = os.path.join(SHARED_DATA, "alpaca_eval_prompts.jsonl")
    if not os.path.isfile(path):
        return [f"Name {i + 1} fruits and say which one is \"best\".\nBe brief." for i in range(len(LONGER))]
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f][:len(LONGER)]


@pytest.mark.slow
def test_the_judge_gives_the_known_win_rate_and_the_report_shows_it(server, tmp_path):
    """With --reference_outputs (a local alpaca_eval_gpt4_baseline.json) the judge needs no hub for its data; offline,
    the length-controlled fit still needs df_gamed.csv from the hub: without it in the HF cache alpaca_eval exits 1
    after paying for every annotation and writes no leaderboard; with it cached, the rerun reuses the paid
    annotations (--caching_path, no new request) and writes the leaderboard the report reads."""
    url, requests, _ = server
    out = tmp_path / "out"
    texts = instructions()
    answers = {x: " ".join(["word"] * (15 if longer else 5)) for x, longer in zip(texts, LONGER)}
    folder = model_outputs(out, 1, answers).parent  # 01 --format alpaca_eval's file, generator run-round_1
    reference = tmp_path / "alpaca_eval_gpt4_baseline.json"  # the hub file's fields, made-up outputs
    ref = " ".join(["ref"] * 12)
    reference.write_text(json.dumps([{"instruction": x, "output": ref,
                                      "generator": "gpt4_1106_preview", "dataset": "helpful_base"} for x in texts]))

    proc = judge(folder, url, tmp_path / "hub", reference)
    assert proc.returncode == 1 and "df_gamed.csv: offline mode is enabled" in proc.stderr
    assert not (folder / ANNOTATOR / "leaderboard.csv").exists()
    assert len(requests) == 20 and len(json.loads((folder / "annotations_cache.json").read_text())) == 20
    for r in requests:  # the annotator's request: one token of gpt-4-1106-preview with its 5 top log-probs
        assert (r["path"], r["model"], r["max_tokens"], r["temperature"], r["logprobs"], r["top_logprobs"]) == (
            "/v1/chat/completions", "gpt-4-1106-preview", 1, 1, True, 5)
        assert [m["role"] for m in r["messages"]] == ["system", "user"] and r["authorization"] == "Bearer sk-test"
    # the annotator shows the two outputs in a random order (the reference first or second), then maps 'm'/'M' back
    assert {r["messages"][1]["content"].index(ref) < r["messages"][1]["content"].index('"M"') for r in requests} == {
        True, False}

    cache_df_gamed(tmp_path / "hub", len(texts))
    proc = judge(folder, url, tmp_path / "hub", reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(requests) == 20  # every annotation came from the cache
    with open(folder / ANNOTATOR / "leaderboard.csv", newline="") as f:
        board, = list(csv.DictReader(f))  # no precomputed models beside ours: the reference is a path
    # the weighted win rate: the mean probability that the judge prefers the model, (13 * 0.9 + 7 * 0.1) / 20
    assert board[""] == "run-round_1" and math.isclose(float(board["win_rate"]), 62.0)
    assert math.isclose(float(board["discrete_win_rate"]), 65.0)  # 13 of 20 preferred
    assert (board["n_wins"], board["n_wins_base"], board["n_draws"], board["n_total"]) == ("13", "7", "0", "20")
    assert math.isclose(float(board["standard_error"]), 100 * 0.8 * math.sqrt(0.65 * 0.35 / 19))  # 0.9/0.1 sem
    avg_length = int(sum(map(len, answers.values())) / len(answers))
    assert int(board["avg_length"]) == avg_length
    lc = float(board["length_controlled_winrate"])
    assert 45 < lc < 55  # a judge that rewards length only: controlling for length leaves about a coin flip
    annotations = json.loads((folder / ANNOTATOR / "annotations.json").read_text())
    assert {a["instruction"]: round(a["preference"], 9) for a in annotations} == {
        x: 1.9 if longer else 1.1 for x, longer in zip(texts, LONGER)}  # 2 - P(the reference is preferred)
    assert all(a["generator_2"] == "run-round_1" and math.isclose(a["preference_price_per_example"], 401 * 0.01 / 1000)
               for a in annotations)  # alpaca_eval's price of gpt-4-1106-preview: $0.01 per 1000 tokens

    proc = run_script(["python", "tools/report.py", "--out", out, "--plots", "false", "--paper", "llama3-8b"])
    text = (out / "report.md").read_text()
    assert f"| 1 | run-round_1 | {lc:.2f} | 62.00 | 8.75 | {avg_length} | 25.08 | 25.77 |" in text
    assert "not judged yet" not in proc.stdout and "alpaca_eval --model_outputs" not in text


def test_without_reference_outputs_datasets_refuses_the_hubs_script(server, tmp_path):
    """alpaca_eval's default reference is datasets.load_dataset("tatsu-lab/alpaca_eval", trust_remote_code=True), a
    script dataset (the hub repo holds alpaca_eval.py) that datasets >= 4 refuses: the judge exits 1 before any
    request, so the loop must pass --reference_outputs. Here the hub is the fake server, holding such a script."""
    url, requests, hub = server
    hub.update({"README.md": b"---\nlicense: cc-by-nc-4.0\n---\n", "alpaca_eval.py": b"import datasets\n"})
    folder = model_outputs(tmp_path / "out", 1, {"Say hi.": "Hi."}).parent
    proc = judge(folder, url, tmp_path / "hub", HF_HUB_OFFLINE="0", HF_ENDPOINT=url)
    assert proc.returncode == 1 and requests == [] and not (folder / ANNOTATOR / "leaderboard.csv").exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        "RuntimeError: Dataset scripts are no longer supported, but found alpaca_eval.py")
