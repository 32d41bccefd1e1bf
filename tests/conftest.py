"""Shared fixtures: a tiny testbed export and a tiny untrained testbed-vocabulary LLaVA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for a whole test module (``tiny_models.single_thread``);
    a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from tiny_models import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from eval.testbed.data import export, make_dataset_dict

    root = tmp_path_factory.mktemp("testbed")
    export(make_dataset_dict(train=2, validation=2, test=10, seed=5), root)
    return root


@pytest.fixture(scope="session")
def train_testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training images, 2 questions each: the data of the short `testbed-train` CLI runs
    (read only; every run writes to its own --output-dir)."""
    from eval.testbed.data import export, make_dataset_dict

    root = tmp_path_factory.mktemp("train_testbed")
    return export(
        make_dataset_dict(train=8, validation=0, test=0, seed=3, train_questions_per_image=2),
        root,
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 patch tokens (112 px, 14 px patches), one merging layer: budgets down to 32."""
    from eval.testbed.model import build_reference

    torch.manual_seed(0)
    model, processor = build_reference(size="cpu-tiny", image_size=112, seed=0)
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
