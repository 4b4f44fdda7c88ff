"""Whole-model files: ``--model.init_from`` loads them (or names what is wrong), ``checkpoint convert`` on a file."""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli

from lit_webssl.checkpoint import checkpoint_kind, read_state_dict
from lit_webssl.errors import ConfigError
from lit_webssl.objectives import DINOv2
from lit_webssl.training.module import LitWebSSL

TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(**kwargs) -> LitWebSSL:
    objective = DINOv2(
        global_crop_size=32,
        local_crops_number=0,
        dino_local_weight=0.0,
        head_prototypes=16,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
        ibot_separate_head=False,
    )
    return LitWebSSL(objective, backbone="vit_debug", backbone_overrides=TINY, **kwargs)


def test_init_from_loads_every_tensor_and_names_a_wrong_file(tmp_path):
    source = _model()
    source.configure_model()
    state = {k: v + 0.01 for k, v in source.state_dict().items()}
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": state}, good)
    model = _model(init_from=str(good))
    model.configure_model()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key

    extra = tmp_path / "extra.ckpt"
    torch.save({"state_dict": {**state, "decoder.weight": torch.zeros(3)}}, extra)
    with pytest.raises(
        ConfigError,
        match=r"--model.init_from .*extra.ckpt: 1 tensors this model does not have "
        r"\(decoder.weight\)",
    ):
        _model(init_from=str(extra)).configure_model()
    shape = tmp_path / "shape.ckpt"
    torch.save({"state_dict": {**state, "backbone.norm.weight": torch.ones(7)}}, shape)
    with pytest.raises(
        ConfigError,
        match=r"shape.ckpt: backbone.norm.weight has shape \(7,\), this model's is "
        r"\(32,\)",
    ):
        _model(init_from=str(shape)).configure_model()
    with pytest.raises(ConfigError, match="--model.init_from: no file at"):
        _model(init_from=str(tmp_path / "missing.ckpt"))


def test_convert_a_single_file_to_fp32_atomically(tmp_path):
    model = _model()
    model.configure_model()
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    src = tmp_path / "bf16.ckpt"
    torch.save({"state_dict": half, "global_step": 7, "optimizer_states": [{}]}, src)
    out = tmp_path / "out" / "fp32.ckpt"
    result = run_cli("checkpoint", "convert", str(src), str(out))
    assert result.returncode == 0, result.stderr
    assert checkpoint_kind(out) == "file" and sorted(p.name for p in out.parent.iterdir()) == ["fp32.ckpt"]
    loaded = torch.load(out, weights_only=False)
    assert loaded["global_step"] == 7 and "optimizer_states" not in loaded
    assert all(v.dtype == torch.float32 for v in read_state_dict(out).values() if v.is_floating_point())
    with pytest.raises(ConfigError, match="sharded checkpoint folder"):
        (tmp_path / "dir").mkdir()
        (tmp_path / "dir" / ".metadata").write_bytes(b"")
        read_state_dict(tmp_path / "dir")
    bad = run_cli("checkpoint", "convert", str(tmp_path / "nothing"), str(tmp_path / "x.ckpt"))
    assert bad.returncode == 2 and bad.stderr.strip().endswith("no checkpoint there")
