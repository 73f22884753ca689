"""`python -m qtune.generate model=PATH [adapter=DIR] [prompt=TEXT]`: text generation from a base
model quantized on load (with an optional LoRA adapter) or from a merged model. With a prompt it
streams one answer; without, it runs an interactive chat loop (the tokenizer's chat template, if it
has one). Sampling: temperature, top_p, top_k (temperature=0 is greedy)."""

from __future__ import annotations

import os
import sys

import torch

from .cli import fail, parse

QUANTIZE = ("nf4", "fp4", "none")


def load(model: str, adapter: str | None, quantize: str, dtype: str, device: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf import QuantConfig

    if quantize not in QUANTIZE:
        fail(f"quantize={quantize!r} is not supported; allowed: {', '.join(QUANTIZE)}")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"dtype": getattr(torch, dtype), "device_map": {"": dev}}
    if quantize != "none":
        kwargs["quantization_config"] = QuantConfig(quant_type=quantize, double_quant=True, compute_dtype=dtype)
    if adapter is not None and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        fail(f"adapter dir {adapter} has no adapter_config.json (not a peft adapter)")
    m = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter)
    tok = AutoTokenizer.from_pretrained(model)
    return m.eval(), tok


def generate(model, tok, text: str, chat: bool, max_new_tokens: int, temperature: float, top_p: float,
             top_k: int, stream: bool = True) -> str:
    """The completion of `text` (rendered with the chat template when `chat`), streamed to stdout."""
    from transformers import TextStreamer

    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        ids = tok(text, return_tensors="pt")
    ids = {k: v.to(model.device) for k, v in ids.items()}
    sample = temperature > 0
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=sample,
                         temperature=temperature if sample else None, top_p=top_p if sample else None,
                         top_k=top_k if sample else None, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                         streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    a = parse(sys.argv[1:] if argv is None else argv, {
        "model": (str, ...), "adapter": (str, None), "prompt": (str, None), "chat": (bool, True),
        "quantize": (str, "nf4"), "dtype": (str, "bfloat16"), "max_new_tokens": (int, 128),
        "temperature": (float, 0.7), "top_p": (float, 0.9), "top_k": (int, 50), "seed": (int, 0),
        "device": (str, None)}, "qtune.generate")
    if a["dtype"] not in ("float32", "float16", "bfloat16"):
        fail(f"dtype={a['dtype']!r} is not supported; allowed: float32, float16, bfloat16")
    torch.manual_seed(a["seed"])
    try:
        model, tok = load(a["model"], a["adapter"], a["quantize"], a["dtype"], a["device"])
    except (OSError, ValueError) as e:
        fail(str(e).splitlines()[0])
    chat = a["chat"] and tok.chat_template is not None
    gen = dict(chat=chat, max_new_tokens=a["max_new_tokens"], temperature=a["temperature"], top_p=a["top_p"],
               top_k=a["top_k"])
    if a["prompt"] is not None:
        generate(model, tok, a["prompt"], **gen)
        return
    print("qtune chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        generate(model, tok, line.rstrip("\n"), **gen)


if __name__ == "__main__":
    main()
