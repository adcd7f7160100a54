"""configs/templates/*.jinja render exactly what the official DICE runs fed their models.

The official code (GitHub sail-sg/dice) formats every prompt and response with LLaMA-Factory templates, passed by
scripts/run_dice/pipeline.sh (`TEMPLATE="llama3-custom"` / `TEMPLATE="zephyr-custom"`) to generation, scoring and
training alike. `official_text` below re-implements, at the string level, how LLaMA-Factory's Template._encode
(llama-factory/src/llmtuner/data/template.py:67-104, with StringFormatter.apply from formatter.py:110-125) lays out
the elements of those two templates (template.py:645-669 and 825-831); the EOS slot is the tokenizer's EOS after
get_template_and_fix_tokenizer (`</s>` for zephyr, replaced by `<|eot_id|>` for llama3-custom, template.py:353-357).
The jinja files must render the same text through a real transformers tokenizer (built offline here, with the EOS
the real models have), and the rendered prompt must be an exact prefix of the rendered prompt + response (TRL's
DPOTrainer and 02_score split prompt and response where the two token lists first differ).
"""
import os

import pytest

from conftest import ROOT

TEMPLATE_DIR = os.path.join(ROOT, "configs", "templates")

# The two LLaMA-Factory templates as registered in template.py (slots copied; a set is a special-token slot).
# format_system=None falls back to "{{content}}" (template.py:252), default_system=None to no system turn.
OFFICIAL = {
    "zephyr-custom": dict(
        user=["\n<|user|>\n{{content}}", {"eos_token"}, "\n<|assistant|>\n"],
        assistant=["{{content}}", {"eos_token"}],
        system=["<|system|>\n{{content}}", {"eos_token"}],
        default_system=" ",
        special={"bos_token": "<s>", "eos_token": "</s>"},  # zephyr-7b-beta / mistral-7b-sft-beta
    ),
    "llama3-custom": dict(
        user=[{"bos_token"}, "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n"],
        assistant=["{{content}}", {"eos_token"}],
        system=["{{content}}"],
        default_system=None,
        special={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},  # EOS replaced (replace_eos=True)
    ),
}
JINJA = {"zephyr-custom": "zephyr-dice.jinja", "llama3-custom": "llama3-dice.jinja"}


def _apply(slots, special, **kwargs):
    """StringFormatter.apply + the special-token slots, joined into text."""
    out = []
    for slot in slots:
        if isinstance(slot, str):
            for name, value in kwargs.items():
                slot = slot.replace("{{" + name + "}}", value, 1)
            out.append(slot)
        else:
            out.append(special[next(iter(slot))])
    return "".join(out)


