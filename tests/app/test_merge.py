"""Merging adapters (CLI and API) and generating: logits against the adapter model, a merged model
loaded without qtune, the tiny recipe end to end, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import qtune
from qtune.merge import MergeError, merge_checkpoint

QCFG = "quant:\n  quant_type: nf4\n  double_quant: true\n  blocksize: 64\nmodel:\n  dtype: float32\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base model and a LoRA adapter (random, non-zero) trained against its NF4 form."""
    from qtune.hf.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("merge")
    base = build_tiny_model(root / "base", "llama", hidden=128, layers=2)
    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu",
                                                 quantization_config=qtune.QuantConfig(double_quant=True))
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    peft_model.save_pretrained(root / "adapter")
    (root / "adapter" / "qtune_config.yaml").write_text(QCFG)
    return base, str(root / "adapter"), peft_model.eval()


def tokens():
    return torch.tensor([[1] + list(range(10, 40))])


def test_merged_logits_match_the_adapter_model(trained, tmp_path):
    base, adapter, peft_model = trained
    with torch.no_grad():
        want = peft_model(tokens()).logits
    gaps = {}
    for onto in ("dequantized", "original"):
        out = tmp_path / onto
        report = merge_checkpoint(adapter, str(out), dtype="fp32", merge_onto=onto)
        assert report["merged_modules"] == 14
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            gaps[onto] = rel_err(merged(tokens()).logits, want)
    print(f"\nlogits vs the adapter model: merge_onto=dequantized {gaps['dequantized']:.2e}, "
          f"original {gaps['original']:.3f}")
    assert gaps["dequantized"] < 1e-5  # the same function, up to float32 rounding
    assert 0.01 < gaps["original"] < 0.5  # the NF4 error of the base weights, which the adapter never saw
    merge_checkpoint(adapter, str(tmp_path / "bf16"), dtype="bf16", merge_onto="dequantized")
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        assert rel_err(bf16(tokens()).logits.float(), want) < 2e-2


def test_merged_model_loads_without_qtune_and_generates_alike(trained, tmp_path):
    base, adapter, peft_model = trained
    merge_checkpoint(adapter, str(tmp_path / "m"), dtype="fp32", merge_onto="dequantized")
    want = peft_model.generate(input_ids=tokens(), max_new_tokens=12, do_sample=False)[0].tolist()
    code = (
        "import sys, json, torch\n"
        "sys.modules['qtune'] = None  # any import of qtune fails\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
        f"x = torch.tensor([{tokens()[0].tolist()}])\n"
        "print(json.dumps(m.generate(input_ids=x, max_new_tokens=12, do_sample=False)[0].tolist()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want


def test_requantized_output_and_the_api(trained, tmp_path):
    base, adapter, peft_model = trained
    merge_checkpoint(adapter, str(tmp_path / "q"), dtype="fp32", merge_onto="original", quantize="nf4")
    config = json.load(open(tmp_path / "q" / "config.json"))
    assert config["quantization_config"]["quant_method"] == "qtune"
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert sum(isinstance(m, qtune.Linear4bit) for m in q.modules()) == 14
    with torch.no_grad():
        want = peft_model(tokens()).logits
        assert rel_err(q(tokens()).logits, want) < 0.5
    # the Python API on a loaded adapter model
    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu",
                                                 quantization_config=qtune.QuantConfig(double_quant=True))
    loaded = PeftModel.from_pretrained(model, adapter)
    plain = qtune.merge_adapter(loaded, dtype=torch.float32)
    assert not any(isinstance(m, qtune.Linear4bit) for m in plain.modules())
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        assert rel_err(plain(tokens()).logits, want) < 1e-5


def test_merge_errors(trained, tmp_path):
    base, adapter, _ = trained
    with pytest.raises(MergeError, match="has no adapter_config.json"):
        merge_checkpoint(str(tmp_path), str(tmp_path / "o"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(MergeError, match="exists and is not empty; pass overwrite=true"):
        merge_checkpoint(adapter, str(tmp_path / "full"))
    from qtune.hf.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "llama", hidden=64, layers=2)
    with pytest.raises(MergeError, match="the adapter belongs to another model"):
        merge_checkpoint(adapter, str(tmp_path / "o2"), base=other)
    assert not os.path.exists(tmp_path / "o2")
    p = subprocess.run([sys.executable, "-m", "qtune.merge", f"adapter={tmp_path}", f"out={tmp_path / 'o3'}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: adapter dir")


def test_tiny_recipe_adapter_merges_and_generates(tmp_path):
    env = dict(os.environ, QTUNE_CACHE=str(tmp_path / "cache"), HF_DATASETS_CACHE=str(tmp_path / "ds"))
    env.pop("TRITON_INTERPRET", None)
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], capture_output=True, text=True, env=env,  # noqa: E731
                                    cwd=tmp_path, timeout=600)
    p = run("qtune.train", "recipe=tiny", "train.max_steps=3", "data.max_examples=64", "train.micro_batch=4",
            f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run("qtune.merge", f"adapter={tmp_path / 'run' / 'adapter'}", f"out={tmp_path / 'merged'}", "dtype=fp32")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "merged 29 modules" in p.stdout  # 4 layers x 7 LoRA-wrapped linears + lm_head (modules_to_save)
    p = run("qtune.generate", f"model={tmp_path / 'merged'}", "quantize=none", "dtype=float32",
            "prompt=Add the two numbers.", "max_new_tokens=8", "temperature=0")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run("qtune.generate", f"model={tmp_path / 'cache' / 'tiny-llama-v3'}", f"adapter={tmp_path / 'run' / 'adapter'}",
            "dtype=float32", "max_new_tokens=4", "temperature=0.8")
    assert p.returncode == 0, p.stderr[-2000:]  # the chat loop, reading an empty stdin
