"""The dice package: the command line (cli), the stage protocol (done already, refused, locked, resumed, published
atomically), reading inputs (data) and loading models (models)."""
import json
import os
import re
import subprocess
import sys
import time
from typing import Literal

import pytest

from conftest import ROOT
from dice import DiceError, cli, data, models, protocol
from dice.protocol import AlreadyDone


def run(out, args, inputs=None, overwrite=False, text="result", work=None):
    """A stage whose body writes `text` to st.tmp; returns what st.work said when `work` is given."""
    resumed = None
    with protocol.stage("test", out, args, inputs=inputs, overwrite=overwrite, seed=args.get("seed")) as st:
        if work is not None:
            resumed = st.work(work)
        st.record["counts"] = {"n": len(text)}
        with open(st.tmp, "w") as f:
            f.write(text)
    return resumed


def test_finished_output_with_same_arguments_and_inputs_is_done_already(tmp_path):
    src, out = tmp_path / "in.txt", str(tmp_path / "out.txt")
    src.write_text("a")
    run(out, {"seed": 1, "input": str(src)}, inputs={"input": str(src)})
    marker = json.load(open(out + ".done.json"))
    assert marker["stage"] == "test" and marker["seed"] == 1 and marker["counts"] == {"n": 6}
    assert marker["inputs"]["input"]["fingerprint"] == protocol.fingerprint(str(src))
    assert marker["output"]["fingerprint"] == protocol.fingerprint(out)
    assert {"args", "versions", "seconds"} <= set(marker)
    with pytest.raises(AlreadyDone, match="done already"):
        run(out, {"seed": 1, "input": str(src)}, inputs={"input": str(src)}, text="other")
    with pytest.raises(AlreadyDone):  # --overwrite replaces only what differs
        run(out, {"seed": 1, "input": str(src)}, inputs={"input": str(src)}, overwrite=True, text="other")
    assert open(out).read() == "result"
    # the same content under another path (a moved run folder) is the same input
    moved = tmp_path / "moved.txt"
    moved.write_text("a")
    with pytest.raises(AlreadyDone):
        run(out, {"seed": 1, "input": str(moved)}, inputs={"input": str(moved)})
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "moved.txt", "out.txt", "out.txt.done.json"]


def test_changed_arguments_or_inputs_are_refused_unless_overwrite(tmp_path):
    src, out = tmp_path / "in.txt", str(tmp_path / "out.txt")
    src.write_text("a")
    run(out, {"seed": 1, "input": str(src)}, inputs={"input": str(src)})
    with pytest.raises(DiceError, match=r"other arguments or inputs \(seed: 1 -> 2\); pass --overwrite"):
        run(out, {"seed": 2, "input": str(src)}, inputs={"input": str(src)})
    src.write_text("b")
    with pytest.raises(DiceError, match="input --input changed"):
        run(out, {"seed": 1, "input": str(src)}, inputs={"input": str(src)})
    assert open(out).read() == "result"
    run(out, {"seed": 1, "input": str(src)}, inputs={"input": str(src)}, overwrite=True, text="new")
    assert open(out).read() == "new"
    assert json.load(open(out + ".done.json"))["output"]["fingerprint"] == protocol.fingerprint(out)


