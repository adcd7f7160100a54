"""Stage 4 of DICE: DPO on round t's pairs from pi_{t-1}, frozen as the reference: pi_{t-1} -> pi_t.

Round t minimizes the DPO loss (Rafailov et al. 2023, Eq. 7; Chen et al. 2025, Sec. 3) over its pairs (x, y_w, y_l):

    L(theta) = -E log sigmoid( beta * [log pi_theta(y_w|x) - log pi_ref(y_w|x)]
                             - beta * [log pi_theta(y_l|x) - log pi_ref(y_l|x)] ),    pi_ref = pi_{t-1},

log pi(y|x) the sum of the response's token log-probs as TRL 1.16's DPOTrainer computes it for chat rows (round 0: the
same step from the SFT model on offline pairs). The paper's settings (sail-sg/dice pipeline.sh) are the defaults: beta
0.1, lr 5e-7, 300 steps x 32 pairs (1 x 4 accumulation x 8 GPUs), bf16, max length 4096, 576 held-out pairs; its
`--warmup_steps 50` has no effect with transformers' `constant` schedule (flat from step 1): 0 here, and refused.
Reference log-probs are reused: 03's pairs carry ref_chosen_logps/ref_rejected_logps, which 02 computed with pi_{t-1},
so no reference model is loaded (rows without them, or truncated by --max_length, get TRL's precompute with --model).
The pairs' done marker names the policy that scored them: any other --model is refused (--reuse_ref_logps False
recomputes every value with --model). Files: README "Files"; the published model folder: dice/publish.py.

Smoke (CPU, seconds; a tiny model from `python tools/tiny_model.py --out /tmp/tiny --seed 0`):
    python 04_train_dpo.py --model /tmp/tiny --pairs data/demo/preferences.jsonl --out /tmp/tiny_dpo --max_steps 2 \\
        --eval_size 4 --eval_steps 1 --logging_steps 1
Full (round 1 of runs/llama3, pi_0 -> pi_1; one 8-GPU node, DeepSpeed ZeRO-3):
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml 04_train_dpo.py \\
        --model runs/llama3/round_0/model --pairs runs/llama3/round_1/pairs/pairs.jsonl \\
        --out runs/llama3/round_1/model --round 1
"""
import json
import math
import os
import random
import time
from typing import Literal

from dice import DiceError, cli, data, models, protocol, publish, trl_internals

REF_COLUMNS = trl_internals.REF_COLUMNS
IGNORED = ("keep_checkpoints", "push_to_hub", "hub_model_id", "hub_private_repo")  # where OUT goes, not what it is


def read_pairs(source, split):
    """The pairs D_t in any shape (data.read_rows, data.read_pair) as TRL conversational rows, with the supplied
    reference log-probs (or None), the row's `source` (generated/offline, or None) and where it was read."""
    rows = []
    for where, row in data.read_rows(source, split):
        pair, ref = data.read_pair(row, where), [row.get(key) for key in REF_COLUMNS]
        for key, value in zip(REF_COLUMNS, ref):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value > 1e-3):
                raise DiceError(f"{where}: {key} must be a log-probability (a finite number <= 0) or null, "
                                f"got {value!r}")
        ref = [None, None] if None in ref else [float(v) for v in ref]  # one value without the other is unusable
        rows.append({"prompt": data.to_messages(pair["prompt"], where),
                     "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                     "rejected": [{"role": "assistant", "content": pair["rejected"]}],
                     **dict(zip(REF_COLUMNS, ref)), "source": row.get("source"), "where": where})
    if not rows:
        raise DiceError(f"{source}: no pairs (it is empty)")
    return rows


def check_reference(pairs, model):
    """pi_ref = pi_{t-1}: the reference log-probs the pairs carry are those of the policy 02 scored them with, named
    by 03 in their done marker. Pairs without one, or edited since (the marker no longer matches): a user's file."""
    marker = protocol.finished_marker(pairs)
    if marker is None:
        return
    mine = protocol.fingerprint(model)
    for policy in (marker.get("reference_logps_policy") or {}).values():
        if policy and policy.get("fingerprint") != mine:
            raise DiceError(f"{pairs} carries the reference log-probs of {policy.get('path')}, but --model {model} "
                            "is another model (DPO's reference must be the model trained): train from that model, or "
                            "pass --reuse_ref_logps False to recompute the reference log-probs with --model")


