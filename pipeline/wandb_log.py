"""Optional Weights & Biases logging of the metrics records (``log.wandb``).

The ``wandb`` package is an optional extra (``pip install 'infotok-pipeline[wandb]'``) and is
imported only when a run opens a sink. Offline mode (the default) needs no network or account:
the run is written to ``RUN_DIR/wandb/offline-run-*`` and uploaded later with
``wandb sync RUN_DIR/wandb/offline-run-*``. The W&B run id is kept in ``RUN_DIR/wandb_run_id``,
so a resumed training run continues the same W&B run.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, param

RUN_ID_FILE = "wandb_run_id"


@dataclass
class WandbConfig:
    project: str | None = param(None, help="W&B project; null: W&B logging is off")
    name: str | None = param(None, help="W&B run name (default: RUN_DIR's folder name)")
    tags: list[str] = param(default_factory=list, help="W&B run tags")
    entity: str | None = param(None, help="W&B user or team (default: the account's default)")
    mode: Literal["online", "offline"] = param(
        "offline",
        help="offline: no network, upload later with `wandb sync RUN_DIR/wandb/offline-run-*`",
    )
    dir: str | None = param(None, help="parent of the wandb/ folder (default: RUN_DIR)")

    def check(self, source: str, prefix: str) -> None:
        """With a project set the package must be installed (checked without importing it)."""
        if self.project is not None and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                f"{source}: {prefix}project is set but the wandb package is not installed "
                "(pip install 'infotok-pipeline[wandb]' or pip install wandb)"
            )


class WandbSink:
    """One W&B run fed with the scalars of the metrics records; opened by rank 0 only."""

    def __init__(self, run: Any):
        self._run = run
        # On an online resume W&B starts past the steps the interrupted run logged and would
        # drop the resumed run's repeats of them with a warning each; skip them quietly.
        self._first_step = run.starting_step

    @classmethod
    def open(cls, cfg: WandbConfig, run_dir: Path, config: dict[str, Any] | None) -> WandbSink:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")  # Settings(silent=True) is ignored in 0.19
        id_file = run_dir / RUN_ID_FILE
        wandb_dir = Path(cfg.dir) if cfg.dir else run_dir
        wandb_dir.mkdir(parents=True, exist_ok=True)  # 0.19 falls back to /tmp when it is missing
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.resolve().name,
            tags=cfg.tags,
            mode=cfg.mode,
            dir=str(wandb_dir),
            config=config,
            id=id_file.read_text().strip() if id_file.exists() else None,
            resume="allow",
            settings=wandb.Settings(console="off"),
        )
        id_file.write_text(run.id + "\n")
        return cls(run)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step >= self._first_step:
            self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()
