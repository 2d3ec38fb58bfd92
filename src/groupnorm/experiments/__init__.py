"""The experiment harness: config -> train loop -> sweep into SQLite -> report.

Data path: preset TOML + overrides -> :class:`TrainConfig` (stored with the run) -> dataset and
loader -> model(norm) -> :func:`train` (virtual workers, paper protocol) -> :class:`Store`
(runs + epochs, crash-safe) -> :func:`build_report` (markdown + PNG, deterministic).
"""

from .config import Preset, Study, TrainConfig, list_presets, load_preset, make_config
from .report import build_report, paper_table
from .store import Store
from .sweep import run_sweep
from .train import RunResult, lr_multiplier, train

__all__ = [
    "TrainConfig", "Preset", "Study", "load_preset", "list_presets", "make_config", "train",
    "RunResult", "lr_multiplier", "Store", "run_sweep", "build_report", "paper_table",
]
