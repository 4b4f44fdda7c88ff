"""PyTorch internals this package relies on (``torch`` >=2.4,<2.15).

* ``torch._foreach_lerp_`` / ``torch._foreach_mul_``: the multi-tensor kernels torch's own optimizers use; there is
  no public multi-tensor API, and a Python loop over a 7B model's tensors costs a kernel launch per tensor.
* ``nn.Module._non_persistent_buffers_set``: which buffers ``state_dict()`` leaves out; no public accessor.
* ``torch.utils._python_dispatch.TorchDispatchMode``: the base class of dispatch modes (public in all but name).
* DDP's ``reducer._remove_autograd_hooks()``: the hooks of a DDP wrapper that is being replaced must go before the
  next backward; DDP has no public way to detach itself from the module it wraps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lit_webssl.compat import require

VERSION = require("torch", "2.4", "2.15")

__all__ = ["TorchDispatchMode", "drop_ddp_hooks", "foreach_lerp_", "foreach_mul_", "persistent_buffers"]


def foreach_lerp_(targets: Sequence[Tensor], ends: Sequence[Tensor], weight: float) -> None:
    """``t += weight * (e - t)`` for every pair, in one multi-tensor kernel."""
    torch._foreach_lerp_(list(targets), list(ends), weight)


def foreach_mul_(tensors: Sequence[Tensor], scalar: Tensor | float) -> None:
    """``t *= scalar`` for every tensor, in one multi-tensor kernel."""
    torch._foreach_mul_(list(tensors), scalar)


def persistent_buffers(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(dotted name, buffer)`` for every buffer under ``module`` that ``state_dict()`` saves."""
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


def drop_ddp_hooks(ddp: nn.Module) -> None:
    """Detach a ``DistributedDataParallel`` wrapper's gradient hooks from its module (before wrapping it again)."""
    reducer = getattr(ddp, "reducer", None)
    if reducer is not None and callable(getattr(reducer, "_remove_autograd_hooks", None)):
        reducer._remove_autograd_hooks()
