"""Sharded checkpoint formats: what DeepSpeed ZeRO and PyTorch distributed checkpoints (FSDP2) write, read back.

DeepSpeed ZeRO-3 writes ``<ckpt>/checkpoint/zero_pp_rank_<r>_..._states.pt`` (one per rank, next to a ``latest`` tag
file), FSDP2 (``ModelParallelStrategy``) writes a PyTorch distributed checkpoint (``<ckpt>/.metadata``,
``__<r>_0.distcp`` files and Lightning's ``meta.pt``). Whole checkpoints come from each library's own consolidation
(DeepSpeed's ``zero_to_fp32`` through Lightning, ``torch.distributed.checkpoint``'s ``dcp_to_torch_save``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lit_webssl.distributed.ema import FP32_MASTERS, assemble_masters
from lit_webssl.errors import ConfigError

Kind = Literal["deepspeed", "dcp", "file"]
FORMAT_KEYS = (
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
"""Top-level entries of a consolidated DeepSpeed checkpoint that are DeepSpeed's own bookkeeping (its frozen fragments
would duplicate the EMA teacher in a converted file)."""


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


def stored_shape(path: str | Path, key: str) -> tuple[int, ...] | None:
    """The shape checkpoint ``path`` stores under ``key``, read without loading the weights: a distributed
    checkpoint's metadata, a memory-mapped file, or the shapes a DeepSpeed folder records; ``None`` when absent."""
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
    return shape


def consolidate(path: Path, kind: Kind, scratch: Path) -> dict[str, Any]:
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


def fp32_masters(path: Path, kind: Kind, checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """Whole fp32 tensors for parameters the checkpoint stores in lower precision (:class:`ShardedEMA`'s masters):
    under DeepSpeed every rank's file holds its partitions (Lightning's consolidation kept rank 0's only)."""
    state = checkpoint.pop(FP32_MASTERS, None)
    if kind != "deepspeed":
        return assemble_masters([state] if state else [])
    files = sorted(path.glob("*/zero_pp_rank_*_mp_rank_*_model_states.pt"))
    return assemble_masters(
        torch.load(f, map_location="cpu", mmap=True, weights_only=False).get(FP32_MASTERS, {}) for f in files
    )
