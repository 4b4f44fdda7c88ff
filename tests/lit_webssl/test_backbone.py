"""The shared ViT: output contract, resolutions, masks, kept tokens, presets and their parameter counts."""

from __future__ import annotations

import pytest
import torch

from lit_webssl.models.presets import PRESETS, build_backbone
from lit_webssl.models.vit import VisionTransformer, sincos_pos_embed, swiglu_hidden
from lit_webssl.planner.plan import count_params

KEYS = {"x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"}


@pytest.fixture
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return build_backbone("vit_debug").eval()


@pytest.mark.parametrize("size", [32, 48])
def test_output_shapes_at_two_resolutions(vit, size):
    out = vit(torch.randn(2, 3, size, size))
    n = (size // 4) ** 2
    assert set(out) == KEYS
    assert out["x_norm_clstoken"].shape == (2, 32)
    assert out["x_norm_patchtokens"].shape == (2, n, 32)
    assert out["x_prenorm"].shape == (2, 1 + n, 32)
    torch.testing.assert_close(out["x_norm_clstoken"], vit.norm(out["x_prenorm"])[:, 0])


def test_native_resolution_uses_stored_grid_and_interpolation_is_exact_at_native(vit):
    assert vit.pos_embed_for(8, 8) is vit.pos_embed
    assert vit.pos_embed_for(12, 12).shape == (1, 145, 32)


def test_mask_tokens_replace_patch_embeddings_before_positions(vit):
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, :10] = True
    with torch.no_grad():
        vit.mask_token.normal_()
        tokens = vit.prepare_tokens(x, masks)
        expected = vit.mask_token + vit.pos_embed[0, 1:11]
    torch.testing.assert_close(tokens[0, 1:11], expected)
    torch.testing.assert_close(tokens[1], vit.prepare_tokens(x[1:], None)[0])
    out_masked, out_plain = vit(x, masks=masks), vit(x)
    torch.testing.assert_close(out_masked["x_prenorm"][1], out_plain["x_prenorm"][1])
    assert not torch.allclose(out_masked["x_prenorm"][0], out_plain["x_prenorm"][0])


def test_kept_indices_select_patches_with_their_positions(vit):
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[5, 0, 63], [1, 2, 3]])
    tokens = vit.prepare_tokens(x, keep_idx=keep)
    full = vit.prepare_tokens(x)
    assert tokens.shape == (2, 4, 32)
    torch.testing.assert_close(tokens[0, 1:], full[0, 1 + keep[0]])
    assert vit(x, keep_idx=keep)["x_norm_patchtokens"].shape == (2, 3, 32)


def test_crop_not_divisible_by_patch_is_a_clear_error(vit):
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        vit(torch.randn(1, 3, 30, 30))


def test_unknown_preset_and_override_name_the_flag():
    with pytest.raises(ValueError, match="--model.backbone: unknown preset 'vit_huge_typo'"):
        build_backbone("vit_huge_typo")
    with pytest.raises(ValueError, match="--model.backbone_overrides: unknown backbone argument"):
        build_backbone("vit_debug", {"widht": 3})


def test_swiglu_matches_dinov2_rule():
    assert swiglu_hidden(1536, 4.0) == 4096
    assert swiglu_hidden(4096, 4.0) == 10928
    assert swiglu_hidden(1024, 4.0) == 2736
    vit = build_backbone("vit_debug", {"ffn": "swiglu", "layerscale": 1e-5})
    assert vit.blocks[0].mlp.fc1.out_features == 2 * swiglu_hidden(32, 4.0)
    assert torch.allclose(vit.blocks[0].ls1.gamma, torch.full((32,), 1e-5))


# docs/recipe.md section 1: parameter counts of the Web-SSL family (billions).
EXPECTED = {
    "webdino_300m": 0.304,
    "webdino_1b": 1.135,
    "webdino_2b": 2.084,
    "webdino_3b": 2.948,
    "webdino_5b": 4.938,
    "webdino_7b": 6.450,
    "webmae_300m": 0.303,
    "webmae_700m": 0.631,
    "webmae_1b": 1.135,
    "webmae_2b": 2.084,
    "webmae_3b": 2.948,
    "vit_large": 0.303,
    "vit_base": 0.0858,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_with_the_recipe_parameter_count(name):
    vit = build_backbone(name, device="meta")
    assert all(p.is_meta for p in vit.parameters())
    count = count_params(vit) / 1e9
    if name in EXPECTED:
        assert count == pytest.approx(EXPECTED[name], rel=5e-3)


def test_sincos_is_fixed_and_matches_mae_layout():
    vit = build_backbone("vit_debug", {"pos_embed": "sincos"})
    assert not vit.pos_embed.requires_grad
    table = sincos_pos_embed(8, 2, 2)
    # first quarter is sin(x * omega): patch (row 0, col 1) has x = 1
    assert table[1, 0] == pytest.approx(torch.sin(torch.tensor(1.0)).item())
    assert table[2, 0] == 0.0  # (row 1, col 0) has x = 0
    torch.testing.assert_close(vit.pos_embed[0, 1:], sincos_pos_embed(32, 8, 8))
    assert vit.pos_embed_for(12, 12).shape == (1, 145, 32)
