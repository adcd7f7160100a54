"""Stage 4 of DICE: train the next policy with DPO (TRL's DPOTrainer), the reference being the starting policy.

Each DICE round trains pi_{t+1} from pi_t on the round's pairs with the DPO loss (Rafailov et al. 2023, Eq. 7),
the objective every DICE round optimizes (Chen et al. 2025, Sec. 2-3):

    L(theta) = -E_(x, y_w, y_l) log sigmoid( beta * [log pi_theta(y_w|x) - log pi_ref(y_w|x)]
                                            - beta * [log pi_theta(y_l|x) - log pi_ref(y_l|x)] )

with pi_ref = pi_t (the model being trained, frozen at its starting weights). log pi(y|x) is the sum of the
completion's token log-probs, computed exactly as TRL 1.16 does for conversational rows. Defaults are the paper's
released script (sail-sg/dice scripts/run_dice/pipeline.sh): beta 0.1, lr 5e-7, 300 steps of 1 pair x 4 accumulation x
8 GPUs = 32 pairs, bf16, max length 4096, 576 held-out pairs evaluated every 20 steps, checkpoints every 100.

Learning-rate schedule: flat at --learning_rate from step 1. The released script passes `--lr_scheduler_type constant
--warmup_steps 50`, but transformers' `constant` schedule ignores warmup: `get_scheduler` (transformers/optimization.py)
returns `get_constant_schedule(optimizer)` for it before it ever reads num_warmup_steps (`if name ==
SchedulerType.CONSTANT: return schedule_func(optimizer)`), so the paper's runs trained at 5e-7 from the first step.
Hence the defaults `--lr_scheduler_type constant --warmup_steps 0`; a warmup with `constant` is refused as having no
effect (use --lr_scheduler_type constant_with_warmup for one). The same script trains round 0 (DPO from an SFT model
on offline pairs).

Reference log-probs are reused, not recomputed: rows of 03's pairs.jsonl carry `ref_chosen_logps`/`ref_rejected_logps`,
the log-probs that 02_score.py computed with this very starting policy. With --reuse_ref_logps (default) those values
feed the loss directly: no reference model is loaded and no reference forward runs. Rows without them (offline
pairs, or any pair that --max_length truncates, whose supplied values cover the untruncated response) get them from
TRL's own precompute, once, before training, with the starting policy. With --reuse_ref_logps=False every row is
precomputed that way, and --reuse_ref_logps=False --precompute_ref_log_probs=False is TRL's default: a reference
model held in memory and run at every step.

Input  (--pairs, read by data.read_rows): a .jsonl file (errors name file:line), a .json file (a list of objects,
       or JSON lines as the official DICE preference.json), a .parquet file, a folder saved with datasets'
       save_to_disk, or a hub dataset id (--split picks the split of a folder or hub dataset). Each row is a pair in
       any shape data.read_pair reads: `prompt`, `chosen`, `rejected` strings (03's pairs.jsonl); TRL's
       conversational format (prompt as messages, chosen/rejected as one assistant turn); or full conversations
       whose last turn is the answer (HuggingFaceH4/ultrafeedback_binarized). Optional `ref_chosen_logps`,
       `ref_rejected_logps` (floats or null) and `source` (generated/offline, counted in the model card); other
       fields are ignored. Every pair becomes TRL's conversational format: the prompt as messages (a string is one
       user turn), chosen/rejected as one assistant turn.
Prompt format: the tokenizer's own chat template, or --chat_template FILE (a jinja file, configs/templates/; the same
       file 01 and 02 got). The tokenizer carrying it is TRL's processing_class, so TRL renders and tokenizes prompts
       and responses with it, and it is saved into the output (chat_template.jinja), so later rounds, vLLM and the
       AlpacaEval generation render the same format. The file is an input of the stage (compared by content).
Output (--out, a standard HF model folder, published whole by protocol.stage once complete):
       model (safetensors), config, generation config, tokenizer (with its chat template); README.md (model card:
       base model, round, data and counts, DPO settings, held-out reward accuracy, how to load it, citations);
       trainer_state.json; metrics.jsonl (the trainer's log history, one entry a line); loss.png (train/eval loss,
       reward accuracy, reward margin); training_args.json (every DPOConfig field; no pickled training_args.bin);
       runs/ (with --report_to tensorboard: TensorBoard's event files, copied from OUT.work/runs/, which is
       deleted; not when TENSORBOARD_LOGGING_DIR sends them elsewhere). OUT.done.json: protocol.stage's marker
       (arguments, input fingerprints, seed, counts, reference log-probs supplied/computed, train_runtime, versions,
       seconds). A rerun with the same arguments and inputs is "done already"; other ones are refused unless
       --overwrite.
       Checkpoints every --save_steps go to OUT.work/: a run that was stopped is resumed from its last complete
       checkpoint when rerun with the same arguments and inputs; OUT.work/ is removed once OUT is published unless
       --keep_checkpoints.
Tracking: --report_to (wandb, tensorboard, trackio, ...; default none) and --run_name are DPOConfig fields, passed
       through (run_rounds.sh passes REPORT_TO and NAME-round_t).
Hub: --push_to_hub --hub_model_id USER/NAME uploads the published folder (huggingface_hub's upload_folder) once it is
       in place, and again on a rerun that is "done already" (e.g. after a failed upload). The Trainer itself never
       pushes: OUT.work/ holds checkpoints, not the model.

Smoke (CPU, seconds; tiny offline model from tools/tiny_model.py):
    python tools/tiny_model.py --out /tmp/tiny --seed 0
    python 04_train_dpo.py --model /tmp/tiny --pairs data/demo/preferences.jsonl --out /tmp/tiny_dpo --max_steps 2 \\
        --eval_size 4 --eval_steps 1 --logging_steps 1 --learning_rate 1e-3 --gradient_checkpointing False
DPO from an SFT model (a round 0) on a hub dataset in TRL's format, Zephyr prompt format, TensorBoard, pushed:
    python 04_train_dpo.py --model HuggingFaceH4/mistral-7b-sft-beta --pairs HuggingFaceH4/ultrafeedback_binarized \\
        --split train_prefs --chat_template configs/templates/zephyr-dice.jinja --round 0 --out runs/round0/model \\
        --report_to tensorboard --run_name zephyr-round_0 --push_to_hub --hub_model_id USER/zephyr-dpo-round0
Full run (one 8-GPU node, DeepSpeed ZeRO-3, the paper's settings):
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml 04_train_dpo.py \\
        --model runs/round1/model --pairs runs/round1/pairs/pairs.jsonl --out runs/round2/model
"""
import contextlib
import json
import math
import os
import random
import shutil
import string
import time

