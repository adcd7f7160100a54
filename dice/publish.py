"""04's published model folder: what a trained pi_t is, on disk and on the hub.

The folder (--out, renamed into place by protocol.stage once complete) is a standard HF model folder that
transformers and vLLM load as is:
  model (safetensors), config, generation config, tokenizer with its chat template (chat_template.jinja);
  README.md         the model card (huggingface_hub's ModelCard from dice/model_card.md): base model, round, data and
                    counts, DPO settings, held-out reward accuracy, how to load it, citations;
  trainer_state.json, metrics.jsonl (the trainer's log history, one entry a line);
  loss.png          train/eval loss, reward accuracy and reward margin against the step;
  training_args.json every DPOConfig field (no pickled training_args.bin);
  runs/             with --report_to tensorboard: TensorBoard's event files, copied from OUT.work/runs/ (not when
                    TENSORBOARD_LOGGING_DIR sends them elsewhere).
--push_to_hub uploads that folder with huggingface_hub's upload_folder once it is in place, and again on a rerun
that is "done already" (a retry after a failed upload). The Trainer itself never pushes: OUT.work/ holds checkpoints.
"""
import collections
import contextlib
import json
import os
import shutil

from dice import DiceError, protocol

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_card.md")


def save_model_folder(trainer, folder, card):
    """The complete model folder in `folder`: what save_model writes (every process takes part: ZeRO-3 gathers the
    weights), then, on the main process, the records, the plot, the model card and TensorBoard's event files."""
    trainer.save_model(folder)
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    pickled = os.path.join(folder, "training_args.bin")
    if os.path.exists(pickled):
        os.remove(pickled)
    protocol.write_json(os.path.join(folder, "training_args.json"), trainer.args.to_dict())
    trainer.state.save_to_json(os.path.join(folder, "trainer_state.json"))
    protocol.write_jsonl(os.path.join(folder, "metrics.jsonl"), trainer.state.log_history)
    plot_metrics(trainer.state.log_history, os.path.join(folder, "loss.png"))
    with protocol.atomic_open(os.path.join(folder, "README.md")) as f:
        f.write(str(card) + "\n")  # jinja drops the template's last newline
    runs = os.path.join(trainer.args.output_dir, "runs")  # transformers' TensorBoard default: OUTPUT_DIR/runs/
    if os.path.isdir(runs):
        shutil.copytree(runs, os.path.join(folder, "runs"))


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


def is_local(path):
    return os.path.exists(os.path.expanduser(str(path)))


def model_card(args, trainer, record, rows):
    """The model card (huggingface_hub's ModelCard from the template dice/model_card.md): YAML metadata, then this
    run's facts (TRL's own card leaves out the round, the settings and the held-out accuracy)."""
    from huggingface_hub import ModelCard, ModelCardData

    config, counts, log = trainer.args, record["counts"], trainer.state.log_history
    model_id = args.hub_model_id if args.push_to_hub else args.out
    metadata = ModelCardData(base_model=None if is_local(args.model) else args.model,
                             datasets=None if is_local(args.pairs) else args.pairs, library_name="transformers",
                             pipeline_tag="text-generation", tags=["dice", "dpo", "trl"])
    sources = collections.Counter(r["source"] for r in rows if r["source"] is not None)
    evals = [e for e in log if "eval_rewards/accuracies" in e]
    evaluation = (f"Held-out reward accuracy {evals[-1]['eval_rewards/accuracies']:.4f} (the fraction of the "
                  f"{counts['eval']} held-out pairs whose implicit reward ranks chosen above rejected), eval loss "
                  f"{evals[-1]['eval_loss']:.4f}, at step {evals[-1]['step']}." if evals
                  else "None: no pairs were held out (--eval_size 0).")
    reference = record["reference_logps"]
    return ModelCard.from_template(
        metadata, template_path=TEMPLATE, name=model_id, model_id=model_id, start=args.model,
        round="not given" if args.round is None else args.round, pairs=args.pairs,
        split=f" (split `{args.split}`)" if args.split else "", pairs_read=counts["pairs"],
        sources=", ".join(f"{k} {v}" for k, v in sorted(sources.items())) or "no `source` column",
        train=counts["train"], eval=counts["eval"],
        dropped=counts["train_dropped_long_prompt"] + counts.get("eval_dropped_long_prompt", 0),
        truncated=counts["train_truncated"] + counts.get("eval_truncated", 0),
        prompt_format=f"the chat template `{args.chat_template}`" if args.chat_template
        else "the base model's own chat template",
        loss_type=",".join(config.loss_type) if isinstance(config.loss_type, list) else config.loss_type,
        beta=config.beta, learning_rate=config.learning_rate,
        lr_scheduler_type=getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type),
        warmup_steps=config.warmup_steps, global_step=trainer.state.global_step,
        global_batch=config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size,
        per_device=config.per_device_train_batch_size, accumulation=config.gradient_accumulation_steps,
        processes=config.world_size, max_length=config.max_length, precision="bf16" if config.bf16 else "fp32",
        seed=config.seed, evaluation=evaluation,
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
        if args.push_to_hub and main_process:
            upload_to_hub(args, args.out)
        raise


def upload_to_hub(args, folder):
    """Upload the published folder to --hub_model_id (created when missing) with huggingface_hub; a failure is one
    line (the folder stays published: rerun the same command to retry the upload)."""
    import huggingface_hub

    repo = args.hub_model_id
    try:
        huggingface_hub.create_repo(repo, private=args.hub_private_repo or None, exist_ok=True)
        huggingface_hub.upload_folder(repo_id=repo, folder_path=folder, repo_type="model",
                                      commit_message=f"04_train_dpo.py: {os.path.basename(folder)}"
                                      + ("" if args.round is None else f" (DICE round {args.round})"))
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
