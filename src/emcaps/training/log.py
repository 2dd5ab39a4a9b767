"""What a run reports as it goes: log.jsonl (and TensorBoard scalars), and one-line messages on stderr."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"


class Logger:
    """JSONL always (flushed per line); TensorBoard too when the `tensorboard` package is importable."""

    def __init__(self, run_dir: Path, enabled: bool, truncate_at: int | None, start_step: int) -> None:
        self.file = None
        self.tb = None
        if not enabled:
            return
        path = run_dir / LOG_NAME
        if truncate_at is not None and path.exists():
            with open(path, "r+b") as f:     # drop lines logged after the checkpoint we resume from
                f.truncate(min(truncate_at, path.stat().st_size))
        self.file = open(path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)

    def log(self, event: str, **values: Any) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"event": event, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{event}/{key}", value, values.get("step", 0))

    def offset(self) -> int:
        if self.file is None:
            return 0
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)
