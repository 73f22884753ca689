"""8-bit (LLM.int8) weights: the layer against float, outliers, quantize-on-load, save/reload, LoRA."""

import torch
from conftest import lora_losses, rel_err
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

import qtune
from qtune.nn import Linear8bit


def test_outlier_columns_need_the_decomposition():
    lin = nn.Linear(512, 256)
    x = torch.randn(32, 512)
    cols = torch.randperm(512)[:4]
    x[:, cols] *= 40  # planted outlier features, as in large language models
    want = lin(x)
    with torch.no_grad():
        err6 = rel_err(Linear8bit.from_linear(lin, threshold=6.0)(x), want)
        err0 = rel_err(Linear8bit.from_linear(lin, threshold=0.0)(x), want)
    assert err6 < 0.01 and err0 > 3 * err6, (err6, err0)


def test_input_gradient_and_state_dict():
    lin = nn.Linear(64, 48)
    layer = Linear8bit.from_linear(lin)
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).sum().backward()
    assert rel_err(x.grad, layer.dequantize(torch.float32).sum(0).expand(5, -1)) < 1e-6
    sd = layer.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["SCB"].shape == (48,) and int(sd["weight_format"]) == 0
    fresh = Linear8bit(64, 48)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh(x), layer(x))


def test_load_in_8bit_quantizes_on_load_and_round_trips(tiny_dir, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), device_map="cpu",
                                                 quantization_config=qtune.QuantConfig(load_in_8bit=True))
    layers = [m for m in model.modules() if isinstance(m, Linear8bit)]
    assert len(layers) == 14 and type(model.lm_head) is nn.Linear and model.is_loaded_in_8bit
    x = torch.randint(4, 99, (2, 24))
    with torch.no_grad():
        assert rel_err(model(x).logits, ref(x).logits) < 0.05  # int8 rows: about 1% per layer
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_lora_trains_on_8bit_layers(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), device_map="cpu",
                                                 quantization_config=qtune.QuantConfig(load_in_8bit=True))
    peft_model = get_peft_model(qtune.prepare_for_training(model), LoraConfig(r=8, target_modules="all-linear"))
    x = torch.tensor([[1] + [4 + (7 * i + j) % 90 for i in range(32)] for j in range(4)])
    losses = lora_losses(peft_model, x)
    assert losses[-1] < 0.85 * losses[0], losses
