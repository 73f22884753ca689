"""Getting a quantized model ready for LoRA training without needless upcasts."""

from __future__ import annotations

import contextlib
import sys
import types

import torch
from torch import nn

from ..nn.dropout import HashDropout
from ..nn.rmsnorm import rms_norm
from ..nn.rope import apply_rotary_pos_emb
from ..nn.swiglu import silu_mul


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = True, use_reentrant: bool = False,
                         preserve_rng_state: bool = True) -> nn.Module:
    """Freeze the base weights, turn on gradient checkpointing (non-reentrant by default, so
    inputs need no gradients) and turn off the KV cache. Unlike peft's
    `prepare_model_for_kbit_training`, nothing is upcast: transformers' norms already compute in
    fp32 internally, and fp32 embeddings or lm_head would drag activations and logits into fp32.
    `preserve_rng_state=False` only where nothing in the layers draws random numbers (see
    `draws_random`): checkpointing then saves no generator state (CUDA graphs need that).

    Call it before `get_peft_model` (it freezes every parameter present)."""
    for p in model.parameters():
        p.requires_grad_(False)
    kwargs = {"use_reentrant": use_reentrant, **({} if preserve_rng_state else {"preserve_rng_state": False})}
    if gradient_checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if gradient_checkpointing and use_reentrant and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def embeddings_to_host(model: nn.Module, head: bool = True) -> list[str]:
    """Move frozen, untied embedding tables to pinned host memory (qtune.nn.embedding): the input
    embedding and, with `head`, a bias-free output layer; the GPU then holds no copy of them. Call
    before `prepare_for_training`, and only for a head that will not be trained. Returns what moved
    ("input", "output"): not a tied table, nor a module of another kind."""
    from ..nn.embedding import HostEmbedding, HostHead

    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and getattr(out, "weight", None) is getattr(emb, "weight", None)
    moved = []
    if type(emb) is nn.Embedding and not tied:
        model.set_input_embeddings(HostEmbedding.from_embedding(emb))
        moved.append("input")
    if head and type(out) is nn.Linear and out.bias is None and not tied:
        model.set_output_embeddings(HostHead.from_linear(out))
        moved.append("output")
    return moved


def keep_adapter_inputs(model: nn.Module) -> int:
    """For training under autocast: LoRA layers take their input as it comes. peft casts it to the
    adapters' float32 first, and autocast casts it straight back for the matmul: two copies of the
    activations per adapter call (and two more in backward) for the same product. Not for use
    without autocast when the adapters' dtype differs from the activations'. Returns the layers set."""
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


def draws_random(model: nn.Module) -> bool:
    """Whether training the model draws from torch's random generator: a torch dropout with p > 0
    (module), or a dropout rate > 0 in its config (attention dropout is functional)."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    cfg = getattr(model, "config", None)
    rates = {k: v for k, v in (cfg.to_dict() if cfg is not None else {}).items() if "dropout" in k}
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in rates.values())


@contextlib.contextmanager
def unpacked_search_off(batch: dict):
    """While capturing a batch with neither attention mask nor position ids (one whole sequence per
    row): transformers looks for packed sequences in the positions it makes itself, and cannot rule
    them out without a host sync while a graph is captured, so it would build a full mask instead of
    SDPA's causal fast path. Here there is nothing to find, so that search is skipped."""
    import transformers.masking_utils as mu

    find = getattr(mu, "find_packed_sequence_indices", None)
    if find is None or "attention_mask" in batch or "position_ids" in batch:
        yield
        return
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = find


