"""Merging LoRA adapters into a checkpoint: `python -m qtune.merge adapter=DIR out=DIR`
(`qtune.merge_adapter` does it for a model in memory).

The command streams the base checkpoint tensor by tensor (one weight on the device at a time),
adds each adapter's scaled B @ A and writes a standard Hugging Face model (safetensors shards,
config, tokenizer, generation config) that plain transformers loads without qtune; or, with
`quantize=nf4|fp4`, a qtune 4-bit checkpoint. `merge_onto=original` adds the adapter to the
original weights (the usual choice: the best the merged model can be); `merge_onto=dequantized`
adds it to the NF4-decoded weights the adapter was trained against (reproduces the adapter model's
outputs up to rounding).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch
from torch import nn

from .atomic import atomic_dir
from .cli import fail, parse

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHARD_BYTES = 2 * 2**30


class MergeError(ValueError):
    """A bad merge input: one line."""


def _adapter(adapter_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise MergeError(f"adapter dir {adapter_dir} has no adapter_config.json (not a peft adapter)")
    cfg = json.load(open(cfg_path))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"adapter {adapter_dir} is {cfg['peft_type']}; qtune.merge merges LoRA adapters")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise MergeError(f"adapter {adapter_dir} uses rank_pattern/alpha_pattern, which qtune.merge does not support")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise MergeError(f"adapter dir {adapter_dir} has no adapter_model.safetensors")
    return cfg, load_file(weights)


def _base_files(base: str) -> list[str]:
    index = os.path.join(base, "model.safetensors.index.json")
    if os.path.isfile(index):
        return sorted({os.path.join(base, f) for f in json.load(open(index))["weight_map"].values()})
    single = os.path.join(base, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise MergeError(f"base model {base} has no safetensors weights (model.safetensors or its index)")


def _quant_settings(adapter_dir: str) -> dict:
    """The quantization the adapter was trained against (qtune_config.yaml beside it)."""
    path = os.path.join(adapter_dir, "qtune_config.yaml")
    q = {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "dtype": "bfloat16"}
    if os.path.isfile(path):
        from omegaconf import OmegaConf

        run = OmegaConf.to_container(OmegaConf.load(path))
        q.update({k: run["quant"][k] for k in ("quant_type", "double_quant", "blocksize")})
        q["dtype"] = run["model"]["dtype"]
    else:
        print(f"warning: {path} not found; assuming NF4, double quant, blocksize 64, bf16", file=sys.stderr)
    return q


def merge_checkpoint(adapter: str, out: str, base: str | None = None, dtype: str = "bf16",
                     merge_onto: str = "original", quantize: str = "none", overwrite: bool = False,
                     device: str | None = None) -> dict:
    """Write the merged model to `out` (atomically); returns a report (tensors, peak memory)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .hf import QuantConfig
    from .hf.config import parse_dtype
    from .quant import dequantize_4bit, quantize_4bit
    from .quant.codes import FLOAT_DTYPES

    if dtype not in DTYPES:
        raise MergeError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    if merge_onto not in ("original", "dequantized"):
        raise MergeError(f"merge_onto={merge_onto!r} is not supported; allowed: original, dequantized")
    if quantize not in ("none", "nf4", "fp4"):
        raise MergeError(f"quantize={quantize!r} is not supported; allowed: nf4, fp4, none")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise MergeError(f"output dir {out} exists and is not empty; pass overwrite=true to replace it")
    acfg, aweights = _adapter(adapter)
    base = base or acfg.get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        from huggingface_hub import snapshot_download

        base = snapshot_download(base) if base else None
        if not base:
            raise MergeError("the adapter names no base model; pass base=PATH")
    config = AutoConfig.from_pretrained(base)
    if getattr(config, "quantization_config", None):
        raise MergeError(f"base model {base} is a quantized checkpoint; merging needs the original weights (base=...)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    out_dtype = DTYPES[dtype]
    q = _quant_settings(adapter) if merge_onto == "dequantized" else None
    trained_dtype = parse_dtype(q["dtype"], "model.dtype", FLOAT_DTYPES) if q else None  # what was quantized
    scale = acfg["lora_alpha"] / (acfg["r"] ** 0.5 if acfg.get("use_rslora") else acfg["r"])
    lora = {}  # module name -> {"A": ..., "B": ...}
    saved = {}  # modules_to_save: full weights
    for key, t in aweights.items():
        name = key.removeprefix("base_model.model.")
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if name.endswith(suffix):
                lora.setdefault(name[: -len(suffix)], {})[part] = t
                break
        else:
            saved[name] = t
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linear = {n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)}
    out_emb = skeleton.get_output_embeddings()
    skip = {n for n, m in skeleton.named_modules() if m is out_emb}
    del skeleton
    qcfg = QuantConfig(quant_type=quantize, double_quant=True, compute_dtype=out_dtype) if quantize != "none" else None

    t0, shard, shard_bytes, weight_map, files, merged, largest = time.time(), {}, 0, {}, [], 0, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update({k: fname for k in shard})
            shard, shard_bytes = {}, 0

    def merged_weight(key: str, w: torch.Tensor) -> torch.Tensor:
        module = key.removesuffix(".weight")
        if module in saved:
            return saved.pop(module)
        if key in saved:
            return saved.pop(key)
        if module not in lora or not key.endswith(".weight"):
            return w
        pair = lora.pop(module)
        a, b = pair["A"].to(dev, torch.float32), pair["B"].to(dev, torch.float32)
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise MergeError(f"adapter's {module} is {b.shape[0]}x{a.shape[1]}; the base weight is "
                             f"{tuple(w.shape)}: the adapter belongs to another model")
        w = w.to(dev)
        if q is not None:  # what the adapter saw: the base weight through NF4
            packed, state = quantize_4bit(w.to(trained_dtype), q["blocksize"], q["quant_type"],
                                          q["double_quant"], name=key)
            w = dequantize_4bit(packed, state, torch.float32)
        return w.float() + scale * (b @ a)

    def write(key: str, w: torch.Tensor) -> None:
        nonlocal shard_bytes
        module = key.removesuffix(".weight")
        if qcfg is not None and key.endswith(".weight") and module in linear and module not in skip:
            packed, state = quantize_4bit(w.to(dev, out_dtype), 64, quantize, True, name=key)
            tensors = {key: packed, **{f"{key}.{k}": v for k, v in state.to_dict().items()}}
        else:
            tensors = {key: w.to(out_dtype) if w.is_floating_point() else w}
        for k, v in tensors.items():
            shard[k] = v.detach().to("cpu").contiguous()
            shard_bytes += v.numel() * v.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()

    with atomic_dir(out) as tmp:
        for path in _base_files(base):
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    w = f.get_tensor(key)
                    largest = max(largest, w.numel() * 4)
                    new = merged_weight(key, w)
                    merged += new is not w
                    write(key, new)
        flush()
        if lora or saved:
            raise MergeError(f"adapter modules not found in the base model {base}: {sorted(lora) + sorted(saved)}")
        index = {"metadata": {"total_size": sum(os.path.getsize(os.path.join(tmp, f)) for f in files)},
                 "weight_map": weight_map}
        json.dump(index, open(os.path.join(tmp, "model.safetensors.index.json"), "w"), indent=2)
        config.dtype = out_dtype
        if qcfg is not None:
            config.quantization_config = qcfg.to_dict()
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        gen = os.path.join(base, "generation_config.json")
        if os.path.isfile(gen):
            shutil.copy(gen, tmp)
    report = {"out": out, "merged_modules": int(merged), "shards": len(files), "seconds": time.time() - t0,
              "largest_tensor_mib": largest / 2**20}
    if dev.type == "cuda":
        report["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv, {
        "adapter": (str, ...), "out": (str, ...), "base": (str, None), "dtype": (str, "bf16"),
        "merge_onto": (str, "original"), "quantize": (str, "none"), "overwrite": (bool, False),
        "device": (str, None)}, "qtune.merge")
    try:
        report = merge_checkpoint(**args)
    except (MergeError, ValueError, FileNotFoundError, OSError) as e:
        fail(str(e).splitlines()[0])
    peak = f", peak GPU memory {report['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in report else ""
    print(f"merged {report['merged_modules']} modules into {report['out']} ({report['shards']} shard(s), "
          f"{report['seconds']:.1f} s; largest tensor {report['largest_tensor_mib']:.0f} MiB{peak})")


if __name__ == "__main__":
    main()
