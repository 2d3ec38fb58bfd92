"""The experiment harness, one path from the command line to the report:

    cli -> config (TrainConfig, checked when built) -> presets (grid points)
        -> recipe (norm, data, model, optimizer, schedule; the dry check)
        -> loop (train(): the epochs; runtime: device, torchrun, RNG, checkpoints)
        -> recorder (Recorder: a run folder, or store.StoreRecorder) -> store (SQLite)
        -> report (cells, kinds + findings + paper, plots)

sweep.py runs a preset's grid into a store: check every point, enqueue, claim, train, record.
Each module imports only from modules before it on this path.
"""

from .config import ConfigError, TrainConfig, make_config
from .loop import train
from .presets import Preset, Study, list_presets, load_preset
from .recipe import lr_multiplier
from .recorder import MemoryRecorder, Recorder, RunFolder, RunResult
from .report import build_report
from .store import Store, StoreError
from .sweep import run_sweep

__all__ = [
    "TrainConfig", "ConfigError", "Preset", "Study", "load_preset", "list_presets",
    "make_config", "train", "Recorder", "MemoryRecorder", "RunFolder", "RunResult",
    "lr_multiplier", "Store", "StoreError", "run_sweep", "build_report",
]
