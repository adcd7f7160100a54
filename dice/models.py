"""Loading models and tokenizers safely: safetensors only, no remote code unless --trust_remote_code, a one-line error
for a folder that is missing or incomplete and for a hub id that cannot be reached. A chat template file replaces the
tokenizer's own in every stage (and, through the tokenizer, in TRL's tokenization inside stage 4).

A hub model or dataset id may pin a revision, NAME@REVISION (a branch, tag or commit): `split_revision` is the one
parser (models, engines, data); `hub_revision` resolves it to the commit every done marker records (dice/protocol.py).
"""
import functools
import os
import re
import sys

from dice import DiceError
from dice.data import to_messages


def chat_prompt_ids(tokenizer, prompt):
    """Token ids of the prompt as TRL's DPOTrainer builds them for a conversational row:
    apply_chat_template(messages, add_generation_prompt=True, tokenize=True); no special tokens added again."""
    out = tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


# ----------------------------------------------------------------------------- hub ids and their revisions

DATA_FILES = (".jsonl", ".json", ".parquet")  # names that are files, never hub ids (dice/data.py reads them)


def is_hub_id(name):
    """`name` or `org/name` naming no path that exists (nor starting with . / ~, nor a data file name)."""
    name = str(name)
    return bool(name) and not (os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
                               or name.lower().endswith(DATA_FILES))


def split_revision(name):
    """NAME@REVISION -> (NAME, REVISION): a hub id pinned to a branch, tag or commit. Anything else -> (name, None):
    a hub id without '@' and every local path (a folder or file that exists stays one, '@' in its name or not)."""
    name = str(name)
    repo, at, revision = name.partition("@")
    if not at or os.path.exists(name) or name.lower().endswith(DATA_FILES) or not is_hub_id(repo):
        return name, None
    if not revision:
        raise DiceError(f"{name}: no revision after '@' (NAME@REVISION: a branch, tag or commit)")
    return repo, revision


def hub_revision(name, kind="model"):
    """The commit (40 hex digits) the hub id `name` (NAME or NAME@REVISION; kind "model" or "dataset") names now, or
    None for a local path and for an id without revision that neither the hub nor the cache knows (loading it then
    fails with its own error). A revision that cannot be resolved is a DiceError."""
    repo, revision = split_revision(name)
    return _resolve(repo, revision, kind) if is_hub_id(repo) else None


@functools.lru_cache(maxsize=None)  # once per process: a stage resolves, then fingerprints and records the same commit
def _resolve(repo, revision, kind):
    """A 40-hex revision is its own commit; else the hub's answer (HfApi().model_info / dataset_info), or offline
    (HF_HUB_OFFLINE=1) and without network the local HF cache: HF_HUB_CACHE/{kind}s--ORG--NAME/refs/REVISION."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RevisionNotFoundError

    why = "offline: HF_HUB_OFFLINE=1"
    if not constants.is_offline_mode():
        try:
            return getattr(HfApi(), f"{kind}_info")(repo, revision=revision).sha
        except RevisionNotFoundError:
            raise DiceError(f"{repo}@{revision}: the hub {kind} {repo} has no revision {revision!r}") from None
        except Exception as e:  # no network, no such repository, no access: the local cache may know it
            why = f"the hub: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    ref = os.path.join(constants.HF_HUB_CACHE, f"{kind}s--{repo.replace('/', '--')}", "refs", revision or "main")
    try:
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
    except OSError:
        commit = None
    if commit and re.fullmatch(r"[0-9a-f]{40}", commit):
        return commit
    if revision is None:
        return None
    raise DiceError(f"{repo}@{revision}: cannot resolve revision {revision!r} of the hub {kind} {repo} ({why}; not "
                    f"in the local HF cache {constants.HF_HUB_CACHE})")


# ----------------------------------------------------------------------------- models

def check_model_path(path):
    """A local folder must exist; a `name`, `org/name` or NAME@REVISION that is not a path is passed on as a hub id."""
    path = str(path)
    if os.path.isdir(path):
        return path
    if not is_hub_id(split_revision(path)[0]) or os.path.exists(path):
        raise DiceError(f"model not found: {path} is not a model folder")
    return path


def load_tokenizer(path, trust_remote_code=False, chat_template=None):
    """The tokenizer of a model; `chat_template` (a jinja file, as transformers' `chat_template`) replaces its own
    template, so every stage and TRL's tokenization inside stage 4 render prompts and responses with it."""
    from transformers import AutoTokenizer

    path = check_model_path(path)
    name, revision = split_revision(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise DiceError(f"cannot load tokenizer from {path}: {str(e).splitlines()[0]}") from None
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
        unknown = unknown_special_tokens(tokenizer, tokenizer.chat_template)
        if unknown and (chat_template, tuple(unknown)) not in _WARNED and int(os.environ.get("RANK", "0")) == 0:
            _WARNED.add((chat_template, tuple(unknown)))
            print(f"warning: {chat_template} names {', '.join(unknown)}, which the tokenizer of {path} does not know "
                  "as special tokens: they are tokenized as plain text", file=sys.stderr)
    return tokenizer


_WARNED = set()  # one warning per template and process, not one per tokenizer loaded


def read_chat_template(path):
    """The text of a jinja chat template file (a one-line error when it cannot be read or is not valid jinja)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DiceError(f"cannot read chat template {path}: {getattr(e, 'strerror', None) or e}") from None
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise DiceError(f"{path}:{e.lineno}: bad chat template ({e.message})") from None
    return text


def unknown_special_tokens(tokenizer, template):
    """Strings of the template that look like special tokens (<|...|>, <s>, </s>) but are not special to `tokenizer`."""
    import re

    special = set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    found = dict.fromkeys(re.findall(r"<\|[A-Za-z0-9_]+\|>|</?s>", template))
    return [t for t in found if t not in special]


def load_model(path, dtype="float32", trust_remote_code=False, device=None, attn_implementation=None):
    """A causal LM in eval mode; `attn_implementation` (e.g. "sdpa", "flash_attention_2") goes to from_pretrained
    only when given (else transformers' default)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = check_model_path(path)
    name, revision = split_revision(path)
    extra = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            use_safetensors=True, **extra)
    except (OSError, ValueError) as e:  # ValueError: e.g. an attn_implementation transformers does not know
        raise DiceError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    if device is not None:
        model.to(device)
    return model.eval()