def fuse_lora_output(model: nn.Module) -> int:
    """Make each peft LoRA Linear add its update inside one GEMM: base(x) + A(drop(x)) @ (s·B)^T as
    an addmm, the scaling s put on B's r columns instead of on the (tokens x out) product. Forward
    that is two fewer passes over the layer's output (the scaling and the sum), backward one. Layers
    in any other state (merged, adapters disabled, several active, DoRA or other variants, a bias on
    B, extra arguments) run peft's own forward. Returns the layers changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [m for m in model.modules() if type(m) is LoraLinear]
    for m in layers:
        m.forward = types.MethodType(_fused_lora_forward, m)
    return len(layers)


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = self.active_adapters
    a = active[0] if len(active) == 1 else None
    if (args or kwargs or a is None or self.disable_adapters or self.merged or a not in self.lora_A
            or a in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(a)
            or self.lora_B[a].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    lora_a, lora_b = self.lora_A[a], self.lora_B[a]
    if getattr(self, "cast_input_dtype_enabled", True):
        x = x.to(lora_a.weight.dtype)
    drop = self.lora_dropout[a]
    if isinstance(drop, HashDropout) and lora_a.bias is None:  # the dropped x is not kept for backward
        h = drop.linear(x, lora_a.weight)
    else:
        h = lora_a(drop(x))
    b = lora_b.weight * self.scaling[a]  # (out, r): cheap
    if not (torch.is_autocast_enabled(result.device.type) or result.dtype == h.dtype == b.dtype):
        return (result + nn.functional.linear(h, b)).to(result.dtype)  # as peft sums and casts
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
    return out.view(result.shape)


def _swap_forwards(model: nn.Module, classes: tuple[str, ...], fits, make_forward) -> int:
    """Give every module of a class named in `classes` for which `fits(module)` holds the forward
    `make_forward(module)` (an instance attribute: `del module.forward` restores the class's).
    Returns how many changed."""
    layers = [m for m in model.modules() if type(m).__name__ in classes and fits(m)]
    for m in layers:
        m.forward = types.MethodType(make_forward(m), m)
    return len(layers)


# transformers norm classes whose forward is LlamaRMSNorm's (weight * normalized.to(input dtype))
RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def fuse_rmsnorm(model: nn.Module) -> int:
    """Route Llama-family RMSNorm layers through qtune.nn.rmsnorm (one kernel each way on GPUs, the
    weight frozen; a trainable weight keeps transformers' forward). Returns the layers changed."""
    return _swap_forwards(model, RMSNORM_CLASSES, lambda m: isinstance(getattr(m, "weight", None), torch.Tensor)
                          and hasattr(m, "variance_epsilon"), lambda m: _rmsnorm_forward)


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


# transformers MLP classes whose forward is LlamaMLP's: down(act(gate(x)) * up(x))
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def fuse_swiglu(model: nn.Module) -> int:
    """Route the SiLU-gated product of Llama-family MLPs through qtune.nn.swiglu (one kernel each way
    on GPUs). Returns the layers changed."""
    def silu_mlp(m: nn.Module) -> bool:
        act = getattr(m, "act_fn", None)
        return ((isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation")
                and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")))

    return _swap_forwards(model, MLP_CLASSES, silu_mlp, lambda m: _swiglu_forward)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


ROPE_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


def fuse_rope(model: nn.Module) -> int:
    """Route the rotary embedding of Llama-family attention layers through qtune.nn.rope (one kernel
    per tensor each way on GPUs). transformers calls a module-level `apply_rotary_pos_emb` from each
    attention forward; it is swapped for the duration of these layers' forwards only (recomputation
    included), so other models in the process are untouched. Returns the layers changed."""
    module = lambda m: sys.modules[type(m).__module__]  # noqa: E731 - where transformers defines the class
    return _swap_forwards(model, ROPE_ATTENTION_CLASSES, lambda m: hasattr(module(m), "apply_rotary_pos_emb"),
                          lambda m: _with_fused_rope(type(m).forward, module(m)))


def _with_fused_rope(forward, module):
    def run(self, *args, **kwargs):
        original = module.apply_rotary_pos_emb
        module.apply_rotary_pos_emb = apply_rotary_pos_emb
        try:
            return forward(self, *args, **kwargs)
        finally:
            module.apply_rotary_pos_emb = original

    return run