def split_eval(rows, eval_size, seed):
    """(train, eval): a seeded random `eval_size` rows held out; both keep the file's order."""
    if eval_size >= len(rows):
        raise DiceError(f"--eval_size {eval_size} leaves no training pairs: the pairs file has {len(rows)} "
                        "(pass a smaller --eval_size; 0 = no evaluation)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:eval_size])
    return [r for i, r in enumerate(rows) if i not in held_out], [r for i, r in enumerate(rows) if i in held_out]


def check(args):
    """The rules between flags, and the extra DPOConfig options typed (dpo_options): before any work."""
    extra = trl_internals.dpo_options(args.options) if args.options else {}
    if args.push_to_hub and not args.hub_model_id:
        raise DiceError("--push_to_hub needs --hub_model_id USER/NAME (the hub repo the published folder goes to)")
    if args.lr_scheduler_type == "constant" and args.warmup_steps:
        raise DiceError("--warmup_steps has no effect with --lr_scheduler_type constant (transformers ignores warmup "
                        "for it, as in the paper's runs): pass --warmup_steps 0, or --lr_scheduler_type "
                        "constant_with_warmup")
    models.check_model_path(args.model)
    if args.chat_template:
        models.read_chat_template(args.chat_template)  # a missing or broken file fails here, before any work
    args.split = data.split_of(args.pairs, args.split)
    return extra


def main(model: str, pairs: str, out: str, split: str = "train", chat_template: str = None, round: int = None,
         beta: float = 0.1, learning_rate: float = 5e-7, lr_scheduler_type: str = "constant", warmup_steps: int = 0,
         max_steps: int = 300, per_device_train_batch_size: int = 1, gradient_accumulation_steps: int = 4,
         max_length: int = 4096, eval_size: int = 576, eval_steps: int = 20, logging_steps: int = 20,
         save_steps: int = 100, save_total_limit: int = 1, bf16: bool | Literal["auto"] = "auto",
         attn_implementation: str | None = None, seed: int = 42,
         reuse_ref_logps: bool = True, overwrite: bool = False, keep_checkpoints: bool = False,
         trust_remote_code: bool = False, push_to_hub: bool = False, hub_model_id: str = None,
         hub_private_repo: bool = False, **options):
    """Train pi_t from pi_{t-1} on round t's pairs with the DPO loss, pi_{t-1} frozen as the reference (DPO Eq. 7).

    Args:
        model: pi_{t-1}, the starting policy and DPO reference: an HF model folder (or hub id).
        pairs: round t's pairs (.jsonl/.json/.parquet, dataset folder or hub id): strings or TRL's chat format.
        out: the output pi_t, an HF model folder published when complete; checkpoints go to OUT.work/.
        split: the split of a dataset folder or hub dataset id given to --pairs.
        chat_template: jinja chat template file instead of the model's own (configs/templates); saved into OUT.
        round: the DICE round t (0 = DPO from the SFT model), for the model card (>= 0)
        beta: DPO beta (paper 0.1) (>= 0)
        learning_rate: learning rate (paper 5e-7) (>= 0)
        lr_scheduler_type: transformers scheduler name; constant = the paper's flat rate from step 1.
        warmup_steps: linear warmup steps (0: the paper's `constant` schedule ignored its --warmup_steps 50) (>= 0)
        max_steps: optimizer steps (paper 300) (>= 1)
        per_device_train_batch_size: pairs per device per micro-batch (paper 1) (>= 1)
        gradient_accumulation_steps: micro-batches per step (paper 4; x 8 GPUs = 32 pairs a step) (>= 1)
        max_length: tokens of prompt + response; longer pairs truncated, prompts this long dropped (TRL) (>= 2)
        eval_size: pairs held out (seeded), evaluated every --eval_steps (paper 576; 0 = none) (>= 0)
        eval_steps: evaluate every N steps (paper 20) (>= 1)
        logging_steps: log metrics every N steps (paper 20; the first step is always logged) (>= 1)
        save_steps: checkpoint into OUT.work/ every N steps (paper 100); a rerun resumes from the last one (>= 1)
        save_total_limit: checkpoints kept in OUT.work/ (paper 1) (>= 1)
        bf16: auto = the launcher's mixed_precision under DeepSpeed, else bf16 on a CUDA GPU that supports it,
            fp32 elsewhere; or true/false.
        attn_implementation: the model's attention: eager, sdpa, flash_attention_2... (default: transformers')
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
    args = cli.flags(main, locals())
    extra = check(args)

    #### pairs: TRL chat rows with the reference log-probs 02 computed with pi_{t-1}; a seeded held-out set
    rows = read_pairs(args.pairs, args.split)
    if args.reuse_ref_logps and any(r[REF_COLUMNS[0]] is not None for r in rows):
        check_reference(args.pairs, args.model)
        if extra.get("precompute_ref_log_probs") is False:
            raise DiceError(f"{args.pairs} has reference log-probs and --reuse_ref_logps is on, which needs "
                            "precompute_ref_log_probs; pass --reuse_ref_logps=False to run a reference model at "
                            "every step instead")
    train_rows, eval_rows = split_eval(rows, args.eval_size, args.seed)
    main_process = os.environ.get("RANK", "0") == "0"  # the launcher's rank: known without importing torch
    inputs = {"model": args.model, "pairs": args.pairs, "chat_template": args.chat_template}
    with (publish.push_when_done_already(args, main_process),
          protocol.stage("04_train_dpo", args.out, vars(args), inputs=inputs, overwrite=args.overwrite, seed=args.seed,
                         ignore=IGNORED, main_process=main_process) as st,
          trl_internals.work_folder(st) as work):  # OUT.work/: checkpoints, resumed by a rerun
        #### DPOConfig: the settings above, then any other field given (made first: ZeRO-3 shards the model as it loads)
        config = trl_internals.dpo_config(
            extra, output_dir=work, beta=args.beta, learning_rate=args.learning_rate,
            lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
            per_device_train_batch_size=args.per_device_train_batch_size, per_device_eval_batch_size=1,
            gradient_accumulation_steps=args.gradient_accumulation_steps, max_length=args.max_length,
            eval_strategy="steps" if eval_rows else "no", eval_steps=args.eval_steps, logging_steps=args.logging_steps,
            logging_first_step=True, save_strategy="steps", save_steps=args.save_steps,
            save_total_limit=args.save_total_limit, bf16=args.bf16, seed=args.seed, precompute_ref_log_probs=True,
            trust_remote_code=args.trust_remote_code, report_to="none")
        state = config.distributed_state  # accelerate's PartialState of this run, set up by DPOConfig
        state.print("04_train_dpo: " + json.dumps(vars(args), default=str))
        with config.main_process_first(local=False, desc="work folder"):  # the main process decides first
            resume = st.work(work, keep=args.keep_checkpoints)
            checkpoint = trl_internals.latest_checkpoint(work, st.main) if resume else None

        #### model and tokenizer: pi_{t-1}, the policy and (frozen) the reference
        tokenizer = models.load_tokenizer(args.model, args.trust_remote_code, chat_template=args.chat_template)
        if not tokenizer.chat_template:
            raise DiceError(f"{args.model}: the tokenizer has no chat template (pairs are trained as chat turns, as "
                            "TRL does); pass --chat_template FILE")
        load = dict(trust_remote_code=args.trust_remote_code, attn_implementation=args.attn_implementation)
        policy = models.load_model(args.model, **load)
        reference = None if config.precompute_ref_log_probs else models.load_model(  # TRL's per-step reference
            args.model, **load)

        #### trainer: the loss above on TRL's DPOTrainer, fed the reference log-probs the pairs carry
        example = random.Random(args.seed).choice(train_rows)
        state.print(f"example pair ({example['where']}):\n" + "\n".join(
            f"  {key}: {example[key][-1]['content'][:200]!r}" for key in ("prompt", "chosen", "rejected")))
        with config.main_process_first(local=False, desc="datasets"):  # written by the main process, then read
            train_dataset = trl_internals.to_dataset(train_rows, args.reuse_ref_logps, f"{work}/data/train", st.main)
            eval_dataset = trl_internals.to_dataset(eval_rows, args.reuse_ref_logps, f"{work}/data/eval", st.main)
        started = time.time()
        trainer = trl_internals.dice_dpo_trainer()(
            model=policy, ref_model=reference, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=tokenizer)
        st.record.update(trl_internals.preparation(trainer, len(rows), len(train_rows), len(eval_rows), started))
        state.print(f"resuming from {checkpoint}" if checkpoint else f"starting at step 0 (checkpoints in {work})")
        state.print(" ".join(f"{k}: {json.dumps(v)}" for k, v in st.record.items()))

        #### train: pi_{t-1} -> pi_t
        result = trainer.train(resume_from_checkpoint=checkpoint)

        #### save: the complete model folder with its model card, which the stage publishes as --out
        st.record.update(bf16=config.bf16, resumed_from=checkpoint, processes=state.num_processes,
                         global_step=trainer.state.global_step, train_runtime=result.metrics.get("train_runtime"),
                         train_loss=result.metrics.get("train_loss"))
        publish.save_model_folder(trainer, st.tmp, publish.model_card(args, trainer, st.record, rows))
    state.print(publish.summary(st.out, st.record, trainer.state.log_history))
    if args.push_to_hub and main_process:
        publish.upload_to_hub(args, st.out)


if __name__ == "__main__":
    cli.run(main, extra_flags=trl_internals.dpo_config_fields)
