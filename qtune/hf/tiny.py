"""Tiny models and a character tokenizer built locally: the demo, the tiny recipe and the tests
use them instead of downloading anything."""

from __future__ import annotations

import os

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII and newline, with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newlines too
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def tiny_config(arch: str = "llama", vocab_size: int = 100, hidden: int = 128, layers: int = 2):
    """A small config of one of the architectures below, with dimensions that divide evenly."""
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=False, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             sliding_window=None, tie_word_embeddings=False, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=512, word_embed_proj_dim=hidden, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=False, **common)
    raise ValueError(f"arch {arch!r} is not one of: llama, mistral, opt, gpt_neox")


def build_tiny_model(path: str | os.PathLike, arch: str = "llama", *, seed: int = 0, dtype=torch.float32,
                     hidden: int = 128, layers: int = 2) -> str:
    """Save a randomly initialised tiny causal LM and the character tokenizer to `path`."""
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size=len(tokenizer), hidden=hidden, layers=layers)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
