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

Input  (--pairs, JSONL, one pair a line): `prompt` (string, or a list of {role, content} messages), `chosen`,
       `rejected` (strings); optional `ref_chosen_logps`, `ref_rejected_logps` (floats or null); other fields ignored.
       A prompt string becomes one user turn; chosen/rejected become one assistant turn (TRL's conversational format).
Output (--out, a standard HF model folder, published whole by common.stage once complete):
       model (safetensors), config, generation config, tokenizer; trainer_state.json; metrics.jsonl (the trainer's log
       history, one entry a line); loss.png (train/eval loss, reward accuracy, reward margin); training_args.json
       (every DPOConfig field; no pickled training_args.bin). OUT.done.json: common.stage's marker (arguments, input
       fingerprints, seed, counts, reference log-probs supplied/computed, train_runtime, versions, seconds).
       A rerun with the same arguments and inputs is "done already"; other ones are refused unless --overwrite.
       Checkpoints every --save_steps go to OUT.work/: a run that was stopped is resumed from its last complete
       checkpoint when rerun with the same arguments and inputs; OUT.work/ is removed once OUT is published unless
       --keep_checkpoints.

Smoke (CPU, seconds; tiny offline model from tools/tiny_model.py):
    python tools/tiny_model.py --out /tmp/tiny --seed 0
    python 04_train_dpo.py --model /tmp/tiny --pairs data/demo/preferences.jsonl --out /tmp/tiny_dpo --max_steps 2 \\
        --eval_size 4 --eval_steps 1 --logging_steps 1 --learning_rate 1e-3 --gradient_checkpointing False
Full run (one 8-GPU node, DeepSpeed ZeRO-3, the paper's settings):
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml 04_train_dpo.py \\
        --model runs/round1/model --pairs runs/round1/pairs/pairs.jsonl --out runs/round2/model
"""
import functools
import json
import math
import os
import random
import shutil
import time
from unittest import mock

import common
from common import DiceError

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# DPOConfig fields this script owns (passing them as extra options would fight with its own arguments), and the
# --resume of earlier versions.
RESERVED_OPTIONS = {
    "output_dir": "checkpoints go to OUT.work/ beside --out",
    "resume_from_checkpoint": "a stopped run resumes by itself when rerun with the same arguments",
    "resume": "a stopped run resumes by itself when rerun with the same arguments",
    "model_init_kwargs": "the model is loaded by this script (safetensors only)",
}
RULES = {
    "model": str, "pairs": str, "out": str, "beta": (float, 0.0), "learning_rate": (float, 0.0),
    "lr_scheduler_type": str, "warmup_steps": (int, 0), "max_steps": (int, 1), "per_device_train_batch_size": (int, 1),
    "gradient_accumulation_steps": (int, 1), "max_length": (int, 2), "eval_size": (int, 0), "eval_steps": (int, 1),
    "logging_steps": (int, 1), "save_steps": (int, 1), "save_total_limit": (int, 1), "seed": int,
    "reuse_ref_logps": bool, "overwrite": bool, "keep_checkpoints": bool, "trust_remote_code": bool,
}


# ----------------------------------------------------------------------------- input

def read_pairs(path):
    """Rows of a pairs file in TRL's conversational format (+ the supplied reference log-probs or None, + line)."""
    rows = []
    for line, row in common.read_jsonl(path):
        where = f"{path}:{line}"
        messages = common.check_pair(row, where)
        ref = [row.get(key) for key in REF_COLUMNS]
        for key, value in zip(REF_COLUMNS, ref):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value > 1e-3):
                raise DiceError(f"{where}: {key} must be a log-probability (a finite number <= 0) or null, "
                                f"got {value!r}")
        if None in ref:  # one value without the other cannot be used: both get computed
            ref = [None, None]
        rows.append({
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
            REF_COLUMNS[0]: None if ref[0] is None else float(ref[0]),
            REF_COLUMNS[1]: None if ref[1] is None else float(ref[1]),
            "line": line,
        })
    if not rows:
        raise DiceError(f"{path}: no pairs (the file is empty)")
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


