"""Checkpoints: a sharded checkpoint to one fp32 file, and whole-model weights to start from."""

from lit_webssl.checkpoint.convert import (  # noqa: F401
    checkpoint_kind,
    convert,
    main,
    read_state_dict,
    stored_grid,
)