from dice import DiceError, cli, data, models, protocol, trl_internals

REF_COLUMNS = trl_internals.REF_COLUMNS
# DPOConfig fields this script owns (passing them as extra options would fight with its own arguments), and the
# --resume of earlier versions.
RESERVED_OPTIONS = {
    "output_dir": "checkpoints go to OUT.work/ beside --out",
    "resume_from_checkpoint": "a stopped run resumes by itself when rerun with the same arguments",
    "resume": "a stopped run resumes by itself when rerun with the same arguments",
    "model_init_kwargs": "the model is loaded by this script (safetensors only)",
    **dict.fromkeys(("hub_strategy", "hub_always_push", "hub_revision"),
                    "--push_to_hub uploads the published folder once it is complete (to --hub_model_id)"),
    "hub_token": "log in with `hf auth login` or set HF_TOKEN (--push_to_hub uses huggingface_hub's upload_folder)",
}
RULES = {
    "model": str, "pairs": str, "split": str, "out": str, "chat_template": str, "round": (int, 0),
    "beta": (float, 0.0), "learning_rate": (float, 0.0),
    "lr_scheduler_type": str, "warmup_steps": (int, 0), "max_steps": (int, 1), "per_device_train_batch_size": (int, 1),
    "gradient_accumulation_steps": (int, 1), "max_length": (int, 2), "eval_size": (int, 0), "eval_steps": (int, 1),
    "logging_steps": (int, 1), "save_steps": (int, 1), "save_total_limit": (int, 1), "seed": int,
    "reuse_ref_logps": bool, "overwrite": bool, "keep_checkpoints": bool, "trust_remote_code": bool,
    "push_to_hub": bool, "hub_model_id": str, "hub_private_repo": bool,
}
HUB_ARGS = ("push_to_hub", "hub_model_id", "hub_private_repo")  # where the output goes, not what it is


# ----------------------------------------------------------------------------- input

