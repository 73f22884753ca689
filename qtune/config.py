"""Typed configuration of a training run, registered with Hydra's ConfigStore.

YAML in `conf/` (option groups) and `recipes/` (whole runs, `recipe=NAME`) only sets values; the
schema is here, so a misspelt key or a wrong type fails at start with Hydra's message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, OmegaConf


@dataclass
class ModelConfig:
    name: str = MISSING  # hub id or local directory
    revision: Optional[str] = None
    dtype: str = "bfloat16"  # float32 | float16 | bfloat16
    trust_remote_code: bool = False
    build: Optional[str] = None  # "tiny-llama": build a tiny random model + tokenizer at `name` first
    attn_implementation: Optional[str] = None
    host_embeddings: bool = False  # on a GPU: frozen input embeddings and output layer stay in pinned host memory


@dataclass
class QuantSettings:
    enabled: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: Optional[str] = None  # default: model.dtype
    blocksize: int = 64
    quant_storage: str = "uint8"
    skip_modules: Optional[List[str]] = None
    decode_in_pieces: bool = False  # decode large weights in 32 MiB row pieces: less peak memory, slower


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    modules_to_save: Optional[List[str]] = None


@dataclass
class OptimSettings:
    name: str = "adamw8bit"  # adamw8bit | adam8bit | adamw (torch, fp32 states)
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    paged: bool = False  # 8-bit states in pinned host memory, off the GPU (as bitsandbytes' paged optimizers)


@dataclass
class DataSettings:
    path: str = MISSING  # hub id, or a local .json/.jsonl/.csv/.parquet file
    format: str = "alpaca"  # alpaca | chat | text
    split: str = "train"
    eval_split: Optional[str] = None  # default: carve eval_fraction off the train split
    eval_fraction: float = 0.05
    text_column: str = "text"
    messages_column: str = "messages"
    packing: bool = False
    max_examples: Optional[int] = None


@dataclass
class TrainSettings:
    seq_len: int = 1024
    micro_batch: int = 1
    grad_accum: int = 1
    max_steps: int = 100  # optimizer steps; `epochs` wins when set
    epochs: Optional[float] = None
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 10
    keep_last: int = 2
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    gradient_checkpointing: bool = True
    cuda_graphs: bool = True  # replay each micro-step from a CUDA graph (GPU, data.packing=true; README)
    output_dir: str = "${hydra:runtime.output_dir}"
    resume: Optional[str] = None  # auto | path of a checkpoint directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    strategy: str = "ddp"  # with several processes (torchrun / accelerate launch): ddp | fsdp (README: Several GPUs)
    memory_limit_gib: Optional[float] = None  # cap this process's GPU memory (e.g. 15 to stand in for a 16 GB T4)
    simulate_sigterm_at: Optional[int] = None  # tests: send SIGTERM to itself after this step


@dataclass
class LoggerSettings:
    kind: str = "console"  # console | wandb
    project: str = "qtune"
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class RunConfig:
    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"recipe": "tiny"}, {"logger": "console"}])
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantSettings = field(default_factory=QuantSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    logger: LoggerSettings = field(default_factory=LoggerSettings)


def _asset_dir(name: str) -> Path:
    """recipes/ or conf/: qtune/NAME in an installed wheel, else the checkout's top-level NAME/."""
    here = Path(__file__).resolve().parent
    return here / name if (here / name).is_dir() else here.parent / name


def recipe_names() -> list[str]:
    return sorted(p.stem for p in _asset_dir("recipes").glob("*.yaml"))


def register() -> None:
    """Put the schema, the option groups of conf/ and the recipes into Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="qtune_train", node=RunConfig)
    for path in sorted(_asset_dir("recipes").glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
    for path in sorted(_asset_dir("conf").glob("*/*.yaml")):
        cs.store(group=path.parent.name, name=path.stem, node=OmegaConf.load(path), package=path.parent.name)
