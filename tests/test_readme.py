"""The README's Python blocks run as written (the quickstart and the models/data example)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_blocks_this_file_runs():
    assert len(BLOCKS) == 2, f"README.md has {len(BLOCKS)} python blocks; update this test"


def test_quickstart_runs():
    namespace: dict = {}
    exec(compile(BLOCKS[0], "README.md:quickstart", "exec"), namespace)  # noqa: S102
    assert namespace["y"].shape == (8, 64, 32, 32)
    assert namespace["layer"].num_groups == 16


def test_models_and_data_block_runs():
    from groupnorm.data import load_dataset
    from groupnorm.data.sources import DatasetNotFoundError

    try:
        load_dataset("fashion-mnist", split="test", download=False)
    except DatasetNotFoundError as err:
        pytest.skip(f"Fashion-MNIST is not installed here: {err}")
    namespace: dict = {}
    exec(compile(BLOCKS[1], "README.md:models-and-data", "exec"), namespace)  # noqa: S102
    assert namespace["x"].shape[0] <= 32 and len(namespace["ds"]) == 60000