def read_pairs(source, split):
    """The pairs of --pairs in any shape (data.read_rows, data.read_pair) as TRL conversational rows, with the
    supplied reference log-probs (or None), the row's `source` (generated/offline, or None) and where it was read."""
    rows = []
    for where, row in data.read_rows(source, split):
        pair = data.read_pair(row, where)
        ref = [row.get(key) for key in REF_COLUMNS]
        for key, value in zip(REF_COLUMNS, ref):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value > 1e-3):
                raise DiceError(f"{where}: {key} must be a log-probability (a finite number <= 0) or null, "
                                f"got {value!r}")
        if None in ref:  # one value without the other cannot be used: both get computed
            ref = [None, None]
        rows.append({
            "prompt": data.to_messages(pair["prompt"], where),
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
            REF_COLUMNS[0]: None if ref[0] is None else float(ref[0]),
            REF_COLUMNS[1]: None if ref[1] is None else float(ref[1]),
            "source": row.get("source"), "where": where,
        })
    if not rows:
        raise DiceError(f"{source}: no pairs (it is empty)")
    return rows


def split_eval(rows, eval_size, seed):
    """(train, eval): a seeded random `eval_size` rows held out; both keep the file's order."""
    if eval_size >= len(rows):
        raise DiceError(
            f"--eval_size {eval_size} leaves no training pairs: the pairs file has {len(rows)} "
            f"(pass a smaller --eval_size; 0 = no evaluation)"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:eval_size])
    return [r for i, r in enumerate(rows) if i not in held_out], [r for i, r in enumerate(rows) if i in held_out]


def example(rows, seed):
    """One seeded random pair, shown before training (a look at what the model is trained on)."""
    row = random.Random(seed).choice(rows)
    return f"example pair ({row['where']}):\n" + "\n".join(
        f"  {key}: {row[key][-1]['content'][:200]!r}" for key in ("prompt", "chosen", "rejected"))


def to_dataset(rows, reuse_ref_logps, folder, main_process=True):
    """The rows as a datasets.Dataset written to `folder` by the main process (anew) and loaded back by every process;
    the reference columns only where they will be used; None for no rows. On disk, not in memory: TRL's precompute
    caches its results beside the dataset's files and every process reads them there (an in-memory dataset's cache
    lives in a per-process temporary folder the others cannot see)."""
    from datasets import Dataset, load_from_disk

    if not rows:
        return None
    keep = ["prompt", "chosen", "rejected"]
    if reuse_ref_logps and any(r[REF_COLUMNS[0]] is not None for r in rows):
        keep += list(REF_COLUMNS)
    if main_process:
        shutil.rmtree(folder, ignore_errors=True)  # a resumed run's rows are written again
        Dataset.from_list([{k: r[k] for k in keep} for r in rows]).save_to_disk(folder)
    return load_from_disk(folder)


def load_models(args, online_reference):
    """(tokenizer, policy, reference): pi_t is the policy and, frozen, the reference; the reference is loaded only for
    TRL's on-the-fly reference forward (otherwise its log-probs are supplied or precomputed with the policy)."""
    path, trust = args["model"], args["trust_remote_code"]
    tokenizer = models.load_tokenizer(path, trust_remote_code=trust, chat_template=args["chat_template"])
    if not tokenizer.chat_template:
        raise DiceError(f"{path}: the tokenizer has no chat template (pairs are trained as chat turns, as TRL does); "
                        "pass --chat_template FILE")
    policy = models.load_model(path, trust_remote_code=trust)
    return tokenizer, policy, models.load_model(path, trust_remote_code=trust) if online_reference else None


# ----------------------------------------------------------------------------- DPOConfig

