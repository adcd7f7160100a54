"""04's published model folder (its files: README "Files"), its model card (dice/model_card.md) and its upload.

--push_to_hub uploads the folder with huggingface_hub's upload_folder once it is in place, and again on a rerun that is
"done already" (a retry after a failed upload). The Trainer itself never pushes: OUT.work/ holds checkpoints.
"""
import collections
import contextlib
import json
import os
import shutil

from dice import DiceError, models, plots, protocol

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_card.md")


def save_model_folder(trainer, folder, card):
    """The complete model folder in `folder`: what save_model writes (every process takes part: ZeRO-3 gathers the
    weights), then, on the main process, the records, the plot, the model card and TensorBoard's event files."""
    trainer.save_model(folder)
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, "training_args.bin"))  # pickled: training_args.json instead
    protocol.write_json(os.path.join(folder, "training_args.json"), trainer.args.to_dict())
    trainer.state.save_to_json(os.path.join(folder, "trainer_state.json"))
    protocol.write_jsonl(os.path.join(folder, "metrics.jsonl"), trainer.state.log_history)
    plots.loss_figure(trainer.state.log_history, os.path.join(folder, "loss.png"))
    with protocol.atomic_open(os.path.join(folder, "README.md")) as f:
        f.write(str(card) + "\n")  # jinja drops the template's last newline
    # transformers' TensorBoard default, OUTPUT_DIR/runs/ (none there when TENSORBOARD_LOGGING_DIR sends it elsewhere)
    runs = os.path.join(trainer.args.output_dir, "runs")
    if os.path.isdir(runs):
        shutil.copytree(runs, os.path.join(folder, "runs"))


def is_local(path):
    return os.path.exists(os.path.expanduser(str(path)))


def model_card(args, trainer, record, rows):
    """The model card (huggingface_hub's ModelCard from the template dice/model_card.md): YAML metadata, then this
    run's facts (TRL's own card leaves out the round, the settings and the held-out accuracy)."""
    from huggingface_hub import ModelCard, ModelCardData

    config, counts, log = trainer.args, record["counts"], trainer.state.log_history
    model_id = args.hub_model_id if args.push_to_hub else args.out
    hub_name = lambda path: None if is_local(path) else models.split_revision(path)[0]  # noqa: E731 (no @REVISION)
    metadata = ModelCardData(base_model=hub_name(args.model), datasets=hub_name(args.pairs),
                             library_name="transformers", pipeline_tag="text-generation", tags=["dice", "dpo", "trl"])
    sources = collections.Counter(r["source"] for r in rows if r["source"] is not None)
    evals = [e for e in log if "eval_rewards/accuracies" in e]
    evaluation = (f"Held-out reward accuracy {evals[-1]['eval_rewards/accuracies']:.4f} (the fraction of the "
                  f"{counts['eval']} held-out pairs whose implicit reward ranks chosen above rejected), eval loss "
                  f"{evals[-1]['eval_loss']:.4f}, at step {evals[-1]['step']}." if evals
                  else "None: no pairs were held out (--eval_size 0).")
    reference = record["reference_logps"]
    return ModelCard.from_template(
        metadata, template_path=TEMPLATE, model_id=model_id, args=args, counts=counts, config=config,
        round="not given" if args.round is None else args.round, split=f" (split `{args.split}`)" if args.split else "",
        sources=", ".join(f"{k} {v}" for k, v in sorted(sources.items())) or "no `source` column",
        dropped=counts["train_dropped_long_prompt"] + counts.get("eval_dropped_long_prompt", 0),
        truncated=counts["train_truncated"] + counts.get("eval_truncated", 0),
        prompt_format=f"the chat template `{args.chat_template}`" if args.chat_template
        else "the base model's own chat template",
        loss_type=",".join(config.loss_type), lr_scheduler_type=config.lr_scheduler_type.value,
        global_step=trainer.state.global_step, precision="bf16" if config.bf16 else "fp32",
        global_batch=config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size,
        evaluation=evaluation, reference=reference if isinstance(reference, str) else "; ".join(
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
    lines = [f"wrote {out} ({record['global_step']} steps, train_runtime {record['train_runtime']} s)",
             f"pairs: {json.dumps(record['counts'])}"]
    for prefix, title in (("", "last train log"), ("eval_", "last eval")):
        logged = [e for e in log_history if prefix + "loss" in e]
        if logged:
            lines.append(f"{title}: loss {logged[-1][prefix + 'loss']:.4f}, reward accuracy "
                         f"{logged[-1].get(prefix + 'rewards/accuracies')}")
    return "\n".join(lines)
