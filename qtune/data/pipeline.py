"""Load a data set (hub id or local file), render each row in its format, tokenize, and mask the
prompt so that the loss is taken on responses only."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FORMATS = ("alpaca", "chat", "text")
LOCAL_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad data input: the message is one line naming the problem."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _load(path: str, split: str):
    from datasets import load_dataset

    ext = os.path.splitext(path)[1].lower()
    if ext in LOCAL_TYPES or os.path.sep in path and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise DataError(f"data file {path} does not exist")
        if ext not in LOCAL_TYPES:
            raise DataError(f"data file {path} has an unknown type; allowed: {', '.join(LOCAL_TYPES)}")
        try:
            return load_dataset(LOCAL_TYPES[ext], data_files=path, split="train")
        except ValueError as e:
            if "corresponds to no data" in str(e):
                raise DataError(f"data set {path} is empty") from None
            raise DataError(f"could not read {path}: {str(e).splitlines()[0]}") from None
    return load_dataset(path, split=split)


def _require(ds, columns: list[str], fmt: str, path: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"data set {path} lacks column(s) {missing} needed by format {fmt!r}; "
                        f"it has {ds.column_names}")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_alpaca(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    template = ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT
    prompt = _encode(tokenizer, template.format(instruction=row["instruction"], input=row.get("input") or ""))
    response = _encode(tokenizer, row["output"]) + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + prompt + response
    return ids, [IGNORE] * (len(bos) + len(prompt)) + response


def encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; only assistant turns are trained on."""
    def render(msgs, gen):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
            labels[start:end] = ids[start:end]
    return ids, labels


def encode_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + _encode(tokenizer, text) + [tokenizer.eos_token_id]
    return ids, list(ids)


def build_datasets(cfg, tokenizer, seq_len: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples of at most seq_len tokens. Raises DataError on bad input."""
    if cfg.format not in FORMATS:
        raise DataError(f"data.format {cfg.format!r} is not supported; allowed: {', '.join(FORMATS)}")
    ds = _load(cfg.path, cfg.split)
    needed = {"alpaca": ["instruction", "output"], "chat": [cfg.messages_column], "text": [cfg.text_column]}
    _require(ds, needed[cfg.format], cfg.format, cfg.path)
    if cfg.max_examples:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    if len(ds) == 0:
        raise DataError(f"data set {cfg.path} is empty")

    def encode(row):
        if cfg.format == "alpaca":
            ids, labels = encode_alpaca(row, tokenizer)
        elif cfg.format == "chat":
            ids, labels = encode_chat(row[cfg.messages_column], tokenizer)
        else:
            ids, labels = encode_text(row[cfg.text_column], tokenizer)
        prompt = next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))
        return {"input_ids": ids[:seq_len], "labels": labels[:seq_len], "prompt_len": prompt}

    tokenized = ds.map(encode, remove_columns=ds.column_names, desc="tokenizing")  # cached by datasets
    too_long = sum(1 for n in tokenized["prompt_len"] if n >= seq_len)
    if too_long:
        raise DataError(f"{too_long} of {len(tokenized)} examples have prompts of train.seq_len={seq_len} tokens or "
                        f"more (nothing left to train on); raise train.seq_len or shorten them")
    examples = [Example(r["input_ids"], r["labels"]) for r in tokenized]
    if cfg.eval_split:
        ev = _load(cfg.path, cfg.eval_split).map(encode, remove_columns=ds.column_names)
        return examples, [Example(r["input_ids"], r["labels"]) for r in ev]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_eval = int(len(examples) * cfg.eval_fraction) if cfg.eval_fraction > 0 else 0
    if n_eval >= len(examples):
        raise DataError(f"data.eval_fraction={cfg.eval_fraction} leaves no training examples")
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def pack(examples: list[Example], seq_len: int) -> list[dict]:
    """Concatenate examples into sequences of at most seq_len tokens, greedily in order. Each
    keeps `position_ids` restarting at every example and `segment` ids, from which `collate` builds
    a block-diagonal causal mask, so no token attends across an example boundary."""
    packs, cur = [], {"input_ids": [], "labels": [], "position_ids": [], "segment": []}
    for ex in examples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex.input_ids) > seq_len:
            packs.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": [], "segment": []}
        seg = len(set(cur["segment"]))
        cur["input_ids"] += ex.input_ids
        cur["labels"] += [IGNORE] + ex.labels[1:]  # the first token is never predicted from the previous example
        cur["position_ids"] += list(range(len(ex.input_ids)))
        cur["segment"] += [seg] * len(ex.input_ids)
    if cur["input_ids"]:
        packs.append(cur)
    return packs


def collate(items: list, pad_id: int, dtype: torch.dtype = torch.float32, length: int | None = None,
            device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch of Examples (or packed dicts) to its longest member, or to `length`
    (packed batches: one shape every step, so kernels and attention plans are built once). A packed
    batch's block-diagonal mask is built on `device` (on a GPU: microseconds, where the CPU takes
    milliseconds per 1024x1024 mask)."""
    rows = [it if isinstance(it, dict) else {"input_ids": it.input_ids, "labels": it.labels} for it in items]
    n = max(max(len(r["input_ids"]) for r in rows), length or 0)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k], labels[i, :k], attn[i, :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attn}
    if "segment" in rows[0]:
        pos = torch.zeros((len(rows), n), dtype=torch.long)
        seg = torch.full((len(rows), n), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            pos[i, :k], seg[i, :k] = torch.tensor(r["position_ids"]), torch.tensor(r["segment"])
        batch.update(position_ids=pos, attention_mask=block_causal_mask(seg, dtype, device))  # 4-D additive mask
    return batch


def block_causal_mask(segment: torch.Tensor, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """(B, 1, n, n) additive mask from (B, n) segment ids (-1: padding): causal within a segment,
    nothing across; padding attends to itself only, so no row is empty."""
    seg = segment.to(device) if device is not None else segment
    n = seg.shape[1]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    idx = torch.arange(n, device=seg.device)
    allowed = (same & (idx[:, None] >= idx[None, :])) | (idx[:, None] == idx[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
