"""Lightning internals this package relies on (``lightning`` >=2.6,<2.7).

Three things have no public API in Lightning:

* resolving ``ckpt_path="last"`` (and ``"hpc"``, ``"best"``, ``"registry"``) to a file *before* ``fit`` does, which a
  sharded run needs to build its model at the position grid the checkpoint stores (:func:`resolve_ckpt_path`);
* replacing the training loader in the middle of an epoch, with the data position kept, when a resolution stage
  changes the per-device batch size (:func:`rebuild_train_loader` and the epoch-length helpers below): the fit loop
  owns its ``CombinedLoader`` and data fetcher privately, and ``reload_dataloaders_every_n_epochs`` acts only at
  epoch boundaries;
* building DeepSpeed's engine again around a module whose parameters changed shape
  (:func:`setup_deepspeed_engine`): ``DeepSpeedStrategy`` does it once, in a private method, at ``setup``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lit_webssl.compat import require

VERSION = require("lightning", "2.6", "2.7")


def resolve_ckpt_path(trainer: L.Trainer, path: str) -> str | None:
    """The file ``fit(ckpt_path=path)`` will load: ``last``/``hpc``/``best``/``registry`` resolved exactly as the
    trainer resolves them (missing public API: the checkpoint connector's ``_parse_ckpt_path``)."""
    from lightning.pytorch.trainer.states import TrainerFn

    if str(path) not in ("last", "hpc", "best", "registry"):
        return str(path)
    resolved = trainer._checkpoint_connector._parse_ckpt_path(
        TrainerFn.FITTING, str(path), model_provided=True, model_connected=True
    )
    return None if resolved is None else str(resolved)


def rebuild_train_loader(trainer: L.Trainer) -> None:
    """Replace the running training loader by a fresh ``train_dataloader()`` that resumes the data stream where the
    old one stopped (its ``state_dict()``), in the middle of the epoch.

    The loop's data fetcher is re-pointed in place, so the running epoch continues with the new batches. The epoch
    then ends when the new loader runs out (its length no longer counts the batches already done at another batch
    size), so ``is_last_batch`` is not known in advance for the rest of that epoch. (Missing public API: the fit
    loop's ``_combined_loader`` and ``_data_fetcher``, the combined loader's ``_state_dicts`` and the data
    connector's ``_process_dataloader``/``_parse_num_batches``.)
    """
    from lightning.fabric.utilities.data import sized_len
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches, _process_dataloader
    from lightning.pytorch.trainer.states import RunningStage, TrainerFn
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    fit_loop = trainer.fit_loop
    old = fit_loop._combined_loader
    fetcher = fit_loop._data_fetcher
    if old is None or fetcher is None:
        return
    states = old._state_dicts()
    fetcher.teardown()  # shuts the old loader's workers down
    loader = trainer.datamodule.train_dataloader()
    if states and callable(getattr(loader, "load_state_dict", None)):
        loader.load_state_dict(states[0])
    loader = _process_dataloader(trainer, TrainerFn.FITTING, RunningStage.TRAINING, loader)
    combined = CombinedLoader(loader, "max_size_cycle")
    length = sized_len(loader)
    combined.limits = [
        _parse_num_batches(
            RunningStage.TRAINING, float("inf") if length is None else length, trainer.limit_train_batches
        )
    ]
    fit_loop._combined_loader = combined
    fetcher.setup(combined)
    iter(fetcher)
    fetcher.fetched = fit_loop.epoch_loop.batch_progress.current.ready
    open_ended_epoch(trainer)


def open_ended_epoch(trainer: L.Trainer) -> None:
    """Let the current epoch run until the loader is exhausted (no precomputed batch count; missing public API: the
    fit loop's ``max_batches`` and its data fetcher's ``length``/``done``)."""
    trainer.fit_loop.max_batches = float("inf")
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is not None:
        fetcher.length = float("inf")
        fetcher.done = False


def counted_epoch(trainer: L.Trainer) -> None:
    """Undo :func:`open_ended_epoch` at the start of the next epoch: the loader's length counts batches again."""
    from lightning.fabric.utilities.data import sized_len
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage

    combined = trainer.fit_loop._combined_loader
    if trainer.fit_loop.max_batches != float("inf") or combined is None:
        return
    length = sized_len(combined.flattened[0])
    if length is not None:
        trainer.fit_loop.max_batches = _parse_num_batches(RunningStage.TRAINING, length, trainer.limit_train_batches)


def invalidate_val_loader(trainer: L.Trainer) -> None:
    """Make the validation loop build its loader again at its next run (missing public API: its ``_combined_loader``;
    ``reload_dataloaders_every_n_epochs`` acts only at epoch boundaries)."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    if val_loop._combined_loader is not None:
        val_loop._combined_loader.reset()
        val_loop._combined_loader = None


def setup_deepspeed_engine(strategy: Any, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """``(engine, zero_optimizer)``: DeepSpeed's engine built around ``module`` and ``optimizer`` with the strategy's
    own config, as ``DeepSpeedStrategy.setup`` does it once (missing public API: its ``_setup_model_and_optimizer``)."""
    return strategy._setup_model_and_optimizer(module, optimizer)


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer ``module`` is attached to, or ``None`` (missing public API: ``LightningModule.trainer`` raises
    when unattached; a module built by ``plan`` or in a script has none)."""
    return module._trainer
