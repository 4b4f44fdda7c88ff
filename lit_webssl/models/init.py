"""Initializing modules in place, whatever holds their parameters: the tools an objective's heads need.

A module may be built whole, on the meta device and then materialized on each rank's shards, or partitioned as it is
built (parameters split across ranks the moment its constructor returns). These functions do the right thing in
each case, so an objective initializes its heads the same way under every strategy; the strategy-specific part lives
in :mod:`lit_webssl.distributed`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from lit_webssl.distributed.tensors import full_shape, gathered, init_module_tree, is_partitioned, reset_parameters_tree

__all__ = ["built_partitioned", "init_tree", "reset_tree", "whole", "whole_shape"]


def init_tree(root: nn.Module, init_fn: Callable[[nn.Module], None]) -> None:
    """Apply ``init_fn`` to every submodule of ``root`` in pre-order, each with its own parameters whole for the
    call (one submodule at a time: a 7B model is never whole on a rank)."""
    init_module_tree(root, init_fn)


def reset_tree(root: nn.Module) -> None:
    """Run every submodule's own constructor init (``reset_parameters``), children before parents as construction
    does: the first step of initializing a module materialized from the meta device."""
    reset_parameters_tree(root)


@contextlib.contextmanager
def whole(module: nn.Module, recurse: bool = False) -> Iterator[None]:
    """Make ``module``'s own parameters (with ``recurse``, its subtree's) whole for the block; what rank 0 writes is
    kept on every rank. A no-op where they are whole already."""
    with gathered(module, recurse=recurse):
        yield


def built_partitioned(module: nn.Module) -> bool:
    """``module``'s parameters were split across ranks as it was built, so an init that ran inside a constructor
    (a third-party module's) saw placeholders and must run again inside :func:`whole`."""
    return any(is_partitioned(p) for p in module.parameters())


def whole_shape(param: Tensor) -> tuple[int, ...]:
    """The whole tensor's shape, also where this rank holds only a flat part of it."""
    return full_shape(param)
