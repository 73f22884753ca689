"""Data parallelism on the CPU: 2 processes over gloo (torchrun) against one process with the same
global batch (grad_accum x 2)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file

ARGS = ["recipe=tiny", "data.max_examples=96", "train.seq_len=96", "train.micro_batch=4", "train.max_steps=4",
        "train.log_every=1", "train.eval_every=1000", "lora.dropout=0.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_agree_with_a_single_process(tmp_path):
    env = dict(os.environ, QTUNE_CACHE=str(tmp_path / "cache"), HF_DATASETS_CACHE=str(tmp_path / "ds"),
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    single = subprocess.run([sys.executable, "-m", "qtune.train", *ARGS, "train.grad_accum=2",
                             f"hydra.run.dir={tmp_path / 'one'}"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "-m", "qtune.train", *ARGS, "train.grad_accum=1",
                          f"hydra.run.dir={tmp_path / 'two'}"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    recs = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    sums = [r["rank_param_sums"] for r in recs if "rank_param_sums" in r]
    assert len(sums) == 1 and len(sums[0]) == 2 and sums[0][0] == sums[0][1]  # both ranks hold the same weights
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    a = torch.cat([one[k].flatten() for k in sorted(one)])
    b = torch.cat([two[k].flatten() for k in sorted(two)])
    # same global batch of 8: equal up to the order of float32 sums in the all-reduce
    assert rel_err(b, a) < 1e-4
    losses_one = [r["loss"] for r in map(json.loads, open(tmp_path / "one" / "metrics.jsonl")) if "loss" in r]
    losses_two = [r["loss"] for r in recs if "loss" in r]
    assert losses_one == pytest.approx(losses_two, rel=1e-5)
