import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def one_line(excinfo) -> str:
    """The message of a pytest.raises excinfo, asserted to be one non-empty line."""
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(arch) -> path of a saved tiny model of that architecture (built once a session)."""
    from qtune.hf.tiny import build_tiny_model

    cache = {}

    def get(arch: str = "llama") -> str:
        if arch not in cache:
            cache[arch] = build_tiny_model(tmp_path_factory.mktemp(arch), arch)
        return cache[arch]

    return get


def lora_losses(peft_model, x: torch.Tensor, steps: int = 12, lr: float = 1e-2) -> list[float]:
    """Train a peft model's trainable parameters on input_ids=labels=x with AdamW; the losses."""
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