def example(rows, path, seed):
    """One seeded random pair, shown before training (a look at what the model is trained on)."""
    row = random.Random(seed).choice(rows)
    return f"example pair ({path}:{row['line']}):\n" + "\n".join(
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
    tokenizer = common.load_tokenizer(path, trust_remote_code=trust)
    if not tokenizer.chat_template:
        raise DiceError(f"{path}: the tokenizer has no chat template (pairs are trained as chat turns, as TRL does)")
    policy = common.load_model(path, trust_remote_code=trust)
    return tokenizer, policy, common.load_model(path, trust_remote_code=trust) if online_reference else None


# ----------------------------------------------------------------------------- DPOConfig

def resolve_args(values):
    """fire's values -> the checked arguments (one common.convert call), the extra DPOConfig fields kept as given
    under "options" (typed in the stage, see dpo_options, which imports TRL); bf16 stays "auto" or becomes a bool."""
    for name in values["options"]:
        if name in RESERVED_OPTIONS:
            raise DiceError(f"--{name} is not accepted: {RESERVED_OPTIONS[name]}")
    args = {**common.convert({k: v for k, v in values.items() if k != "options"}, RULES), "options": values["options"]}
    if args["bf16"] != "auto":
        args["bf16"] = common.as_bool("bf16", args["bf16"])
    if args["lr_scheduler_type"] == "constant" and args["warmup_steps"]:
        raise DiceError("--warmup_steps has no effect with --lr_scheduler_type constant (transformers ignores warmup "
                        "for it, as in the paper's runs): pass --warmup_steps 0, or --lr_scheduler_type "
                        "constant_with_warmup")
    common.check_model_path(args["model"])
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

def rows_needing_ref_logps(dataset, max_length):
    """Indices of tokenized rows whose reference log-probs must be computed: no supplied value, or a sequence that
    training truncates (the supplied value covers the whole response, the training loss only the kept part)."""
    supplied = REF_COLUMNS[0] in dataset.column_names
    chosen = dataset[REF_COLUMNS[0]] if supplied else [None] * len(dataset)
    prompt, chosen_ids, rejected_ids = dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]
    return [
        i for i in range(len(dataset))
        if chosen[i] is None
        or (max_length is not None and len(prompt[i]) + max(len(chosen_ids[i]), len(rejected_ids[i])) > max_length)
    ]


@functools.cache
def dice_dpo_trainer():
    """The DiceDPOTrainer class, built on first use: importing TRL takes seconds, and a finished rerun answers "done
    already" without it. `module.DiceDPOTrainer` reaches it too (module __getattr__ below)."""
    import trl.trainer.dpo_trainer as trl_dpo

    class DiceDPOTrainer(trl_dpo.DPOTrainer):
        """TRL 1.16's DPOTrainer, except that reference log-probs already in the dataset are used as they are.

        TRL reads `ref_chosen_logps`/`ref_rejected_logps` from the batch only with precompute_ref_log_probs=True, and
        its __init__ then recomputes every row with `_precompute_ref_logps` (which fails on the existing columns). This
        subclass overrides that private method (TRL pinned to 1.16.0; tests/test_train_dpo.py checks the behaviour):
        only rows that lack values, or that training truncates, go through TRL's precompute; the others keep theirs.
        TRL's hash of every weight (its precompute cache key) is taken only when a precompute actually runs.
        """

        def __init__(self, *args, **kwargs):
            self.ref_logps_counts = {}
            with mock.patch.object(trl_dpo, "hash_module", lambda module: None):
                super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if len(dataset) == 0:
                raise DiceError(f"no {name} pair is left: TRL drops pairs whose prompt alone is >= max_length tokens")
            todo = rows_needing_ref_logps(dataset, self.args.max_length)
            self.ref_logps_counts[name] = {"supplied": len(dataset) - len(todo), "computed": len(todo)}
            if not todo:
                return dataset
            if self._precompute_model_hash is None:  # the reference is the untrained policy itself
                self._precompute_model_hash = trl_dpo.hash_module(self.model)
            present = [c for c in REF_COLUMNS if c in dataset.column_names]
            if len(todo) == len(dataset):
                return super()._precompute_ref_logps(dataset.remove_columns(present), name, batch_size)
            computed = super()._precompute_ref_logps(dataset.select(todo).remove_columns(present), name, batch_size)
            values = {c: list(dataset[c]) for c in REF_COLUMNS}
            for c in REF_COLUMNS:  # positions within this very dataset: select() keeps the order of `todo`
                for j, i in enumerate(todo):
                    values[c][i] = computed[c][j]
            dataset = dataset.remove_columns(present)
            for c in REF_COLUMNS:
                dataset = dataset.add_column(c, values[c])
            return dataset

    return DiceDPOTrainer


def __getattr__(name):
    if name == "DiceDPOTrainer":
        return dice_dpo_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def preparation(trainer, n_pairs, n_train, n_eval):
    """What the trainer made of the pairs, for the record: pairs read, held out, dropped by TRL (prompt alone >=
    max_length) and truncated per split; where the reference log-probs come from; whether a reference model is held."""
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
            "reference_logps": "reference model forward at every step" if online else trainer.ref_logps_counts}


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
    with common.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def save_model_folder(trainer, folder):
    """The complete model folder in `folder` (common.stage renames it onto --out): what save_model writes (weights as
    safetensors, config, generation config, tokenizer; every process takes part, ZeRO-3 gathers the weights), then,
    on the main process, training_args.json in place of the pickled training_args.bin, trainer_state.json,
    metrics.jsonl and loss.png."""
    trainer.save_model(folder)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        pickled = os.path.join(folder, "training_args.bin")
        if os.path.exists(pickled):
            os.remove(pickled)
        common.write_json(os.path.join(folder, "training_args.json"), trainer.args.to_dict())
        trainer.state.save_to_json(os.path.join(folder, "trainer_state.json"))
        common.write_jsonl(os.path.join(folder, "metrics.jsonl"), trainer.state.log_history)
        plot_metrics(trainer.state.log_history, os.path.join(folder, "loss.png"))


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

