"""Data pipeline: formats, prompt masking, packing boundaries, bad input."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import one_line

from qtune.data import DataError, build_datasets, collate, pack
from qtune.data.pipeline import IGNORE, encode_alpaca, encode_chat, encode_text
from qtune.hf.tiny import char_tokenizer


def cfg(path, fmt="alpaca", **kw):
    base = dict(path=str(path), format=fmt, split="train", eval_split=None, eval_fraction=0.0, text_column="text",
                messages_column="messages", packing=False, max_examples=None)
    return SimpleNamespace(**(base | kw))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_alpaca_masks_the_prompt(tok):
    ids, labels = encode_alpaca({"instruction": "Say hi.", "input": "", "output": "hi"}, tok)
    prompt = "### Instruction:\nSay hi.\n\n### Response:\n"
    n_prompt = 1 + len(prompt)  # bos + one token per character
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and tok.decode(ids[n_prompt:]) == "hi</s>"
    ids2, _ = encode_alpaca({"instruction": "Add.", "input": "1 + 2", "output": "3"}, tok)
    assert "### Input:\n1 + 2" in tok.decode(ids2)


def test_chat_trains_only_on_assistant_turns(tok):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hey"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    ids, labels = encode_chat(msgs, tok)
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert trained == "hey\nciao\n"  # each assistant turn with the template's closing newline
    assert len(ids) == len(labels)


def test_text_trains_on_everything(tok):
    ids, labels = encode_text("abc", tok)
    assert ids == labels and tok.decode(ids) == "<s>abc</s>"


def test_build_splits_and_truncates(tok, tmp_path):
    rows = [{"instruction": "Echo.", "input": str(i), "output": "x" * 20} for i in range(40)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    train, ev = build_datasets(cfg(p, eval_fraction=0.25), tok, seq_len=60, seed=0)
    assert len(train) == 30 and len(ev) == 10
    assert all(len(e.input_ids) == 60 and len(e.labels) == 60 for e in train)  # truncated responses


def test_each_format_from_files(tok, tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b"}]}] * 3)
    train, _ = build_datasets(cfg(p, "chat"), tok, 64, 0)
    assert len(train) == 3
    csv = tmp_path / "t.csv"
    csv.write_text("text\nhello world\nsecond line\n")
    train, _ = build_datasets(cfg(csv, "text"), tok, 64, 0)
    assert len(train) == 2 and train[0].labels == train[0].input_ids


def test_packing_keeps_examples_apart(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from qtune.hf.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "m", "llama", hidden=64, layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    exs = [encode_text(t, tok) for t in ("first example", "second one, longer", "3rd")]
    from qtune.data import Example

    exs = [Example(i, lab) for i, lab in exs]
    packs = pack(exs, seq_len=64)
    assert len(packs) == 1 and packs[0]["position_ids"][:14] == list(range(14))
    with torch.no_grad():
        packed_loss = model(**collate(packs, tok.pad_token_id)).loss
        total, count = 0.0, 0
        for e in exs:
            out = model(**collate([e], tok.pad_token_id))
            n = len(e.input_ids) - 1
            total, count = total + float(out.loss) * n, count + n
    assert float(packed_loss) == pytest.approx(total / count, rel=1e-5)
    with torch.no_grad():  # padded to the run's seq_len (one shape every step): the same loss
        batch = collate(packs, tok.pad_token_id, length=64)
        assert batch["input_ids"].shape == (1, 64) and batch["attention_mask"].shape == (1, 1, 64, 64)
        assert float(model(**batch).loss) == pytest.approx(float(packed_loss), rel=1e-5)
    packs = pack(exs, seq_len=20)  # a full pack starts a new sequence
    assert len(packs) == 3


@pytest.mark.parametrize("rows,kw,match", [
    (None, {}, "does not exist"),
    ([{"instruction": "a", "answer": "b"}], {}, "lacks column(s) ['output'] needed by format 'alpaca'"),
    ([{"text": "x"}], {"fmt": "chat"}, "lacks column(s) ['messages']"),
    ([], {}, "is empty"),
    ([{"instruction": "a very long instruction " * 4, "output": "b"}], {"seq_len": 16}, "prompts of train.seq_len=16"),
    ([{"instruction": "a", "output": "b"}], {"fmt": "yaml"}, "data.format 'yaml' is not supported"),
])
def test_bad_data_inputs(tok, tmp_path, rows, kw, match):
    path = tmp_path / "missing.jsonl" if rows is None else write_jsonl(tmp_path / "d.jsonl", rows)
    if rows == []:
        path = tmp_path / "empty.csv"
        path.write_text("instruction,output\n")
    seq_len = kw.pop("seq_len", 64)
    with pytest.raises(DataError) as e:
        build_datasets(cfg(path, kw.pop("fmt", "alpaca")), tok, seq_len, 0)
    assert match in one_line(e)