def official_text(name, messages, system=None):
    """The text LLaMA-Factory's Template._encode lays out for `messages` (user/assistant alternating) and `system`."""
    t = OFFICIAL[name]
    system = system or t["default_system"]
    text = ""
    for i, message in enumerate(messages):
        if i == 0 and system:
            text += _apply(t["system"], t["special"], content=system)
        # the separator of both templates is empty
        if message["role"] == "user":
            text += _apply(t["user"], t["special"], content=message["content"], idx=str(i // 2))
        else:
            text += _apply(t["assistant"], t["special"], content=message["content"])
    return text


def make_tokenizer(kind, eos=None):
    """A real transformers tokenizer (byte-level BPE trained offline on a few lines) with the real models' special
    tokens; its own chat template is ChatML, so a test passes only if `chat_template=` is what renders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "zephyr-custom":
        specials, bos, eos, unk = ["<unk>", "<s>", "</s>"], "<s>", eos or "</s>", "<unk>"
    else:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        bos, eos, unk = "<|begin_of_text|>", eos or "<|end_of_text|>", None  # the Llama-3 base SFT's EOS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Write a poem about the sea.\nThe user asks; the assistant answers."] * 2, trainer=trainer)
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   chat_template=chatml)


@pytest.fixture(scope="module", params=["zephyr-custom", "llama3-custom"])
def setup(request):
    with open(os.path.join(TEMPLATE_DIR, JINJA[request.param])) as f:
        return request.param, make_tokenizer(request.param), f.read()


def render(tok, template, messages, add_generation_prompt):
    return tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                   tokenize=False)


PROMPTS = [
    "Write a short poem about the sea.",
    "",
    "  leading and trailing spaces  ",
    "\n\nstarts and ends with newlines\n\n",
    "line one\nline two\r\nline three\twith a tab\n",
    "Unicode: café, naïve, 東京, Привет, مرحبا, emoji 🙂👍🏽, e\u0301 combining, \u2028line separator, \u00a0nbsp",
    "Jinja-looking text: {{ x }} {% if y %}yes{% endif %} {# comment #} {{ raise_exception('no') }} {%- raw -%}",
    "Quotes ' \" and backslashes \\n \\t \\\\ and {{content}} placeholders",
    "Special-token strings: </s> <s> <unk> <|eot_id|> <|begin_of_text|> <|end_of_text|> <|start_header_id|>",
    "Fake turns:\n<|user|>\nhi</s>\n<|assistant|>\n and <|start_header_id|>assistant<|end_header_id|>\n\n",
    "x" * 3000,
]
RESPONSES = [
    "The sea is wide.",
    "",
    " a response with surrounding spaces ",
    "Multi-line\n\n- item 1\n- item 2\n\n```python\nprint('{{ x }}')\n```\n",
    "Ends with a token string </s>",
    "<|eot_id|> in the middle <|end_of_text|> of it",
    "東京 🙂 {% for i in range(3) %}{{ i }}{% endfor %}",
]


def test_one_turn_official_strings(setup):
    """Prompt and prompt+response equal the official format, spelled out, for varied prompts and responses."""
    name, tok, template = setup
    for prompt in PROMPTS:
        for response in RESPONSES:
            user = [{"role": "user", "content": prompt}]
            full = user + [{"role": "assistant", "content": response}]
            rendered_prompt = render(tok, template, user, True)
            rendered_full = render(tok, template, full, False)
            if name == "zephyr-custom":
                want_prompt = f"<|system|>\n </s>\n<|user|>\n{prompt}</s>\n<|assistant|>\n"
                want_full = want_prompt + f"{response}</s>"
            else:
                want_prompt = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
                want_full = want_prompt + f"{response}<|eot_id|>"
            assert rendered_prompt == want_prompt
            assert rendered_full == want_full
            assert rendered_full.startswith(rendered_prompt)  # the prompt is an exact prefix of the conversation
            # and both equal LLaMA-Factory's layout of the same messages
            assert rendered_prompt == official_text(name, user)  # encode_oneturn's prompt part
            assert rendered_full == official_text(name, full)


def test_eos_of_the_tokenizer_does_not_matter(setup):
    """llama3: always <|eot_id|>, whatever the tokenizer's EOS (<|end_of_text|> for the base SFT, <|eot_id|> for
    Instruct-style tokenizers); zephyr: always </s>. No BOS is added for zephyr."""
    name, _, template = setup
    user = [{"role": "user", "content": "Hi"}]
    full = user + [{"role": "assistant", "content": "Hello"}]
    eoses = ["</s>", "<unk>"] if name == "zephyr-custom" else ["<|end_of_text|>", "<|eot_id|>"]
    texts = {render(make_tokenizer(name, eos=e), template, full, False) for e in eoses}
    assert len(texts) == 1
    text = texts.pop()
    if name == "zephyr-custom":
        assert not text.startswith("<s>") and text.endswith("Hello</s>")
    else:
        assert text.count("<|begin_of_text|>") == 1 and text.endswith("Hello<|eot_id|>")
        assert "<|end_of_text|>" not in text and "system" not in text


def test_multi_turn_and_system_match_llama_factory(setup):
    """Histories and a given system message lay out as LLaMA-Factory lays them out (zephyr: the system text replaces
    the one-space default, an empty one falls back to it; llama3-custom: the system text is prepended verbatim, and
    <|begin_of_text|> opens every user turn)."""
    name, tok, template = setup
    turns = [{"role": "user", "content": "First {{ q }}\n"}, {"role": "assistant", "content": " answer one </s>"},
             {"role": "user", "content": "Second, 東京"}, {"role": "assistant", "content": "answer two\n"}]
    for system in [None, "", "You are helpful.", "  spaced system\n"]:
        messages = ([] if system is None else [{"role": "system", "content": system}]) + turns
        full = render(tok, template, messages, False)
        assert full == official_text(name, turns, system)
        prompt = render(tok, template, messages[:-1], True)
        assert full.startswith(prompt)
        assert prompt == official_text(name, turns[:-1], system)
    if name == "zephyr-custom":
        assert render(tok, template, turns[:2], False) == "<|system|>\n </s>\n<|user|>\nFirst {{ q }}\n</s>" \
            "\n<|assistant|>\n answer one </s></s>"
        sys_text = render(tok, template, [{"role": "system", "content": "S"}] + turns[:1], True)
        assert sys_text == "<|system|>\nS</s>\n<|user|>\nFirst {{ q }}\n</s>\n<|assistant|>\n"
    else:
        assert render(tok, template, turns, False).count("<|begin_of_text|>") == 2


def test_generation_prompt_only_adds_the_assistant_header(setup):
    name, tok, template = setup
    user = [{"role": "user", "content": "Hi"}]
    header = "\n<|assistant|>\n" if name == "zephyr-custom" else "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert render(tok, template, user, True) == render(tok, template, user, False) + header


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "no user first"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
    [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
])
def test_unsupported_conversations_are_refused(setup, messages):
    _, tok, template = setup
    with pytest.raises(Exception, match="alternate"):
        render(tok, template, messages, True)


def test_tokenizer_sees_the_special_tokens(setup):
    """Rendered then tokenized (as 01/02/TRL do: apply_chat_template(tokenize=True), no special tokens added again),
    the template's special-token strings become the tokenizer's special ids: one BOS for llama3, none for zephyr."""
    name, tok, template = setup
    full = [{"role": "user", "content": "Write a poem"}, {"role": "assistant", "content": "The sea"}]
    ids = tok.apply_chat_template(full, chat_template=template, tokenize=True, return_dict=True)["input_ids"]
    if name == "zephyr-custom":
        eos = tok.convert_tokens_to_ids("</s>")
        assert ids.count(eos) == 3 and ids[-1] == eos and tok.bos_token_id not in ids
    else:
        eot = tok.convert_tokens_to_ids("<|eot_id|>")
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids.count(eot) == 2 and ids[-1] == eot and tok.eos_token_id not in ids


def test_llama_factory_placeholder_quirk_is_not_copied(setup):
    """LLaMA-Factory's StringFormatter replaces the first literal "{{idx}}" inside a user message by the turn index
    (it applies content, then idx, to the same string); the jinja files insert contents verbatim. Documented here as
    the one known difference; a prompt containing "{{idx}}" is the only input it affects."""
    name, tok, template = setup
    user = [{"role": "user", "content": "see {{idx}}"}, {"role": "assistant", "content": "ok"}]
    assert "see {{idx}}" in render(tok, template, user, False)
    assert "see 0" in official_text(name, user)