def test_an_output_without_its_marker_is_not_replaced_silently(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("mine")
    with pytest.raises(DiceError, match="already exists but is not a finished output.*pass --overwrite"):
        run(str(out), {})
    assert out.read_text() == "mine"
    # a hand-edited output no longer matches its marker: the same refusal
    run(str(out), {}, overwrite=True)
    out.write_text("edited")
    with pytest.raises(DiceError, match="not a finished output"):
        run(str(out), {})


def test_a_failing_body_publishes_nothing_and_a_killed_runs_tmp_is_rebuilt(tmp_path):
    out = str(tmp_path / "out.txt")
    with pytest.raises(RuntimeError):
        with protocol.stage("test", out, {}) as st:
            open(st.tmp, "w").write("half")
            raise RuntimeError("boom")
    assert not os.path.exists(out) and not os.path.exists(out + ".done.json") and not os.path.exists(out + ".lock")
    assert not os.path.exists(out + ".tmp")  # an error removes what the body had written
    open(out + ".tmp", "w").write("half")  # as a kill -9 leaves it
    run(out, {})  # the leftover OUT.tmp is removed, not resumed
    assert open(out).read() == "result"


def test_folder_outputs_are_published_and_replaced_whole(tmp_path):
    out = str(tmp_path / "model")
    for n in (1, 2):
        with protocol.stage("test", out, {"n": n}, overwrite=True) as st:
            os.makedirs(st.tmp)
            open(os.path.join(st.tmp, f"file{n}"), "w").write("x")
    assert os.listdir(out) == ["file2"] and not os.path.exists(out + ".old")


def test_fingerprints_of_files_folders_and_hub_ids(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    first = protocol.fingerprint(str(tmp_path / "d"))
    (tmp_path / "d" / "config.json").write_text('{"a": 1}')
    assert protocol.fingerprint(str(tmp_path / "d")) != first
    assert protocol.fingerprint("org/model") == protocol.fingerprint("org/model") != protocol.fingerprint("org/other")


def test_resumable_work_is_kept_for_the_same_settings_only(tmp_path):
    out, work = str(tmp_path / "out.txt"), str(tmp_path / "out.txt.partial")

    def start(args, overwrite=False):
        with pytest.raises(KeyboardInterrupt):  # a run stopped half way leaves its work behind
            with protocol.stage("test", out, args, overwrite=overwrite) as st:
                resumed = st.work(work)
                open(work, "a").write("row\n")
                raise KeyboardInterrupt(resumed)

    start({"k": 1})
    assert os.path.exists(work + ".args.json")
    assert run(out, {"k": 1}, work=work) is True
    assert not os.path.exists(work) and not os.path.exists(work + ".args.json")  # removed once finished
    out2 = str(tmp_path / "b.txt")
    work2 = out2 + ".partial"
    with pytest.raises(KeyboardInterrupt):
        with protocol.stage("test", out2, {"k": 1}) as st:
            st.work(work2)
            open(work2, "w").write("row\n")
            raise KeyboardInterrupt
    with pytest.raises(DiceError, match=r"holds an unfinished run with other settings \(k: 1 -> 2\).*--overwrite"):
        with protocol.stage("test", out2, {"k": 2}) as st:
            st.work(work2)
    assert open(work2).read() == "row\n"
    with protocol.stage("test", out2, {"k": 2}, overwrite=True) as st:
        assert st.work(work2) is False and not os.path.exists(work2)
        open(st.tmp, "w").write("done")


def test_an_output_being_written_is_refused_naming_the_writer(tmp_path):
    out = str(tmp_path / "out.txt")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dice import protocol\n"
         f"with protocol.stage('test', {out!r}, {{}}) as st:\n"
         "    print('holding', flush=True); time.sleep(60)\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(DiceError, match=rf"is being written right now by process {holder.pid} "):
            run(out, {})
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    run(out, {})  # the kernel releases the lock of a killed process
    assert open(out).read() == "result"


def demo_main(model: str, num: int = 4, rate: float = 0.5, engine: Literal["auto", "hf"] = "auto",
              ids: list[int] = None, bf16: bool | Literal["auto"] = "auto", plots: bool = True, name: str = None):
    """A stage's main, as the scripts write it.

    Args:
        model: the model
        num: how many (>= 1)
        rate: a share (> 0, <= 1)
        engine: which engine
        ids: token ids
        bf16: auto, or true / false
        plots: draw the plots
        name: a name
    """
    return cli.flags(demo_main, locals())


def test_flags_converts_by_the_signature_and_checks_the_ranges_of_the_args_lines():
    got = demo_main("m", num="3", rate="1", engine="hf", ids=(1, 2), bf16="false", plots="False", name="")
    assert vars(got) == dict(model="m", num=3, rate=1.0, engine="hf", ids=[1, 2], bf16=False, plots=False, name=None)
    assert demo_main("m", ids=0).ids == [0] and demo_main("m", ids="0,5").ids == [0, 5]  # 0 is a real token id
    assert vars(demo_main(5, ids="7")) == dict(model="5", num=4, rate=0.5, engine="auto", ids=[7], bf16="auto",
                                               plots=True, name=None)
    for kwargs, message in [(dict(num=0), "--num must be >= 1, got 0"), (dict(num=2.5), "--num must be an int"),
                            (dict(num=True), "--num must be an int"), (dict(rate=0), "--rate must be > 0"),
                            (dict(rate=1.5), "--rate must be <= 1"), (dict(rate="nan"), "--rate must be finite"),
                            (dict(engine="vllm"), "--engine must be one of auto, hf; got 'vllm'"),
                            (dict(bf16="maybe"), "--bf16 must be bool | auto"), (dict(plots="x"), "--plots must be"),
                            (dict(ids="1,a"), "--ids must be")]:
        with pytest.raises(DiceError, match=re.escape(message)):
            demo_main("m", **kwargs)


@pytest.mark.parametrize("argv, message", [
    (["--model", "m", "--nmu", "3"], "unknown flag --nmu (did you mean --num?)"),
    (["--model=m", "--engin=hf"], "unknown flag --engin (did you mean --engine?)"),
    (["--model", "m", "--zzz"], "unknown flag --zzz; see --help"),
    (["--num", "3"], "--model is required"),
    (["--modle", "m"], "unknown flag --modle (did you mean --model?)"),  # the typo, not its consequence
    (["m", "4", "0.5", "hf", "1", "auto", "true", "n", "extra"], "unexpected argument 'extra'"),
    (["--model", "m", "-x"], "unknown flag -x"),
])
def test_the_command_line_is_checked_before_main_runs(argv, message):
    with pytest.raises(DiceError, match=re.escape(message)):
        cli.check_command_line(demo_main, argv)


def test_fire_spellings_of_known_flags_pass():
    for argv in (["--model", "m", "--noplots", "--num=3"], ["m", "--plots", "--ids", "1,2"],
                 ["--model", "m", "--rate", "-0.5"], ["--model", "m", "--plots", "--name", "x"]):
        cli.check_command_line(demo_main, argv)


def test_options_are_checked_against_the_names_main_accepts_beside_its_own():
    def main(model: str, **options):
        """Train.

        Args:
            model: the model
            options: other settings
        """
    asked = []

    def extra():
        asked.append(1)
        return ["eval_steps", "eval_strategy"]

    cli.check_command_line(main, ["--model", "m"], extra)
    assert not asked  # no other flag given: the names are not even looked up (04: importing TRL takes seconds)
    cli.check_command_line(main, ["--model", "m", "--eval_steps", "3"], extra)
    with pytest.raises(DiceError, match=re.escape("unknown flag --modl (did you mean --model?)")):
        cli.check_command_line(main, ["--modl", "m"], extra)  # named before "--model is required"
    with pytest.raises(DiceError, match=re.escape("unknown flag --eval_step (did you mean --eval_steps?)")):
        cli.check_command_line(main, ["--model", "m", "--eval_step", "3"], extra)


def test_help_lists_every_flag_with_its_type_default_and_args_line():
    text = cli.usage(demo_main, "demo.py")
    assert "A stage's main, as the scripts write it." in text
    for flag, line in cli.help_lines(demo_main).items():
        assert f"--{flag} " in text and line in text
    assert "--num (int; default 4)" in text and "--model (str; required)" in text
    assert "--engine (auto | hf; default auto)" in text


def test_a_tool_answers_help_and_refuses_a_typo_before_any_work(tmp_path):
    ok = subprocess.run([sys.executable, "tools/tiny_model.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "--seed (int; default 0)" in ok.stdout and ok.stderr == ""
    out = tmp_path / "model"
    bad = subprocess.run([sys.executable, "tools/tiny_model.py", "--out", str(out), "--sed", "3"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "error: unknown flag --sed (did you mean --seed?); see --help\n" and not out.exists()


def test_a_failed_stage_leaves_no_folder_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out.jsonl"
    with pytest.raises(DiceError):
        with protocol.stage("test", out, {}):
            raise DiceError("bad input")
    assert not (tmp_path / "a").exists()
    (tmp_path / "c").mkdir()
    with pytest.raises(DiceError):
        with protocol.stage("test", tmp_path / "c" / "out.jsonl", {}):
            raise DiceError("bad input")
    assert os.listdir(tmp_path) == ["c"] and os.listdir(tmp_path / "c") == []  # a folder it did not make stays
    with protocol.stage("test", out, {}) as st:
        open(st.tmp, "w").write("x")
    assert out.read_text() == "x"


def test_chat_template_file_replaces_the_tokenizers_own_and_warns_on_unknown_specials(tiny_policy, tmp_path, capsys):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<|user|>{{ m['content'] }}<|im_end|>{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = models.load_tokenizer(tiny_policy, chat_template=str(template))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False) == "<|user|>hi<|im_end|><|assistant|>"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names <|user|>, <|assistant|>, which the tokenizer" in err  # <|im_end|> is known
    assert models.load_tokenizer(tiny_policy).chat_template != tok.chat_template
    template.write_text("{% if %}")
    with pytest.raises(DiceError, match=r"t.jinja:1: bad chat template"):
        models.load_tokenizer(tiny_policy, chat_template=str(template))
    with pytest.raises(DiceError, match="cannot read chat template"):
        models.load_tokenizer(tiny_policy, chat_template=str(tmp_path / "missing.jinja"))


# ----------------------------------------------------------------------------- data as users hold it

USER = [{"role": "user", "content": "Why?"}]


@pytest.mark.parametrize("row", [
    {"prompt": "Why?", "chosen": "Because.", "rejected": "No."},  # strings (this project, official DICE data)
    {"prompt": USER, "chosen": [{"role": "assistant", "content": "Because."}],  # TRL conversational
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": "Why?", "chosen": USER + [{"role": "assistant", "content": "Because."}],  # H4 ultrafeedback_binarized
     "rejected": USER + [{"role": "assistant", "content": "No."}], "messages": [], "score_chosen": 8.0},
    {"chosen": USER + [{"role": "assistant", "content": "Because."}],  # implicit prompt (trl-lib)
     "rejected": USER + [{"role": "assistant", "content": "No."}]},
])
def test_read_pair_accepts_the_shapes_users_hold(row):
    assert data.read_pair(row, "f:1") == {"prompt": "Why?", "chosen": "Because.", "rejected": "No."}


def test_read_pair_keeps_multi_turn_prompts_and_refuses_mismatches():
    system = [{"role": "system", "content": "Be brief."}] + USER
    row = {"chosen": system + [{"role": "assistant", "content": "A"}],
           "rejected": system + [{"role": "assistant", "content": "B"}]}
    assert data.read_pair(row, "f:1") == {"prompt": system, "chosen": "A", "rejected": "B"}
    bad = [({"prompt": "Why?", "chosen": "A"}, "missing field 'rejected'"),
           ({"chosen": "A", "rejected": "B"}, "missing field 'prompt'"),
           ({"prompt": "Why?", "chosen": USER, "rejected": "B"}, "'chosen' must be a string or messages ending"),
           ({"prompt": "Other?", "chosen": USER + [{"role": "assistant", "content": "A"}], "rejected": "B"},
            "'prompt' differs from the conversation"),
           ({"chosen": system + [{"role": "assistant", "content": "A"}],
             "rejected": USER + [{"role": "assistant", "content": "B"}]}, "different conversations"),
           ({"prompt": "Why?", "chosen": 3, "rejected": "B"}, "'chosen' must be a string")]
    for row, message in bad:
        with pytest.raises(DiceError, match=f"^f:1: .*{message}"):
            data.read_pair(row, "f:1")


def test_read_rows_reads_every_format_users_hold(tmp_path):
    import datasets

    rows = [{"instruction": "a", "n": 1}, {"instruction": "b", "n": 2}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # the official DICE files
    (tmp_path / "list.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    for source, split in [("r.jsonl", "train"), ("lines.json", "train"), ("list.json", "train"),
                          ("r.parquet", "train"), ("saved", "test")]:
        got = list(data.read_rows(str(tmp_path / source), split))
        assert [r for _, r in got] == rows, source
    assert [w for w, _ in data.read_rows(str(tmp_path / "lines.json"))] == [f"{tmp_path}/lines.json:1",
                                                                            f"{tmp_path}/lines.json:2"]
    (tmp_path / "bad.json").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DiceError, match=r"bad.json:2: bad JSON"):
        list(data.read_rows(str(tmp_path / "bad.json")))
    with pytest.raises(DiceError, match=r"cannot load dataset .*saved \(split nope\)"):
        list(data.read_rows(str(tmp_path / "saved"), "nope"))
    with pytest.raises(DiceError, match="expected a .jsonl, .json or .parquet file"):
        list(data.read_rows(str(tmp_path / "r.txt")))


SCRIPTS = ["01_generate.py", "02_score.py", "03_build_pairs.py", "04_train_dpo.py", "tools/judge_rm.py",
           "tools/merge_shards.py", "tools/node_check.py", "tools/prepare_ultrafeedback.py", "tools/report.py",
           "tools/smollm2.py", "tools/tiny_model.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_stage_and_tool_answers_help_and_refuses_an_unknown_flag_before_any_work(script, tmp_path):
    """--help: exit 0, the flags on stdout, nothing else (smollm2.py would otherwise fetch and build a 538 MB model:
    its cache stays empty). An unknown flag: one line, exit 2, nothing written in the working folder."""
    env = {**os.environ, "DICE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    path = os.path.join(ROOT, script)
    ok = subprocess.run([sys.executable, path, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith(f"usage: python {os.path.basename(script)}") and ok.stderr == ""
    bad = subprocess.run([sys.executable, path, "--no_such_flag", "1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: unknown flag --no_such_flag") and bad.stderr.endswith("; see --help\n")
    assert os.listdir(tmp_path) == []