def resolve_args(values):
    """fire's values -> the checked arguments (one cli.convert call), the extra DPOConfig fields kept as given
    under "options" (typed in the stage, see dpo_options, which imports TRL); bf16 stays "auto" or becomes a bool."""
    for name in values["options"]:
        if name in RESERVED_OPTIONS:
            raise DiceError(f"--{name} is not accepted: {RESERVED_OPTIONS[name]}")
    args = {**cli.legacy_convert({k: v for k, v in values.items() if k != "options"}, RULES), "options": values["options"]}
    if args["push_to_hub"] and not args["hub_model_id"]:
        raise DiceError("--push_to_hub needs --hub_model_id USER/NAME (the hub repo the published folder goes to)")
    if args["bf16"] != "auto":
        args["bf16"] = cli.as_bool("bf16", args["bf16"])
    if args["lr_scheduler_type"] == "constant" and args["warmup_steps"]:
        raise DiceError("--warmup_steps has no effect with --lr_scheduler_type constant (transformers ignores warmup "
                        "for it, as in the paper's runs): pass --warmup_steps 0, or --lr_scheduler_type "
                        "constant_with_warmup")
    models.check_model_path(args["model"])
    args["chat_template"] = args["chat_template"] or None  # "" (run_rounds.sh's empty CHAT_TEMPLATE): the model's own
    if args["chat_template"]:
        models.read_chat_template(args["chat_template"])  # a missing or broken file fails here, before any work
    args["split"] = data.split_of(args["pairs"], args["split"])
    return args


