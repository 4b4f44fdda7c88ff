"""Checkpoints at scale: a sharded checkpoint to one fp32 file, and whole-model weights to start from.

    python -m lit_webssl checkpoint convert runs/<run>/checkpoints/last.ckpt model_fp32.ckpt

A sharded checkpoint folder is consolidated by its own library (:mod:`lit_webssl.distributed.checkpoints`); the
conversion then casts every floating tensor to fp32 (taking the EMA teacher's fp32 masters from every rank's file where
the strategy stored it in bf16), drops the optimizer states unless asked, keeps Lightning's training metadata (epoch,
step, loops, callbacks, hyper-parameters) and writes the file through a temporary name and an atomic rename: an
interrupted conversion never leaves a half-written file. The result loads with ``--model.init_from`` (any strategy)
and as ``--ckpt_path`` for ``validate``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from lit_webssl.distributed.checkpoints import FORMAT_KEYS, checkpoint_kind, consolidate, fp32_masters, stored_shape
from lit_webssl.errors import ConfigError


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The weights of a whole-model file: a Lightning checkpoint's ``state_dict`` or a plain ``{name: tensor}``.

    Memory-mapped, so the ranks of a node reading the same file share its pages instead of each holding a copy.
    """
    if checkpoint_kind(path) != "file":
        raise ConfigError(
            f"{path} is a sharded checkpoint folder; make one file of it first: "
            f"python -m lit_webssl checkpoint convert {path} OUT"
        )
    loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path}: holds no state dict of tensors")
    return state


def stored_grid(path: str | Path, key: str = "backbone.pos_embed", num_prefix_tokens: int = 1) -> int | None:
    """Side of the position-embedding grid that the checkpoint at ``path`` stores under ``key`` (a run saved in a
    later resolution stage stores a larger one), read without loading the weights: a distributed checkpoint's
    metadata, a memory-mapped file, or the shapes a sharded folder records. ``None`` when the entry is absent."""
    from lit_webssl.models.vit import grid_of

    shape = stored_shape(path, key)
    if shape is None:
        return None
    return grid_of(torch.empty(shape, device="meta"), num_prefix_tokens, f"{path}: {key}")


def convert(path: str | Path, out: str | Path, keep_optimizer: bool = False) -> Path:
    """Write checkpoint ``path`` (sharded folder or file) as one fp32 file ``out``; returns ``out``.

    Args:
        path: A sharded checkpoint folder (:func:`~lit_webssl.distributed.checkpoints.checkpoint_kind`) or a file.
        out: The file to write (its folder is created).
        keep_optimizer: Keep optimizer states (where the format lets them be recovered; otherwise they are dropped).
    """
    path, out = Path(path), Path(out)
    kind = checkpoint_kind(path)
    if out.resolve() == path.resolve():
        raise ConfigError(f"OUT: {out} is the checkpoint being converted")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert_") as tmp:
        checkpoint = consolidate(path, kind, Path(tmp) / "whole.pt")
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict) or not state:
            raise ConfigError(f"{path}: the checkpoint holds no model weights")
        checkpoint["state_dict"] = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        masters = fp32_masters(path, kind, checkpoint)
        unknown = sorted(set(masters) - set(state))
        if unknown:
            raise ConfigError(f"{path}: fp32 masters of tensors the weights lack: {', '.join(unknown[:4])}")
        checkpoint["state_dict"].update(masters)  # the EMA teacher's fp32 values where the module stored bf16
        for key in FORMAT_KEYS:  # the sharded format's own bookkeeping
            checkpoint.pop(key, None)
        if not keep_optimizer:
            for key in [k for k in checkpoint if k == "optimizer_states" or k.startswith("optimizer_")]:
                del checkpoint[key]
        partial = Path(tmp) / out.name
        torch.save(checkpoint, partial)
        os.replace(partial, out)
    return out


def main(argv: list[str]) -> None:
    """``checkpoint convert CKPT OUT [--keep-optimizer]``."""
    parser = argparse.ArgumentParser(prog="python -m lit_webssl checkpoint", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="a sharded checkpoint folder -> one fp32 file")
    conv.add_argument("ckpt", help="checkpoint folder (or file) to convert")
    conv.add_argument("out", help="the single file to write")
    conv.add_argument(
        "--keep-optimizer", action="store_true", help="keep optimizer states (distributed checkpoints and files only)"
    )
    args = parser.parse_args(argv)
    out = convert(args.ckpt, args.out, keep_optimizer=args.keep_optimizer)
    state = read_state_dict(out)
    total = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {len(state)} tensors, {total / 1e6:.2f} M values, fp32 ({checkpoint_kind(args.ckpt)} -> file)")
