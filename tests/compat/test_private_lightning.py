"""The Lightning internals lit_webssl relies on (lit_webssl/compat/lightning.py), checked on the installed release: an
upgrade that changes one fails here, loudly, instead of silently in a run. The behaviour of the loader rebuild and the
DeepSpeed engine rebuild runs end to end in tests/callbacks/test_resolution.py."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_webssl.compat import UnsupportedVersion, require
from lit_webssl.compat import lightning as compat


def test_the_version_guard_names_the_package_the_version_and_the_range():
    installed = require("lightning", "2.6", "2.7")
    assert installed == compat.VERSION
    with pytest.raises(UnsupportedVersion) as err:
        require("lightning", "0.1", "0.2")
    message = str(err.value)
    assert "\n" not in message and f"lightning {installed}" in message and ">=0.1,<0.2" in message
    with pytest.raises(UnsupportedVersion, match="not installed"):
        require("no-such-distribution-lit-webssl", "1", "2")


def test_last_resolves_to_the_newest_last_checkpoint_as_fit_does(tmp_path: Path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({}, ckpts / "last.ckpt")
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=ckpts)], logger=False)
    assert compat.resolve_ckpt_path(trainer, "last") == str(ckpts / "last.ckpt")
    assert compat.resolve_ckpt_path(trainer, str(tmp_path / "x.ckpt")) == str(tmp_path / "x.ckpt")


def test_the_fit_loop_keeps_its_loader_and_fetcher_where_the_rebuild_reads_them():
    from lightning.pytorch.trainer.connectors import data_connector
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    fit_loop = trainer.fit_loop
    for loop, names in (
        (fit_loop, ("_combined_loader", "_data_fetcher", "max_batches")),
        (fit_loop.epoch_loop.val_loop, ("_combined_loader",)),
    ):
        assert all(hasattr(loop, name) for name in names), type(loop).__name__
    assert callable(CombinedLoader._state_dicts)
    loader = CombinedLoader(torch.utils.data.DataLoader(list(range(4))), "max_size_cycle")
    assert loader._state_dicts() == []  # stateless loaders: nothing to carry over
    assert list(inspect.signature(data_connector._process_dataloader).parameters) == [
        "trainer",
        "trainer_fn",
        "stage",
        "dataloader",
    ]
    assert list(inspect.signature(data_connector._parse_num_batches).parameters) == ["stage", "length", "limit_batches"]
    assert data_connector._parse_num_batches(L.pytorch.trainer.states.RunningStage.TRAINING, 10, 1.0) == 10


def test_deepspeed_strategy_builds_its_engine_in_the_private_method_the_rebuild_calls():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    params = list(inspect.signature(DeepSpeedStrategy._setup_model_and_optimizer).parameters)
    assert params[:3] == ["self", "model", "optimizer"]
    assert "self._setup_model_and_optimizer(" in inspect.getsource(DeepSpeedStrategy)  # how setup builds the engine
