"""Metrics: a JSONL file always, the console through the progress bar, wandb when asked."""

from __future__ import annotations

import json
import os


class MetricsLogger:
    def __init__(self, output_dir: str, kind: str, config: dict, project: str, name: str | None, tags: list[str],
                 resume_step: int = 0) -> None:
        if kind not in ("console", "wandb"):
            raise ValueError(f"logger.kind {kind!r} is not supported; allowed: console, wandb")
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step == 0 and os.path.exists(self.path):
            os.remove(self.path)
        elif resume_step:  # drop records from past the checkpoint (they will be logged again)
            kept = [line for line in open(self.path) if json.loads(line).get("step", 0) <= resume_step] \
                if os.path.exists(self.path) else []
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.wandb = None
        if kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise ValueError("logger=wandb needs the wandb package: pip install 'qtune[wandb]'") from None
            self.wandb = wandb.init(project=project, name=name, tags=tags, config=config, dir=output_dir,
                                    resume="allow")

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