def dpo_options(options):
    """The extra command-line options (as fire parsed them) typed as DPOConfig fields by transformers'
    HfArgumentParser, the parser of TRL's own scripts. Unknown names (with a did-you-mean hint) and bad values are
    one-line errors."""
    import dataclasses
    import difflib

    from transformers import HfArgumentParser
    from trl import DPOConfig

    names = [f.name for f in dataclasses.fields(DPOConfig) if f.init]
    strings = []
    for name, value in options.items():
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise DiceError(f"unknown option --{name}: neither an argument of 04_train_dpo.py nor a DPOConfig "
                            f"field{hint}")
        values = value if isinstance(value, (list, tuple)) else [value]  # fire reads 1,2 as a tuple: a list field
        strings += [f"--{name}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values)]
    parser = HfArgumentParser(DPOConfig)

    def fail(message):  # argparse would print its usage and exit 2
        raise DiceError(f"invalid training option: {message}")

    parser.error = fail
    parsed = vars(parser.parse_args(strings))
    return {name: parsed[name] for name in options}


def resolve_bf16(value):
    """'auto' -> bf16 on a CUDA device that supports it, fp32 elsewhere (CPU); True/False as given."""
    if value == "auto":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return value


def dpo_config(args, rows, work, evaluate):
    """The DPOConfig of this run: the script's arguments, then the extra DPOConfig fields (args["options"])."""
    import torch
    from trl import DPOConfig

    extra = dpo_options(args["options"])
    supplied = args["reuse_ref_logps"] and any(r[REF_COLUMNS[0]] is not None for r in rows)
    if supplied and extra.get("precompute_ref_log_probs") is False:
        raise DiceError(f"{args['pairs']} has reference log-probs and --reuse_ref_logps is on, which needs "
                        "precompute_ref_log_probs; pass --reuse_ref_logps=False to run a reference model at every "
                        "step instead")
    config = dict(
        output_dir=work, beta=args["beta"], learning_rate=args["learning_rate"],
        lr_scheduler_type=args["lr_scheduler_type"], warmup_steps=args["warmup_steps"], max_steps=args["max_steps"],
        per_device_train_batch_size=args["per_device_train_batch_size"], per_device_eval_batch_size=1,
        gradient_accumulation_steps=args["gradient_accumulation_steps"], max_length=args["max_length"],
        eval_strategy="steps" if evaluate else "no", eval_steps=args["eval_steps"], logging_steps=args["logging_steps"],
        logging_first_step=True, save_strategy="steps", save_steps=args["save_steps"],
        save_total_limit=args["save_total_limit"], bf16=False if extra.get("fp16") else resolve_bf16(args["bf16"]),
        seed=args["seed"], precompute_ref_log_probs=True, trust_remote_code=args["trust_remote_code"],
        report_to="none",
    )
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several processes without a GPU (torchrun, accelerate launch): accelerate joins them into one run (DDP on
        # gloo) only when use_cpu is set; without it each process would train alone on all the data.
        config["use_cpu"] = True
    try:
        return DPOConfig(**{**config, **extra})
    except (ValueError, TypeError) as e:
        raise DiceError(f"invalid training options: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- the trainer

def preparation(trainer, n_pairs, n_train, n_eval, started):
    """What the trainer made of the pairs, for the record: pairs read, held out, dropped by TRL (prompt alone >=
    max_length) and truncated per split; where the reference log-probs come from; whether a reference model is held;
    the seconds since `started` (tokenization and precompute)."""
    max_length, counts = trainer.args.max_length, {"pairs": n_pairs, "train": n_train, "eval": n_eval}
    for split, dataset, n in (("train", trainer.train_dataset, n_train), ("eval", trainer.eval_dataset, n_eval)):
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise DiceError(f"no {split} pair is left: TRL drops pairs whose prompt alone is >= max_length "
                            f"({max_length}) tokens")
        lengths = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
        counts[f"{split}_dropped_long_prompt"] = n - len(dataset)
        counts[f"{split}_truncated"] = sum(len(p) + max(len(c), len(r)) > max_length for p, c, r in lengths)
    online = not trainer.args.precompute_ref_log_probs
    return {"counts": counts, "reference_model_in_memory": trainer.ref_model is not None,
            "reference_logps": "reference model forward at every step" if online else trainer.ref_logps_counts,
            "prepare_seconds": round(time.time() - started, 3)}


# ----------------------------------------------------------------------------- resume and output

def latest_checkpoint(work, main_process=True):
    """The newest complete checkpoint in `work` (transformers' get_last_checkpoint), or None. The trainer writes
    trainer_state.json last: a checkpoint without it was cut off by a kill and is removed first (main process)."""
    from transformers.trainer_utils import get_last_checkpoint

    if not os.path.isdir(work):
        return None
    for name in os.listdir(work):
        folder = os.path.join(work, name)
        if main_process and name.startswith("checkpoint-") and not os.path.exists(f"{folder}/trainer_state.json"):
            shutil.rmtree(folder)
    return get_last_checkpoint(work)


def plot_metrics(log_history, path):
    """loss.png: train/eval loss, reward accuracy and reward margin against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "DPO loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for prefix, label in (("", "train"), ("eval_", "eval")):
            points = [(e["step"], e[prefix + key]) for e in log_history if prefix + key in e]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    with protocol.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def save_model_folder(trainer, folder, card):
    """The complete model folder in `folder` (protocol.stage renames it onto --out): what save_model writes (weights as
    safetensors, config, generation config, tokenizer with its chat template; every process takes part, ZeRO-3
    gathers the weights), then, on the main process, training_args.json in place of the pickled training_args.bin,
    trainer_state.json, metrics.jsonl, loss.png, the model card README.md, and TensorBoard's event files (runs/,
    written into the work folder, which is deleted after publishing)."""
    trainer.save_model(folder)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        pickled = os.path.join(folder, "training_args.bin")
        if os.path.exists(pickled):
            os.remove(pickled)
        protocol.write_json(os.path.join(folder, "training_args.json"), trainer.args.to_dict())
        trainer.state.save_to_json(os.path.join(folder, "trainer_state.json"))
        protocol.write_jsonl(os.path.join(folder, "metrics.jsonl"), trainer.state.log_history)
        plot_metrics(trainer.state.log_history, os.path.join(folder, "loss.png"))
        with protocol.atomic_open(os.path.join(folder, "README.md")) as f:
            f.write(card)
        runs = os.path.join(trainer.args.output_dir, "runs")  # transformers' TensorBoard default: OUTPUT_DIR/runs/
        if os.path.isdir(runs):
            shutil.copytree(runs, os.path.join(folder, "runs"))


CITATIONS = """@inproceedings{chen2025bootstrapping,
  title         = {Bootstrapping Language Models with {DPO} Implicit Rewards},
  author        = {Chen, Changyu and Liu, Zichen and Du, Chao and Pang, Tianyu and Liu, Qian and Sinha, Arunesh and
                   Varakantham, Pradeep and Lin, Min},
  booktitle     = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year          = {2025},
  eprint        = {2406.09760},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2406.09760}
}

@inproceedings{rafailov2023direct,
  title         = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author        = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Manning, Christopher D. and
                   Ermon, Stefano and Finn, Chelsea},
  booktitle     = {Advances in Neural Information Processing Systems 36 (NeurIPS)},
  year          = {2023},
  eprint        = {2305.18290},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2305.18290}
}"""
CARD = string.Template("""---
$metadata
---

# $name

Trained with DPO (Rafailov et al. 2023) from the base model below, which is also its reference, on preference pairs:
the training step of a DICE round (Chen et al., "Bootstrapping Language Models with DPO Implicit Rewards", ICLR 2025;
round 0 is DPO from the SFT model on offline pairs). Made by `04_train_dpo.py` of a reimplementation of DICE, on TRL's
`DPOTrainer`.

