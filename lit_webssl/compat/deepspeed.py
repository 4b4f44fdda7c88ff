"""DeepSpeed internals this package relies on (``deepspeed`` >=0.19,<0.20); imported only when DeepSpeed is used.

* ``zero.Init``'s global patches of the tensor constructors (``partition_parameters.shutdown_init_context`` /
  ``restore_init_context`` / ``top_level_context``): a file of fp32 weights read inside ``zero.Init`` in bf16 would
  be reinterpreted; DeepSpeed has no public way to step outside the context for a moment (:func:`outside_zero_init`).
* A parameter's ``_z3_optimizer``: whether the ZeRO-3 optimizer holds an fp32 master of it yet, which
  ``deepspeed.utils.safe_get_local_fp32_param`` asserts instead of answering (:func:`has_fp32_master`).
* ``param.partition(param_list=...)`` / ``param.all_gather(param_list=...)``: refreshing the whole copies that ZeRO-3
  keeps of small "persistent" parameters after their partitions changed outside the optimizer (the EMA teacher);
  public only through the optimizer step (:func:`refresh_persistent`).
* The ZeRO-3 optimizer's flat fp32 sub-groups (``fp32_partitioned_groups_flat``, ``fp16_groups``) and their Adam
  state: resetting the moments of one sub-group after the engine is built again at a resolution stage
  (:func:`flat_groups`); the tensor-fragment API (``safe_get/set_local_*``) covers single parameters only.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from lit_webssl.compat import require

VERSION = require("deepspeed", "0.19", "0.20")


@contextlib.contextmanager
def outside_zero_init() -> Iterator[None]:
    """Suspend ``deepspeed.zero.Init``'s patches of tensor constructors for the block (a no-op outside one).

    Under ``zero.Init`` every new floating tensor is cast to the run's dtype, ``torch.Tensor.__new__`` included; so
    ``torch.load`` of an fp32 file inside it (``--model.init_from`` in ``configure_model``) would reinterpret fp32
    bytes as bf16 and read garbage. Module construction is not partitioned inside the block either: build nothing.
    """
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if zero is None or getattr(zero, "top_level_context", None) is None:
        yield
        return
    zero.shutdown_init_context()
    try:
        yield
    finally:
        zero.restore_init_context()


def has_fp32_master(param: Tensor) -> bool:
    """The ZeRO-3 optimizer holds an fp32 master partition of ``param`` (a trainable parameter, once the engine is
    built)."""
    return getattr(param, "_z3_optimizer", None) is not None


def refresh_persistent(params: list[Tensor]) -> None:
    """Rebuild the whole copies of persistent ZeRO-3 parameters from their (updated) partitions (a collective:
    every rank calls it with the same parameters), as DeepSpeed does for the ones its optimizer steps."""
    if params:
        params[0].partition(param_list=params)
        params[0].all_gather(param_list=params)


def flat_groups(zero_optimizer: Any) -> list[tuple[Tensor, list[Tensor]]]:
    """``(flat fp32 partition, member parameters)`` for every sub-group of a ZeRO-3 optimizer, in order."""
    return list(zip(zero_optimizer.fp32_partitioned_groups_flat, zero_optimizer.fp16_groups, strict=True))


def adam_state(zero_optimizer: Any) -> dict[Any, dict[str, Any]]:
    """The wrapped torch/DeepSpeed Adam's per-tensor state, keyed by the flat fp32 partitions."""
    return zero_optimizer.optimizer.state
