"""from_pretrained with QuantConfig: which layers, how close, save/reload, bitsandbytes layout."""

import json
import os

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import qtune
from qtune import Linear4bit, QuantConfig
from qtune.hf.quantizer import QtuneHfQuantizer

ARCHS = ["llama", "mistral", "opt", "gpt_neox"]


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantConfig(**kw), device_map="cpu")


def tokens(n=2, t=24):
    return torch.randint(4, 99, (n, t))


def linear_names(model, cls):
    return {name for name, m in model.named_modules() if type(m) is cls}


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_on_load_replaces_exactly_the_eligible_layers(tiny_dir, arch):
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir(arch))
    model = load(tiny_dir(arch), double_quant=True)
    all_linear = linear_names(ref, nn.Linear)
    quantized = linear_names(model, Linear4bit)
    assert quantized == all_linear - {"lm_head"} and linear_names(model, nn.Linear) == {"lm_head"}
    x = tokens()
    with torch.no_grad():
        got, want = model(x).logits, ref(x).logits
    # Random tiny models amplify the 9% weight error of NF4 less than 2.5 times.
    assert rel_err(got, want) < 0.25
    # ...and the result is exactly that of quantizing the same layers by hand.
    by_hand = qtune.quantize_linears(ref, skip_modules=["lm_head"], double_quant=True)
    with torch.no_grad():
        assert torch.equal(by_hand(x).logits, got)


def test_skip_modules_are_honoured_and_unknown_ones_warn(tiny_dir):
    with pytest.warns(UserWarning, match="skip_modules entry 'no_such_module' matches no module"):
        model = load(tiny_dir("llama"), bnb_4bit_quant_type="fp4",
                     llm_int8_skip_modules=["model.layers.1", "up_proj", "lm_head", "no_such_module"])
    # bitsandbytes' matching (transformers' should_convert_module): a prefix up to a module
    # boundary, a regex, or a suffix
    quantized = linear_names(model, Linear4bit)
    assert quantized == {f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
    assert all(m.quant_type == "fp4" for m in model.modules() if isinstance(m, Linear4bit))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_save_reload_is_bit_exact(tiny_dir, tmp_path, arch):
    model = load(tiny_dir(arch), double_quant=True, compute_dtype=torch.float32, blocksize=128)
    model.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert config["quant_method"] == "qtune" and config["blocksize"] == 128
    again = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")  # quantization_config read from the checkpoint
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    tok = AutoTokenizer.from_pretrained(tiny_dir(arch))
    ids = tok("hello qtune", return_tensors="pt")
    g1 = model.generate(**ids, max_new_tokens=10, do_sample=False)
    g2 = again.generate(**ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(g1, g2) and g1.shape[1] == ids["input_ids"].shape[1] + 10


def _bitsandbytes_checkpoint(src, dst, model):
    """A checkpoint as transformers + bitsandbytes write it, built from the documented keys: each
    quantized Linear's `weight` packed, plus weight.absmax / quant_map / nested_absmax /
    nested_quant_map / quant_state.bitsandbytes__nf4 (JSON bytes); config.json with a
    bitsandbytes quantization_config."""
    state = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for key, value in state.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and isinstance(model.get_submodule(name), Linear4bit):
            packed, qs = qtune.quantize_4bit(value, 64, "nf4", double_quant=True)
            meta = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(value.shape),
                    "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": float(qs.nested.offset)}
            out.update({key: packed, key + ".absmax": qs.absmax, key + ".quant_map": qs.code.clone(),
                        key + ".nested_absmax": qs.nested.absmax, key + ".nested_quant_map": qs.nested.code.clone(),
                        key + ".quant_state.bitsandbytes__nf4":
                            torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)})
        else:
            out[key] = value
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(src, "config.json")))
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                     "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
                                     "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
                                     "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False}
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))


def test_bitsandbytes_layout_checkpoint_loads(tiny_dir, tmp_path):
    model = load(tiny_dir("llama"), double_quant=True)
    _bitsandbytes_checkpoint(tiny_dir("llama"), tmp_path, model)
    loaded = qtune.from_pretrained(tmp_path, device_map="cpu")
    assert isinstance(loaded.config.quantization_config, QuantConfig)
    assert linear_names(loaded, Linear4bit) == linear_names(model, Linear4bit)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_export_in_bitsandbytes_layout(tiny_dir, tmp_path):
    model = load(tiny_dir("mistral"), double_quant=True, quant_type="fp4")
    out = qtune.export_bitsandbytes(model, tmp_path / "bnb")
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"]
    assert config["bnb_4bit_quant_type"] == "fp4" and config["llm_int8_skip_modules"] == ["lm_head"]
    keys = load_file(os.path.join(out, "model.safetensors")).keys()
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4" in keys
    assert "model.layers.0.mlp.up_proj.weight.nested_absmax" in keys
    again = qtune.from_pretrained(out, device_map="cpu")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
    with pytest.raises(FileExistsError):
        qtune.export_bitsandbytes(model, out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no half-written leftovers


def test_device_maps_on_cpu(tiny_dir):
    for device_map in [{"": "cpu"}] + ([] if torch.cuda.is_available() else ["auto"]):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=QuantConfig(),
                                                     device_map=device_map)
        assert {p.device.type for p in model.parameters()} == {"cpu"}  # (GPU: hf_device_map {"": 0}, gpu tests)
        assert linear_names(model, Linear4bit)


def test_cpu_offload_keeps_offloaded_modules_unquantized():
    """The quantizer's decision for a GPU + CPU map (the GPU test runs the whole load)."""
    from qtune.hf.tiny import tiny_config
    from transformers import AutoModelForCausalLM as Auto

    with torch.device("meta"):
        model = Auto.from_config(tiny_config("llama"))
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": 0,
                  "model.rotary_emb": 0, "lm_head": "cpu"}
    strict = QtuneHfQuantizer(QuantConfig(), pre_quantized=False)
    with pytest.raises(ValueError, match="llm_int8_enable_fp32_cpu_offload=True"):
        strict.validate_environment(device_map=device_map)
    q = QtuneHfQuantizer(QuantConfig(llm_int8_enable_fp32_cpu_offload=True), pre_quantized=False)
    q.validate_environment(device_map=device_map)
    q._process_model_before_weight_loading(model, device_map=device_map)
    quantized = linear_names(model, Linear4bit)
    assert quantized and all(n.startswith("model.layers.0.") for n in quantized)
    assert all(type(m) is nn.Linear for m in model.model.layers[1].modules() if isinstance(m, nn.Linear))


def test_chat_template_generate(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir("llama"))
    model = load(tiny_dir("llama"), double_quant=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello my name is"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 6
    assert tok.decode(out[0]).startswith("<|user|>Hello my name is\n<|assistant|>")
