"""Sharding and memory techniques, in one place and one order.

Three families of strategy carry the model:

- **replicated** (single device, DDP): every rank holds whole tensors.
- **fsdp2** (Lightning's ``ModelParallelStrategy``, or :class:`lit_webssl.strategies.FSDP2Strategy`): the model is
  built on the meta device, then :func:`apply_fsdp2` shards it per block with ``fully_shard`` (student blocks,
  teacher blocks, heads, then the root), then it is materialized on each rank's own shards and initialized there.
- **deepspeed** (Lightning's ``DeepSpeedStrategy`` at ZeRO stage 3): Lightning builds the model inside
  ``deepspeed.zero.Init``, which partitions each submodule's parameters as soon as its ``__init__`` returns. Code
  that initializes a child after that point must gather it first (:func:`gathered`), and a partitioned module
  cannot be deep-copied (its parameters are empty placeholders): :func:`copy_module` builds a fresh twin instead.

In every family a 7B model is never whole on one rank: at most one submodule's own parameters are gathered at a time
(ZeRO-3 init), and FSDP2 never allocates more than a rank's shards.

The order of application is fixed (as torchtitan's ``parallelize``): activation checkpointing (a backbone flag,
set before building), then the sharding wrap, then materialization and init, then the teacher sync.
"""

from lit_webssl.distributed.ema import (  # noqa: F401
    FP32_MASTERS,
    ShardedEMA,
    assemble_masters,
)
from lit_webssl.distributed.fsdp2 import (  # noqa: F401
    apply_fsdp2,
    average_replicated_grads,
    broadcast_replicated,
    clip_grad_norm_,
    fsdp2_mesh,
    init_adam_state,
    isolate_params,
    replicated_params,
)
from lit_webssl.distributed.tensors import (  # noqa: F401
    Family,
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
