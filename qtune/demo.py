"""`python -m qtune.demo`: quantize a locally built tiny Llama to 4 bits and generate from it.

No GPU or network needed: the model is built from a LlamaConfig with a fixed seed, saved to a
temporary directory and loaded back, then its linear layers are replaced by qtune's Linear4bit.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn

from .nn import quantize_linears
from .quant import BLOCKSIZES, QUANT_TYPES


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (packed weights and quant states included)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def tiny_llama(path: str, seed: int = 0) -> nn.Module:
    """Build, save and reload a small random Llama (about 3M parameters)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qtune.demo", description=__doc__.splitlines()[0])
    p.add_argument("--quant-type", default="nf4", choices=QUANT_TYPES)
    p.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES)
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    p.add_argument("--max-new-tokens", type=int, default=12)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        model = tiny_llama(d)
    before = model_bytes(model)
    prompt = torch.tensor([[1, 17, 42, 7, 99, 256]])
    with torch.no_grad():
        ref_logits = model(prompt).logits
        ref_tokens = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)

    quantize_linears(model, quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant)
    after = model_bytes(model)
    print(model)
    with torch.no_grad():
        logits = model(prompt).logits
        tokens = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)

    rel = float((logits - ref_logits).norm() / ref_logits.norm())
    print(f"\nmemory (state dict): {before / 2**20:.2f} MiB fp32 -> {after / 2**20:.2f} MiB with "
          f"{args.quant_type}{' + double quant' if args.double_quant else ''} (lm_head and embeddings kept)")
    print(f"logits vs the fp32 model: relative error {rel:.4f}")
    print(f"greedy tokens, fp32 model: {ref_tokens[0, prompt.shape[1]:].tolist()}")
    print(f"greedy tokens, 4-bit model: {tokens[0, prompt.shape[1]:].tolist()}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
