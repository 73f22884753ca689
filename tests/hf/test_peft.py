"""LoRA through peft on qtune's layers."""

import pytest
import torch
from conftest import rel_err
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

import qtune
from qtune import Linear4bit, QuantConfig


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantConfig(double_quant=True, **kw),
                                                device_map="cpu")


def batch():
    x = torch.tensor([[1] + [4 + (7 * i + j) % 90 for i in range(32)] for j in range(4)])
    return x


@pytest.mark.parametrize("target", ["all-linear", ["q_proj", "v_proj", "up_proj", "down_proj"]])
def test_lora_trains_only_adapters_and_round_trips(tiny_dir, tmp_path, target):
    model = qtune.prepare_for_training(load(tiny_dir("llama")))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target))
    wrapped = [m for m in peft_model.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, Linear4bit)]
    assert len(wrapped) == (14 if target == "all-linear" else 8)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    x = batch()
    peft_model.train()
    losses = []
    for _ in range(12):
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
        assert with_grad and all("lora_" in n for n in with_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    again = PeftModel.from_pretrained(load(tiny_dir("llama")), tmp_path)
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(x).logits, again(x).logits)


def test_lora_input_gradient_matches_a_dequantized_reference(tiny_dir):
    model = load(tiny_dir("llama"), compute_dtype=torch.float32)
    layer = model.model.layers[0].mlp.down_proj
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    lora = peft_model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    y = lora(x)
    w = layer.dequantize() + (lora.lora_B["default"].weight @ lora.lora_A["default"].weight) * lora.scaling["default"]
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ w.T
    assert rel_err(y, y2) < 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert rel_err(x.grad, x2.grad) < 1e-5


def test_peft_prepare_model_for_kbit_training_still_works(tiny_dir):
    model = load(tiny_dir("llama"), quant_storage=torch.bfloat16)
    layer = model.model.layers[0].mlp.up_proj
    packed = layer.weight.detach().view(torch.uint8).clone()
    model = prepare_model_for_kbit_training(model)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight.view(torch.uint8), packed)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    loss = peft_model(input_ids=batch(), labels=batch()).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_prepare_for_training_does_not_upcast(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.bfloat16, device_map="cpu",
                                                 quantization_config=QuantConfig(compute_dtype=torch.bfloat16))
    qtune.prepare_for_training(model)
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    assert floats == {torch.bfloat16} and not any(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    peft_model.train()
    out = peft_model(input_ids=batch(), labels=batch())
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()


def test_generate_with_lora(tiny_dir):
    peft_model = get_peft_model(load(tiny_dir("opt")), LoraConfig(r=4, target_modules="all-linear"))
    out = peft_model.generate(input_ids=batch()[:1, :8], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)


def test_adapter_inputs_kept_under_autocast(tiny_dir):
    """keep_adapter_inputs skips peft's cast of each LoRA input to float32 (which autocast undoes):
    under bf16 autocast the loss and the LoRA gradients are the same."""
    from qtune.hf.training import keep_adapter_inputs

    path = tiny_dir("llama")

    def run(keep: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        model = get_peft_model(qtune.prepare_for_training(model, gradient_checkpointing=False),
                               LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
        if keep:
            assert keep_adapter_inputs(model) == 14
        x = torch.randint(4, 99, (2, 24))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
        return float(loss), grads

    loss_cast, g_cast = run(False)
    loss_kept, g_kept = run(True)
    assert loss_kept == loss_cast and rel_err(g_kept, g_cast) < 1e-6


def _trained_pair(tiny_dir, dropout: float = 0.0):
    """Two identical LoRA models on qtune's 4-bit layers, B non-zero; the second fused. With
    `dropout`, both use hashed dropout (the same masks)."""
    from qtune.hf.training import fuse_lora_output
    from qtune.nn.dropout import use_hash_dropout

    models, path = [], tiny_dir("llama")  # built (drawing random numbers) before the seed is set
    for _ in range(2):
        torch.manual_seed(0)
        m = get_peft_model(qtune.prepare_for_training(load(path)),  # alpha/r = 3: the scaling is not exact
                           LoraConfig(r=8, lora_alpha=24, lora_dropout=dropout, target_modules="all-linear"))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        if dropout:
            use_hash_dropout(m).fill_(3)
        models.append(m)
    assert fuse_lora_output(models[1]) == 14
    return models


@pytest.mark.parametrize("dropout", [0.0, 0.2])  # with dropout: A's product without a kept dropped copy
def test_fused_lora_output_matches_peft(tiny_dir, dropout):
    """base(x) + A(x) @ (s B)^T in one addmm: same outputs and adapter gradients as peft's forward,
    and peft's own path where the fused one does not apply (adapters disabled)."""
    ref, fused = _trained_pair(tiny_dir, dropout)
    x = batch()
    grads = []
    for m in (ref, fused):
        m.train()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        grads[-1]["loss"] = loss.detach()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 29
    for n, g in grads[0].items():
        assert rel_err(grads[1][n], g) < 1e-5, n
    ref.eval(), fused.eval()
    with torch.no_grad():
        with ref.disable_adapter(), fused.disable_adapter():
            assert torch.equal(fused(input_ids=x).logits, ref(input_ids=x).logits)
        assert rel_err(fused(input_ids=x).logits, ref(input_ids=x).logits) < 1e-5
