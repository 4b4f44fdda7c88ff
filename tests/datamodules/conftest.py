"""Fixtures of the data tests: per-test TMPDIR (Streaming's lock files), shared-memory hygiene, a tiny demo set."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from streaming.base.util import clean_stale_shared_memory

from lit_webssl.datamodules.demo import build_demo_dataset

N_TRAIN, N_VAL, SIZE = 48, 20, 40


@pytest.fixture(autouse=True)
def _streaming_isolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Streaming keeps lock files in TMPDIR and registers shared memory per dataset: isolate and clean both."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # gettempdir() caches its first answer
    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo set (read-only for tests): 48 train + 20 val images of 40 px."""
    return build_demo_dataset(
        tmp_path_factory.mktemp("data") / "demo", n_train=N_TRAIN, n_val=N_VAL, image_size=SIZE, seed=1
    )
