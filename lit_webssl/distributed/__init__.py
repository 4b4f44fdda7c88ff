"""Everything that knows a strategy: one adapter per family, the EMA teacher on shards, sharded tensors.

Three families of strategy carry the model (:mod:`lit_webssl.distributed.adapter`, :func:`adapter_for`):

- **replicated** (single device, DDP; :class:`StrategyAdapter`): every rank holds whole tensors. DeepSpeed ZeRO-1/2
  and FSDP1 build the model whole too and wrap it after (:class:`FixedShapes`).
- **fsdp2** (Lightning's ``ModelParallelStrategy``; :class:`~lit_webssl.distributed.fsdp2.FSDP2`): the model is
  built on the meta device, sharded per block with ``fully_shard`` (student blocks, teacher blocks, heads, then the
  root), then materialized on each rank's own shards and initialized there.
- **deepspeed** (Lightning's ``DeepSpeedStrategy`` at ZeRO stage 3; :class:`~lit_webssl.distributed.zero3.ZeRO3`):
  Lightning builds the model inside ``deepspeed.zero.Init``, which partitions each submodule's parameters as soon as
  its ``__init__`` returns.

In every family a 7B model is never whole on one rank: at most one submodule's own parameters are gathered at a time
(ZeRO-3 init), and FSDP2 never allocates more than a rank's shards.

The order of application is fixed (as torchtitan's ``parallelize``): activation checkpointing (a backbone flag,
set before building), then the sharding wrap, then materialization and init, then the teacher sync.

Modules: ``adapter`` (the interface, replicated and fixed-shape families), ``fsdp2``, ``zero3``, ``ema`` (the EMA
teacher, :class:`EMATeacher`, the one thing objectives import from here), ``tensors`` (what a rank holds of a
parameter; gathering, copying and loading whole values into shards).
"""

from lit_webssl.distributed.adapter import FixedShapes, StrategyAdapter, adapter_for
from lit_webssl.distributed.ema import (
    FP32_MASTERS,
    EMATeacher,
    ShardedEMA,
    assemble_masters,
    load_masters,
    load_whole_masters,
    master_of,
    save_masters,
)
from lit_webssl.distributed.tensors import (
    copy_local_shards,
    copy_module,
    copy_whole_,
    fp32_source,
    full_shape,
    gathered,
    init_module_tree,
    is_dtensor,
    is_partitioned,
    is_sharded,
    load_full_state_dict,
    local_shard,
    outside_zero_init,
    param_pairs,
    partition_of,
    reset_parameters_tree,
    strategy_family,
    whole_fp32,
)

__all__ = [
    "FP32_MASTERS",
    "EMATeacher",
    "FixedShapes",
    "ShardedEMA",
    "StrategyAdapter",
    "adapter_for",
    "assemble_masters",
    "copy_local_shards",
    "copy_module",
    "copy_whole_",
    "fp32_source",
    "full_shape",
    "gathered",
    "init_module_tree",
    "is_dtensor",
    "is_partitioned",
    "is_sharded",
    "load_full_state_dict",
    "load_masters",
    "load_whole_masters",
    "local_shard",
    "master_of",
    "outside_zero_init",
    "param_pairs",
    "partition_of",
    "reset_parameters_tree",
    "save_masters",
    "strategy_family",
    "whole_fp32",
]
