"""Loading models and tokenizers safely: safetensors only, no remote code unless --trust_remote_code, a one-line error
for a folder that is missing or incomplete and for a hub id that cannot be reached. A chat template file replaces the
tokenizer's own in every stage (and, through the tokenizer, in TRL's tokenization inside stage 4)."""
import os
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


# ----------------------------------------------------------------------------- models

def check_model_path(path):
    """A local folder must exist; a bare `name` or `org/name` that is not a folder is passed on as a hub id."""
    path = str(path)
    if os.path.isdir(path):
        return path
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path):
        raise DiceError(f"model not found: {path} is not a model folder")
    return path


def load_tokenizer(path, trust_remote_code=False, chat_template=None):
    """The tokenizer of a model; `chat_template` (a jinja file, as transformers' `chat_template`) replaces its own
    template, so every stage and TRL's tokenization inside stage 4 render prompts and responses with it."""
    from transformers import AutoTokenizer

    path = check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
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


def load_model(path, dtype="float32", trust_remote_code=False, device=None):
    import torch
    from transformers import AutoModelForCausalLM

    path = check_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as e:
        raise DiceError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    if device is not None:
        model.to(device)
    return model.eval()
