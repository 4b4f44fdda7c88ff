"""The DeepSpeed internals lit_webssl relies on (lit_webssl/compat/deepspeed.py), checked on the installed release
without starting DeepSpeed's runtime; the behaviour runs end to end under ZeRO-3 on 2 CPU ranks in
tests/lit_webssl/test_sharded.py and tests/callbacks/test_resolution.py."""

from __future__ import annotations

import inspect

import pytest

deepspeed_compat = pytest.importorskip("lit_webssl.compat.deepspeed")


def test_zero_init_context_switches_exist_where_outside_zero_init_finds_them():
    from deepspeed.runtime.zero import partition_parameters as zero

    assert callable(zero.shutdown_init_context) and callable(zero.restore_init_context)
    assert hasattr(zero, "top_level_context")
    with deepspeed_compat.outside_zero_init():  # no zero.Init active: a no-op
        pass


def test_zero3_optimizer_keeps_the_flat_groups_and_marks_its_parameters():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    source = inspect.getsource(DeepSpeedZeroOptimizer_Stage3)
    for name in ("fp32_partitioned_groups_flat", "fp16_groups", "_z3_optimizer"):
        assert name in source, name


def test_partitioned_parameters_refresh_through_partition_and_all_gather():
    from deepspeed.runtime.zero import partition_parameters as zero

    source = inspect.getsource(zero.Init._convert_to_deepspeed_param)
    assert "def partition(" in source and "def all_gather(" in source
    assert "param_list" in str(inspect.signature(zero.Init._partition))


def test_tensor_fragment_api_is_public():
    from deepspeed.utils import (  # noqa: F401 - importable is the check
        safe_get_local_fp32_param,
        safe_get_local_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )
