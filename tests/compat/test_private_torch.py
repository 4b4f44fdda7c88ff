"""The PyTorch internals lit_webssl relies on (lit_webssl/compat/torch.py), checked on the installed release."""

from __future__ import annotations

import torch
from torch import nn

from lit_webssl.compat import torch as compat


def test_foreach_kernels_equal_their_loops():
    targets = [torch.randn(3, 4), torch.randn(5)]
    ends = [torch.randn(3, 4), torch.randn(5)]
    expected = [t + 0.25 * (e - t) for t, e in zip(targets, ends, strict=True)]
    compat.foreach_lerp_(targets, ends, 0.25)
    assert all(torch.allclose(t, x, atol=1e-7) for t, x in zip(targets, expected, strict=True))
    compat.foreach_mul_(targets, torch.tensor(2.0))
    assert all(torch.allclose(t, 2 * x, atol=1e-6) for t, x in zip(targets, expected, strict=True))


def test_persistent_buffers_are_what_state_dict_saves():
    class WithBuffers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.norm = nn.BatchNorm1d(2)
            self.register_buffer("mask", torch.ones(2), persistent=False)

    module = WithBuffers()
    names = dict(compat.persistent_buffers(module))
    saved = set(module.state_dict()) - {n for n, _ in module.named_parameters()}
    assert set(names) == saved and "mask" not in names and "norm.running_mean" in names


def test_ddp_reducer_can_detach_its_hooks(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(nn.Linear(2, 2))
        assert callable(getattr(ddp.reducer, "_remove_autograd_hooks", None))
        compat.drop_ddp_hooks(ddp)
        ddp.module(torch.randn(3, 2)).sum().backward()  # the bare module: no reducer hook fires (would raise)
    finally:
        dist.destroy_process_group()


def test_dispatch_mode_base_class_is_importable_and_sees_ops():
    seen = []

    class Record(compat.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        torch.ones(2) + 1
    assert any("add" in op for op in seen)
