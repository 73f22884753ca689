"""`python -m qtune.train recipe=NAME [key=value ...]`: QLoRA fine-tuning configured by Hydra.

A recipe (recipes/NAME.yaml) sets everything about a run; any key can be overridden on the command
line (`train.max_steps=50 lora.r=8`), `logger=wandb` logs to Weights & Biases, and `-m` sweeps
(`-m recipe=tiny lora.r=4,8`), one output directory per run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .config import recipe_names, register


def _resolvers() -> None:
    assets = Path(__file__).resolve().parent / "assets"
    cache = Path(os.environ.get("QTUNE_CACHE", Path.home() / ".cache" / "qtune"))
    if not OmegaConf.has_resolver("qtune_asset"):
        OmegaConf.register_new_resolver("qtune_asset", lambda name: str(assets / name))
    if not OmegaConf.has_resolver("qtune_cache"):
        OmegaConf.register_new_resolver("qtune_cache", lambda name: str(cache / name))


def _check_recipe(argv: list[str]) -> None:
    """An unknown recipe: one line and exit 2 (before Hydra's multi-line report)."""
    for arg in argv:
        if arg.startswith("recipe="):
            for name in arg.split("=", 1)[1].split(","):
                if name not in recipe_names():
                    print(f"error: unknown recipe {name!r}; available: {', '.join(recipe_names())}", file=sys.stderr)
                    raise SystemExit(2)


def task(cfg) -> float | None:
    """One run (Hydra calls it once per job, in the job's output directory)."""
    from .data import DataError
    from .loop import RunError, train

    resolved = OmegaConf.to_container(cfg, resolve=True)
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), os.path.join(cfg.train.output_dir, "config.yaml"))
    try:
        summary = train(cfg, resolved)
    except (RunError, DataError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return summary["last_loss"]


def main() -> None:
    import hydra

    _check_recipe(sys.argv[1:])
    _resolvers()
    register()
    hydra.main(version_base=None, config_name="qtune_train")(task)()


if __name__ == "__main__":
    main()