def main(model: str, pairs: str, out: str,
         beta: float = 0.1, learning_rate: float = 5e-7, lr_scheduler_type: str = "constant", warmup_steps: int = 0,
         max_steps: int = 300, per_device_train_batch_size: int = 1, gradient_accumulation_steps: int = 4,
         max_length: int = 4096, eval_size: int = 576, eval_steps: int = 20, logging_steps: int = 20,
         save_steps: int = 100, save_total_limit: int = 1, bf16="auto", seed: int = 42, reuse_ref_logps: bool = True,
         overwrite: bool = False, keep_checkpoints: bool = False, trust_remote_code: bool = False, **options):
    """Train pi_{t+1} from pi_t on the round's pairs with the DPO loss, pi_t being the reference (DPO Eq. 7).

    Args:
        model: starting policy, an HF model folder (or hub id); it is also the DPO reference.
        pairs: JSONL of pairs: prompt, chosen, rejected (+ optional ref_chosen_logps, ref_rejected_logps).
        out: output model folder (published when complete); checkpoints go to OUT.work/.
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
        options: any other DPOConfig / TrainingArguments field, e.g. --gradient_checkpointing=False --report_to=wandb
    """
    args = resolve_args(dict(locals()))
    rows = read_pairs(args["pairs"])
    train_rows, eval_rows = split_eval(rows, args["eval_size"], args["seed"])
    # The launcher's RANK names the process that locks and writes: known without importing torch, so that a finished
    # rerun answers "done already" within a second or two.
    with common.stage("04_train_dpo", args["out"], args, inputs={"model": args["model"], "pairs": args["pairs"]},
                      overwrite=args["overwrite"], seed=args["seed"], ignore=("keep_checkpoints",),
                      main_process=os.environ.get("RANK", "0") == "0") as st:
        work = st.out + ".work"
        config = dpo_config(args, rows, work, evaluate=bool(eval_rows))
        state = config.distributed_state  # accelerate's PartialState of this run, set up by DPOConfig
        state.print("04_train_dpo: " + json.dumps(args, default=str))
        with config.main_process_first(local=False, desc="work folder"):  # the main process decides, then the others
            checkpoint = latest_checkpoint(work, st.main) if st.work(work, keep=args["keep_checkpoints"]) else None

        #### model and tokenizer: pi_t is the policy and, frozen, the reference
        tokenizer, policy, reference = load_models(args, online_reference=not config.precompute_ref_log_probs)

        #### dataset: the pairs as TRL conversational rows, with the reference log-probs they supply
        state.print(example(train_rows, args["pairs"], args["seed"]))
        with config.main_process_first(local=False, desc="datasets"):  # written by the main process, then read
            train_dataset, eval_dataset = (to_dataset(split, args["reuse_ref_logps"], f"{work}/data/{name}", st.main)
                                           for name, split in (("train", train_rows), ("eval", eval_rows)))

        #### training: the DPO loss above, on TRL's DPOTrainer
        t0 = time.time()
        trainer = dice_dpo_trainer()(model=policy, ref_model=reference, args=config, train_dataset=train_dataset,
                                     eval_dataset=eval_dataset, processing_class=tokenizer)
        st.record.update(preparation(trainer, len(rows), len(train_rows), len(eval_rows)),
                         prepare_seconds=round(time.time() - t0, 3))
        state.print(f"resuming from {checkpoint}" if checkpoint else f"starting at step 0 (checkpoints in {work})")
        state.print(" ".join(f"{k}: {json.dumps(v)}" for k, v in st.record.items()))
        result = trainer.train(resume_from_checkpoint=checkpoint)

        #### save: the complete model folder, which the stage publishes as --out
        save_model_folder(trainer, st.tmp)
        st.record.update(bf16=config.bf16, resumed_from=checkpoint, processes=state.num_processes,
                         global_step=trainer.state.global_step, train_runtime=result.metrics.get("train_runtime"),
                         train_loss=result.metrics.get("train_loss"))
    state.print(summary(st.out, st.record, trainer.state.log_history))


if __name__ == "__main__":
    common.cli(main)
