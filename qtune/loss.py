"""The training loss of a causal LM without the full (tokens x vocab) logits.

`causal_lm_loss(model, batch)` equals `model(**batch).loss` (HF's shifted-label cross entropy,
ignore_index -100, mean over the valid tokens), but computes it from the decoder's hidden states
in chunks of tokens: each chunk's logits in the compute dtype (autocast's, or the weights'), the
cross entropy in fp32, and the chunk's gradients (for the hidden states and for any trainable
parameters of the output layer, e.g. LoRA on lm_head or lm_head in modules_to_save) at once, in
the forward pass. Only one chunk's logits exist at a time, in the forward and the backward pass,
and the output layer's matmul is not recomputed. Positions whose label is ignored (prompts,
padding, the last position) get no logits at all.

Models it does not recognise (other architectures, prompt-learning adapters, extra batch keys,
an FSDP2-sharded root whose forward hooks gather the output layer) fall back to
`model(**batch).loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
# CausalLM classes whose forward is `decoder(...) -> last_hidden_state -> lm_head -> ForCausalLMLoss`,
# with the attribute path of the decoder called there
DECODERS = {
    "LlamaForCausalLM": "model",
    "MistralForCausalLM": "model",
    "Qwen2ForCausalLM": "model",
    "Qwen3ForCausalLM": "model",
    "OPTForCausalLM": "model.decoder",
    "GPTNeoXForCausalLM": "gpt_neox",
}
BATCH_KEYS = {"input_ids", "attention_mask", "position_ids", "labels"}
CHUNK_ELEMENTS = 2**23  # logits per chunk: 256 tokens at a 32k vocabulary. A chunk's logits, their fp32
# copy and gradients (~14 bytes per logit) are transient memory at the step's peak, the end of the forward.


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: about CHUNK_ELEMENTS logits, between 64 and 4096."""
    return max(64, min(4096, CHUNK_ELEMENTS // max(vocab_size, 1)))


def _sharded(*modules: nn.Module) -> bool:
    """FSDP2 (`fully_shard`) on a module whose forward the fast path skips: its hooks, which gather
    the parameters held at that level (embeddings, lm_head, final norm), would not run."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in modules)


def _unwrap(model: nn.Module) -> nn.Module | None:
    """The transformers CausalLM inside `model` (itself, or a LoRA peft model's base model), or
    None where the fast path does not apply."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    if _sharded(model, getattr(model, "base_model", model)):
        return None
    if isinstance(model, PeftModel):
        cfg = model.active_peft_config
        if cfg.is_prompt_learning or str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA":
            return None
        if getattr(cfg, "alora_invocation_tokens", None):  # activated LoRA needs offsets from the input ids
            return None
        model = model.get_base_model()
    if type(model).__name__ not in DECODERS:
        return None
    from transformers.loss.loss_utils import ForCausalLMLoss

    if getattr(model, "loss_function", None) is not ForCausalLMLoss or _sharded(model):
        return None
    return model


def _decoder(hf_model: nn.Module) -> nn.Module:
    mod = hf_model
    for name in DECODERS[type(hf_model).__name__].split("."):
        mod = getattr(mod, name)
    return mod


class _ChunkedHeadCE(torch.autograd.Function):
    """sum over rows i of CE(head(hidden[i]), targets[i]) in fp32, chunk by chunk. The gradients for
    `hidden` and `params` (the head's trainable parameters) are computed in the forward pass, kept
    in fp32, and scaled by the incoming gradient in the backward pass. Inside, the chunk's loss is
    multiplied by GRAD_SCALE (a power of two: exact) so that fp16 logit gradients, of the order of
    1/vocab, stay out of fp16's subnormal range."""

    GRAD_SCALE = 1024.0

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk, *params):
        need_h = ctx.needs_input_grad[0]
        ctx.need_p = ctx.needs_input_grad[4:]
        need_p = [p for p, need in zip(params, ctx.need_p) if need]
        whole = getattr(head, "cross_entropy_sum", None)  # a head held in host memory (qtune.nn.embedding)
        if whole is not None and not need_p:  # one pass over its table for all rows: no token chunks
            total, grad_h = whole(hidden, targets, need_h, IGNORE_INDEX)
            grad_p = []
            if need_h:
                grad_h.mul_(_ChunkedHeadCE.GRAD_SCALE)
        else:
            total, grad_h, grad_p = _ChunkedHeadCE._chunks(hidden, targets, head, chunk, need_h, need_p)
        ctx.h_dtype, ctx.p_dtypes = hidden.dtype, [p.dtype for p in need_p]
        ctx.save_for_backward(*([grad_h] if need_h else []), *grad_p)
        return total

    @staticmethod
    def _chunks(hidden, targets, head, chunk, need_h, need_p):
        """(loss sum, scaled fp32 gradients for hidden and need_p) token chunk by token chunk."""
        grad_h = hidden.new_empty(hidden.shape, dtype=torch.float32) if need_h else None
        grad_p = [torch.zeros_like(p, dtype=torch.float32) for p in need_p]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        scale = torch.full((), _ChunkedHeadCE.GRAD_SCALE, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            y = targets[s:s + chunk]
            if not need_h and not need_p:
                total += F.cross_entropy(head(hidden[s:s + chunk]).float(), y, ignore_index=IGNORE_INDEX,
                                         reduction="sum")
                continue
            h = hidden[s:s + chunk].detach().requires_grad_(need_h)
            with torch.enable_grad():
                loss = F.cross_entropy(head(h).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
            grads = torch.autograd.grad(loss, ([h] if need_h else []) + need_p, scale)
            if need_h:
                grad_h[s:s + chunk] = grads[0]
            for acc, g in zip(grad_p, grads[int(need_h):]):
                acc += g
            total += loss.detach()
        return total, grad_h, grad_p

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        factor = grad_out.float() / _ChunkedHeadCE.GRAD_SCALE
        grad_h = saved.pop(0).mul(factor).to(ctx.h_dtype) if ctx.needs_input_grad[0] else None
        grad_p = iter(g.mul(factor).to(dt) for g, dt in zip(saved, ctx.p_dtypes))
        return (grad_h, None, None, None, *[next(grad_p) if need else None for need in ctx.need_p])


def chunked_head_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int | None = None,
                      vocab_size: int | None = None, static: bool = False) -> torch.Tensor:
    """HF's causal-LM loss of `head(hidden)` against `labels` (shifted by one, ignore_index -100,
    mean over the valid tokens; NaN when there are none) without the full logits. `static`: every
    position gets logits (ignored ones add nothing), so no shape depends on the labels' values and
    the host never waits for the GPU (as CUDA graph capture requires)."""
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if static:
        targets, count = shift, (shift != IGNORE_INDEX).sum()
    else:
        valid = (shift != IGNORE_INDEX).nonzero().squeeze(1)
        hidden, targets, count = hidden.index_select(0, valid), shift.index_select(0, valid), valid.numel()
    chunk = chunk or chunk_tokens(vocab_size or 32000)
    params = [p for p in head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    total = _ChunkedHeadCE.apply(hidden, targets, head, chunk, *params)
    return total / count


def causal_lm_loss(model: nn.Module, batch: dict, chunk: int | None = None, static: bool = False) -> torch.Tensor:
    """`model(**batch).loss` for a causal LM (plain transformers or LoRA peft), computed without
    materialising the full fp32 logits where the model is recognised (`static`: see
    chunked_head_loss)."""
    hf = _unwrap(model) if "labels" in batch and set(batch) <= BATCH_KEYS else None
    if hf is None:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = _decoder(hf)(**inputs, use_cache=False).last_hidden_state
    return chunked_head_loss(hidden, batch["labels"], hf.get_output_embeddings(), chunk, hf.config.vocab_size,
                             static)