- **Base model** (the starting policy and DPO reference): `$base_model`
- **DICE round**: $round
- **Data**: `$pairs`$split: $pairs_read pairs read ($sources); $train trained on, $eval held out; $dropped dropped by
  TRL (prompt alone >= max length), $truncated truncated
- **Prompt format**: $prompt_format

## Training settings

| setting | value |
| --- | --- |
| loss | DPO (`$loss_type`), beta $beta |
| learning rate | $learning_rate, schedule `$lr_scheduler_type`, $warmup_steps warmup steps |
| steps | $global_step optimizer steps |
| global batch | $global_batch pairs ($per_device per device x $accumulation accumulation x $processes process(es)) |
| max length | $max_length tokens (prompt + response) |
| precision | $precision |
| seed | $seed |
| reference log-probs | $reference |

## Evaluation during training

$evaluation

## How to load it

With transformers (the tokenizer carries the chat template the model was trained with):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("$model_id")
model = AutoModelForCausalLM.from_pretrained("$model_id", dtype="auto")
messages = [{"role": "user", "content": "Why is the sky blue?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=256)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

With vLLM:

```python
from vllm import LLM, SamplingParams

llm = LLM(model="$model_id")
outputs = llm.chat([{"role": "user", "content": "Why is the sky blue?"}], SamplingParams(max_tokens=256))
print(outputs[0].outputs[0].text)
```

## Citation

```bibtex
$citations
```
""")


def is_local(path):
    return os.path.exists(os.path.expanduser(str(path)))


def model_card(args, trainer, record, rows):
    """README.md of the published folder (TRL's create_model_card writes only into the work folder and leaves out
    the round, the settings and the held-out accuracy): YAML metadata by huggingface_hub, then this run's facts."""
    import collections

    from huggingface_hub import ModelCardData

    config, counts, log = trainer.args, record["counts"], trainer.state.log_history
    model_id = args["hub_model_id"] if args["push_to_hub"] else args["out"]
    metadata = ModelCardData(base_model=None if is_local(args["model"]) else args["model"],
                             datasets=None if is_local(args["pairs"]) else args["pairs"], library_name="transformers",
                             pipeline_tag="text-generation", tags=["dice", "dpo", "trl"])
    sources = collections.Counter(r["source"] for r in rows if r["source"] is not None)
    evals = [e for e in log if "eval_rewards/accuracies" in e]
    evaluation = (f"Held-out reward accuracy {evals[-1]['eval_rewards/accuracies']:.4f} (the fraction of the "
                  f"{counts['eval']} held-out pairs whose implicit reward ranks chosen above rejected), eval loss "
                  f"{evals[-1]['eval_loss']:.4f}, at step {evals[-1]['step']}." if evals
                  else "None: no pairs were held out (--eval_size 0).")
    reference = record["reference_logps"]
    return CARD.substitute(
        metadata=metadata.to_yaml(), name=model_id, model_id=model_id, base_model=args["model"],
        round="not given" if args["round"] is None else args["round"], pairs=args["pairs"],
        split=f" (split `{args['split']}`)" if args["split"] else "", pairs_read=counts["pairs"],
        sources=", ".join(f"{k} {v}" for k, v in sorted(sources.items())) or "no `source` column",
        train=counts["train"], eval=counts["eval"], dropped=counts["train_dropped_long_prompt"]
        + counts.get("eval_dropped_long_prompt", 0), truncated=counts["train_truncated"]
        + counts.get("eval_truncated", 0),
        prompt_format=f"the chat template `{args['chat_template']}`" if args["chat_template"]
        else "the base model's own chat template",
        loss_type=",".join(config.loss_type) if isinstance(config.loss_type, list) else config.loss_type,
        beta=config.beta, learning_rate=config.learning_rate,
        lr_scheduler_type=getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type),
        warmup_steps=config.warmup_steps, global_step=trainer.state.global_step,
        global_batch=config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size,
        per_device=config.per_device_train_batch_size, accumulation=config.gradient_accumulation_steps,
        processes=config.world_size, max_length=config.max_length, precision="bf16" if config.bf16 else "fp32",
        seed=config.seed, evaluation=evaluation, citations=CITATIONS,
        reference=reference if isinstance(reference, str) else "; ".join(
            f"{split}: {v['supplied']} supplied by the pairs, {v['computed']} computed before training"
            for split, v in reference.items()))


@contextlib.contextmanager
def push_when_done_already(args, main_process):
    """A rerun of a finished output with --push_to_hub still uploads it (e.g. after a failed upload), then answers
    "done already" (protocol.AlreadyDone, raised by protocol.stage)."""
    try:
        yield
    except protocol.AlreadyDone:
        if args["push_to_hub"] and main_process:
            upload_to_hub(args, args["out"])
        raise


def upload_to_hub(args, folder):
    """Upload the published folder to --hub_model_id (created when missing) with huggingface_hub; a failure is one
    line (the folder stays published: rerun the same command to retry the upload)."""
    import huggingface_hub

    repo = args["hub_model_id"]
    try:
        huggingface_hub.create_repo(repo, private=args["hub_private_repo"] or None, exist_ok=True)
        huggingface_hub.upload_folder(repo_id=repo, folder_path=folder, repo_type="model",
                                      commit_message=f"04_train_dpo.py: {os.path.basename(folder)}"
                                      + ("" if args["round"] is None else f" (DICE round {args['round']})"))
    except Exception as e:  # HfHubHTTPError, no network, not logged in, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DiceError(f"{folder} is published but its upload to {repo} failed ({reason}); rerun the same command "
                        "to retry") from None
    print(f"pushed {folder} to the hub: {repo}")


