"""Build a tiny random causal LM with a ChatML tokenizer, entirely offline (no hub), for tests and configs/tiny.env.

    python tools/tiny_model.py --out /tmp/tiny_policy --seed 0

The tokenizer is a byte-level BPE trained here on a fixed English text (vocab ~400) with the specials
<|endoftext|> (pad), <|im_start|> and <|im_end|> (end of turn = EOS), and a ChatML chat template like SmolLM2's.
The model is a 2-layer Llama (hidden 64). The same seed gives the same weights; the tokenizer never depends on it,
so differently-seeded copies share one tokenizer and serve as policy and reference.
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dice import cli  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """The quick brown fox jumps over the lazy dog. A language model assigns a probability to every sequence.
Direct preference optimization trains a policy from pairs of chosen and rejected responses without a reward model.
Write a short poem about the sea. Explain why the sky is blue. List three uses of a paperclip.
How do I bake bread at home? What is the capital of France? Paris is the capital of France.
Give me a recipe for pancakes: flour, milk, eggs, butter, sugar and a pinch of salt.
Summarize the following text in one sentence. Translate this sentence into Spanish. Hello, how are you today?
The implicit reward of a DPO model is beta times the log ratio of the policy and the reference probabilities.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / * + = < > # @ & %.
"""


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build(out, seed=0):
    """Save a tiny model + tokenizer to `out` (safetensors) and return `out`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so the two seeds disagree clearly
        model.model.embed_tokens.weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tmp = f"{out}.tmp.{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if os.path.exists(out):  # built meanwhile by another process: keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


def main(out: str, seed: int = 0):
    """Build a tiny random model with a ChatML tokenizer into --out and print the folder.

    Args:
        out: the model folder to write
        seed: seed of the weights (the tokenizer never depends on it) (>= 0)
    """
    args = cli.flags(main, locals())
    print(build(args.out, args.seed))


if __name__ == "__main__":
    cli.run(main)
