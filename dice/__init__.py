"""What every DICE stage script does the same way; nothing here is the paper's method (that is in 01-04).

    cli             the command line: flags checked against main's signature before any work, --help, fire
    protocol        the stage protocol: done already / refused / locked / resumed / atomic publish, done markers
    data            reading inputs in every shape users hold (JSONL with file:line errors, datasets for the rest)
    models          loading models and tokenizers safely (safetensors only, no remote code unless asked)
    trl_internals   every use of TRL's private internals, each checked against the pinned TRL version
    engines         01's samplers (transformers and vLLM) with per-sample seeds
    partial         01's partial output, which a killed run resumes
    scoring         02's TRL-exact tokenization, batching and multi-process scoring
    pairs_io        03's inputs read and checked, its table of prompts x K, its output rows, stats and summary
    plots           03's and the report's figures
    publish         04's model folder: model card (model_card.md), loss plot, metrics, hub upload
    report_text     tools/report.py's tables and sections
    trackers        tools/report.py's figures sent to experiment trackers (--report_to)
"""


class DiceError(Exception):
    """A problem with the user's input or environment: printed as one line, exit status 2, no traceback."""
