"""Checkpoints at scale: a sharded checkpoint to one fp32 file, and whole-model weights to start from.

    python -m lit_webssl checkpoint convert runs/<run>/checkpoints/last.ckpt model_fp32.ckpt

Sharded strategies save folders: DeepSpeed ZeRO-3 writes ``<ckpt>/checkpoint/zero_pp_rank_<r>_..._states.pt`` (one
per rank, next to a ``latest`` tag file), FSDP2 (``ModelParallelStrategy``) writes a PyTorch distributed checkpoint
(``<ckpt>/.metadata``, ``__<r>_0.distcp`` files and Lightning's ``meta.pt``). Conversion uses each library's own
consolidation (DeepSpeed's ``zero_to_fp32`` through Lightning, ``torch.distributed.checkpoint``'s
``dcp_to_torch_save``), casts every floating tensor to fp32 (taking the EMA teacher's fp32 masters from every rank's
file where DeepSpeed stored it in bf16), drops the optimizer states unless asked, keeps Lightning's training metadata
(epoch, step, loops, callbacks, hyper-parameters) and writes the file through a temporary name and an atomic rename:
an interrupted conversion never leaves a half-written file. The result loads
with ``--model.init_from`` (any strategy) and as ``--ckpt_path`` for ``validate``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lit_webssl.distributed import FP32_MASTERS, assemble_masters
from lit_webssl.errors import ConfigError

Kind = Literal["deepspeed", "dcp", "file"]
_DEEPSPEED_KEYS = (
    "buffer_names",
    "ds_config",
    "ds_version",
    "frozen_param_fragments",
    "frozen_param_shapes",
    "param_shapes",
    "shared_params",
    "random_ltd",
    "data_sampler",
    "global_samples",
    "checkpoint_parallel_dimensions",
    "dp_world_size",
    "mp_world_size",
    "skipped_steps",
)


def checkpoint_kind(path: str | Path) -> Kind:
    """``deepspeed`` (ZeRO folder), ``dcp`` (distributed-checkpoint folder) or ``file`` (one ``torch.save`` file)."""
    path = Path(path)
    if path.is_file():
        return "file"
    if path.is_dir():
        if (path / "latest").is_file() or any(path.glob("*/zero_pp_rank_*_model_states.pt")):
            return "deepspeed"
        if (path / ".metadata").is_file():
            return "dcp"
        raise ConfigError(f"{path}: a folder that is neither a DeepSpeed nor a distributed checkpoint")
    raise ConfigError(f"{path}: no checkpoint there")


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
    metadata, a memory-mapped file, or the shapes a DeepSpeed folder records. ``None`` when the entry is absent."""
    from lit_webssl.models.vit import grid_of

    kind = checkpoint_kind(path)
    if kind == "dcp":
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata.get(f"state_dict.{key}")
        shape = tuple(meta.size) if meta is not None and hasattr(meta, "size") else None
    elif kind == "file":
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
        shape = tuple(state[key].shape) if isinstance(state.get(key), Tensor) else None
    else:  # DeepSpeed: the shapes its model-states file records (ZeRO-3 stores no weights there)
        shape = None
        for states in sorted(Path(path).glob("*/*mp_rank_*_model_states.pt"))[:1]:  # ZeRO-3: zero_pp_rank_0_...
            loaded = torch.load(states, map_location="cpu", mmap=True, weights_only=False)
            groups = loaded.get("param_shapes") or []
            groups = [*(groups if isinstance(groups, list) else [groups]), loaded.get("frozen_param_shapes") or {}]
            for shapes in groups:
                if key in shapes:
                    shape = tuple(shapes[key])
    if shape is None:
        return None
    return grid_of(torch.empty(shape, device="meta"), num_prefix_tokens, f"{path}: {key}")


def _consolidate(path: Path, kind: Kind, scratch: Path) -> dict[str, Any]:
    """The whole checkpoint as one dict (``state_dict``, optimizer states where kept, Lightning's metadata)."""
    if kind == "deepspeed":
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(scratch))
        return torch.load(scratch, map_location="cpu", weights_only=False)
    if kind == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(str(path), str(scratch))
        checkpoint = torch.load(scratch, map_location="cpu", weights_only=False)
        meta = path / "meta.pt"  # Lightning's non-tensor training state, saved beside the shards by rank 0
        if meta.is_file():
            checkpoint.update(torch.load(meta, map_location="cpu", weights_only=False))
        return checkpoint
    return torch.load(path, map_location="cpu", weights_only=False)


def _fp32_masters(path: Path, kind: Kind, checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """Whole fp32 tensors for parameters the checkpoint stores in lower precision (:class:`ShardedEMA`'s masters):
    under DeepSpeed every rank's file holds its partitions (Lightning's consolidation kept rank 0's only)."""
    state = checkpoint.pop(FP32_MASTERS, None)
    if kind != "deepspeed":
        return assemble_masters([state] if state else [])
    files = sorted(path.glob("*/zero_pp_rank_*_mp_rank_*_model_states.pt"))
    return assemble_masters(
        torch.load(f, map_location="cpu", mmap=True, weights_only=False).get(FP32_MASTERS, {}) for f in files
    )


def convert(path: str | Path, out: str | Path, keep_optimizer: bool = False) -> Path:
    """Write checkpoint ``path`` (sharded folder or file) as one fp32 file ``out``; returns ``out``.

    Args:
        path: A DeepSpeed ZeRO folder, a distributed-checkpoint folder, or a single file.
        out: The file to write (its folder is created).
        keep_optimizer: Keep optimizer states (from DeepSpeed folders they are not recoverable and are dropped).
    """
    path, out = Path(path), Path(out)
    kind = checkpoint_kind(path)
    if out.resolve() == path.resolve():
        raise ConfigError(f"OUT: {out} is the checkpoint being converted")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert_") as tmp:
        checkpoint = _consolidate(path, kind, Path(tmp) / "whole.pt")
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict) or not state:
            raise ConfigError(f"{path}: the checkpoint holds no model weights")
        checkpoint["state_dict"] = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        masters = _fp32_masters(path, kind, checkpoint)
        unknown = sorted(set(masters) - set(state))
        if unknown:
            raise ConfigError(f"{path}: fp32 masters of tensors the weights lack: {', '.join(unknown[:4])}")
        checkpoint["state_dict"].update(masters)  # the EMA teacher's fp32 values where the module stored bf16
        for key in _DEEPSPEED_KEYS:  # DeepSpeed's own bookkeeping (frozen fragments would duplicate the teacher)
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
    conv = sub.add_parser("convert", help="a sharded (ZeRO-3 or FSDP2) checkpoint -> one fp32 file")
    conv.add_argument("ckpt", help="checkpoint folder (or file) to convert")
    conv.add_argument("out", help="the single file to write")
    conv.add_argument("--keep-optimizer", action="store_true", help="keep optimizer states (FSDP2 and files only)")
    args = parser.parse_args(argv)
    out = convert(args.ckpt, args.out, keep_optimizer=args.keep_optimizer)
    state = read_state_dict(out)
    total = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {len(state)} tensors, {total / 1e6:.2f} M values, fp32 ({checkpoint_kind(args.ckpt)} -> file)")
