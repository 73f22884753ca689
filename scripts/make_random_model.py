"""Save a randomly initialised causal LM of a real model's shape, with qtune's character tokenizer,
for benchmarks and GPU acceptance runs without downloading weights.

    python scripts/make_random_model.py --shape llama2-13b --out /tmp/llama2-13b-random [--layers 40]

The benchmarks share theirs through `cached_random_model` (under $QTUNE_CACHE/bench, built once).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qtune.hf.tiny import char_tokenizer

SHAPES = {
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                       num_hidden_layers=40, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000),
}


def build_random_model(out: str, shape: str = "llama2-13b", layers: int | None = None, dtype: str = "float16",
                       **overrides) -> str:
    """Save a random model of `shape` (config fields replaced by `overrides`, e.g. hidden_size) and the
    character tokenizer to `out`; returns `out`. Built on the GPU when there is one."""
    fields = dict(SHAPES[shape], **overrides)
    if layers:
        fields["num_hidden_layers"] = layers
    config = LlamaConfig(**fields, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    t0 = time.time()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size="5GB")
    char_tokenizer().save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {shape} ({config.num_hidden_layers} layers, {n / 1e9:.2f}B parameters) to {out} "
          f"in {time.time() - t0:.0f} s")
    return out


def cached_random_model(shape: str = "llama2-13b", layers: int | None = None, dtype: str = "bfloat16", tag: str = "",
                        out: str | None = None, **overrides) -> str:
    """The path of a random model of `shape`, built once if missing (into a temporary directory renamed
    into place) under $QTUNE_CACHE/bench, or at `out`: one copy per machine for all the benchmarks."""
    if out is None:
        root = os.path.join(os.environ.get("QTUNE_CACHE", os.path.expanduser("~/.cache/qtune")), "bench")
        out = os.path.join(root, f"{shape}-random-L{layers or SHAPES[shape]['num_hidden_layers']}-{dtype}{tag}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = f"{out}.tmp-{os.getpid()}"
        build_random_model(tmp, shape, layers, dtype, **overrides)
        os.replace(tmp, out)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-13b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the real model")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    a = ap.parse_args()
    build_random_model(a.out, a.shape, a.layers, a.dtype)


if __name__ == "__main__":
    main()