def summary(out, record, log_history):
    """The closing lines: the output, its steps, the pair counts, the last train and eval logs."""
    last = [e for e in log_history if "loss" in e][-1:]
    evals = [e for e in log_history if "eval_loss" in e][-1:]
    lines = [f"wrote {out} ({record['global_step']} steps, train_runtime {record['train_runtime']} s)",
             f"pairs: {json.dumps(record['counts'])}"]
    if last:
        lines.append(f"last train log: loss {last[0]['loss']:.4f}, reward accuracy {last[0].get('rewards/accuracies')}")
    if evals:
        lines.append(f"last eval: loss {evals[0]['eval_loss']:.4f}, reward accuracy "
                     f"{evals[0].get('eval_rewards/accuracies')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(model: str, pairs: str, out: str, split: str = "train", chat_template: str = None, round: int = None,
         beta: float = 0.1, learning_rate: float = 5e-7, lr_scheduler_type: str = "constant", warmup_steps: int = 0,
         max_steps: int = 300, per_device_train_batch_size: int = 1, gradient_accumulation_steps: int = 4,
         max_length: int = 4096, eval_size: int = 576, eval_steps: int = 20, logging_steps: int = 20,
         save_steps: int = 100, save_total_limit: int = 1, bf16="auto", seed: int = 42, reuse_ref_logps: bool = True,
         overwrite: bool = False, keep_checkpoints: bool = False, trust_remote_code: bool = False,
         push_to_hub: bool = False, hub_model_id: str = None, hub_private_repo: bool = False, **options):
    """Train pi_{t+1} from pi_t on the round's pairs with the DPO loss, pi_t being the reference (DPO Eq. 7).

    Args:
        model: starting policy, an HF model folder (or hub id); it is also the DPO reference.
        pairs: pairs (.jsonl/.json/.parquet, dataset folder or hub id): strings or TRL's conversational format.
        out: output model folder (published when complete); checkpoints go to OUT.work/.
        split: the split of a dataset folder or hub dataset id given to --pairs.
        chat_template: jinja chat template file instead of the model's own (configs/templates); saved into OUT.
        round: the DICE round this trains (0 = DPO from the SFT model), for the model card.
        beta: DPO beta (paper 0.1).
        learning_rate: learning rate (paper 5e-7).
        lr_scheduler_type: transformers scheduler name; constant = the paper's flat rate from step 1.
        warmup_steps: linear warmup steps (0: the paper's `constant` schedule ignored its --warmup_steps 50).
        max_steps: optimizer steps (paper 300).
        per_device_train_batch_size: pairs per device per micro-batch (paper 1).
        gradient_accumulation_steps: micro-batches per step (paper 4; x 8 GPUs = 32 pairs a step).
        max_length: tokens of prompt + response; longer pairs truncated, prompts this long dropped (TRL).
        eval_size: pairs held out (seeded) and evaluated every --eval_steps (paper 576); 0 = none.
        eval_steps: evaluate every N steps (paper 20).
        logging_steps: log metrics every N steps (paper 20; the first step is always logged).
        save_steps: checkpoint into OUT.work/ every N steps (paper 100); a rerun resumes from the last one.
        save_total_limit: checkpoints kept in OUT.work/ (paper 1).
        bf16: auto = bf16 on a CUDA device that supports it, fp32 elsewhere; or true/false.
        seed: seed of the eval split, data order and trainer.
        reuse_ref_logps: use the rows' ref_chosen_logps/ref_rejected_logps (no reference model).
        overwrite: redo an output made with other arguments or inputs (and discard their unfinished checkpoints).
        keep_checkpoints: keep OUT.work/ after publishing --out.
        trust_remote_code: allow custom model code from the model folder.
        push_to_hub: upload the published folder to --hub_model_id (also from a rerun that is done already).
        hub_model_id: the hub repo (USER/NAME) of --push_to_hub, created when missing.
        hub_private_repo: create that repo private (else the account's default).
        options: any other DPOConfig / TrainingArguments field, e.g. --report_to=tensorboard --run_name=NAME-round_1
    """
    args = resolve_args(dict(locals()))
    rows = read_pairs(args["pairs"], args["split"])
    train_rows, eval_rows = split_eval(rows, args["eval_size"], args["seed"])
    # The launcher's RANK names the process that locks and writes: known without importing torch (done already in ~1 s)
    main_process, inputs = os.environ.get("RANK", "0") == "0", {k: args[k] for k in ("model", "pairs", "chat_template")}
    with push_when_done_already(args, main_process), protocol.stage(
            "04_train_dpo", args["out"], args, inputs=inputs, overwrite=args["overwrite"], seed=args["seed"],
            ignore=("keep_checkpoints", *HUB_ARGS), main_process=main_process) as st:
        work = st.out + ".work"
        config = dpo_config(args, rows, work, evaluate=bool(eval_rows))
        state = config.distributed_state  # accelerate's PartialState of this run, set up by DPOConfig
        state.print("04_train_dpo: " + json.dumps(args, default=str))
        with config.main_process_first(local=False, desc="work folder"):  # the main process decides first
            checkpoint = latest_checkpoint(work, st.main) if st.work(work, keep=args["keep_checkpoints"]) else None

        #### model and tokenizer (with --chat_template, if given): pi_t is the policy and, frozen, the reference
        tokenizer, policy, reference = load_models(args, online_reference=not config.precompute_ref_log_probs)

        #### dataset: the pairs as TRL conversational rows, with the reference log-probs they supply
        state.print(example(train_rows, args["seed"]))
        with config.main_process_first(local=False, desc="datasets"):  # written by the main process, then read
            train_dataset, eval_dataset = (to_dataset(rs, args["reuse_ref_logps"], f"{work}/data/{name}", st.main)
                                           for name, rs in (("train", train_rows), ("eval", eval_rows)))

        #### training: the DPO loss above, on TRL's DPOTrainer
        t0 = time.time()
        trainer = trl_internals.dice_dpo_trainer()(model=policy, ref_model=reference, args=config, train_dataset=train_dataset,
                                     eval_dataset=eval_dataset, processing_class=tokenizer)
        st.record.update(preparation(trainer, len(rows), len(train_rows), len(eval_rows), t0))
        state.print(f"resuming from {checkpoint}" if checkpoint else f"starting at step 0 (checkpoints in {work})")
        state.print(" ".join(f"{k}: {json.dumps(v)}" for k, v in st.record.items()))
        result = trainer.train(resume_from_checkpoint=checkpoint)

        #### save: the complete model folder (with its model card), which the stage publishes as --out
        st.record.update(bf16=config.bf16, resumed_from=checkpoint, processes=state.num_processes,
                         global_step=trainer.state.global_step, train_runtime=result.metrics.get("train_runtime"),
                         train_loss=result.metrics.get("train_loss"))
        save_model_folder(trainer, st.tmp, model_card(args, trainer, st.record, rows))
    state.print(summary(st.out, st.record, trainer.state.log_history))
    if args["push_to_hub"] and main_process:
        upload_to_hub(args, st.out)


if __name__ == "__main__":
    cli.run(main)
