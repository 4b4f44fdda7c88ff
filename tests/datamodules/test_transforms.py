"""uint8 view transforms: shapes, skipped operations, seeded determinism, the probe view and decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from lit_webssl.datamodules import EvalTransform, MultiViewTransform, ViewTransform, decode_image
from lit_webssl.objectives.base import ViewSpec

FULL = dict(color_jitter_p=1.0, grayscale_p=0.5, blur_p=1.0, solarize_p=0.5)
SPECS = [
    ViewSpec("mae", size=32, scale=(0.2, 1.0)),
    ViewSpec("local", size=16, count=3, scale=(0.05, 0.3), color_jitter_p=0.8, blur_p=0.5),
    ViewSpec("global", size=24, count=2, **FULL),
    ViewSpec("tiny", size=6, **FULL),  # smaller than the blur kernel
]


def _image(h: int = 50, w: int = 70, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_view_shape_and_dtype(spec):
    out = ViewTransform(spec)(_image())
    assert out.shape == (3, spec.size, spec.size) and out.dtype == torch.uint8


def test_multiview_counts_and_independent_crops():
    views = MultiViewTransform(SPECS)(_image())
    assert list(views) == [s.name for s in SPECS]
    for spec in SPECS:
        assert views[spec.name].shape == (spec.count, 3, spec.size, spec.size)
        assert views[spec.name].dtype == torch.uint8
    local = views["local"]
    assert not torch.equal(local[0], local[1]) and not torch.equal(local[1], local[2])


def test_zero_probability_operations_are_not_built():
    plain = ViewTransform(ViewSpec("x", size=32, hflip_p=0.0))
    assert [type(op) for op in plain.ops] == [v2.RandomResizedCrop]
    default = ViewTransform(ViewSpec("x", size=32))
    assert [type(op) for op in default.ops] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    assert len(ViewTransform(SPECS[2]).ops) == 8  # crop, flip, to float, jitter, grayscale, blur, solarize, to uint8
    assert len(ViewTransform(SPECS[2], photometric="uint8").ops) == 6


def test_identity_when_crop_is_whole_image_and_nothing_else_applies():
    image = _image(32, 32)
    spec = ViewSpec("x", size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0)
    for seed in range(5):
        torch.manual_seed(seed)
        assert torch.equal(ViewTransform(spec)(image), image)


def test_probability_one_operations_apply():
    gray = ViewTransform(ViewSpec("g", size=16, scale=(1.0, 1.0), grayscale_p=1.0))(_image(16, 16))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    flat = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    solarized = ViewTransform(ViewSpec("s", size=16, scale=(1.0, 1.0), hflip_p=0.0, solarize_p=1.0))(flat)
    assert (solarized == 55).all()
    flipped = ViewTransform(ViewSpec("f", size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=1.0))(_image(32, 32))
    assert torch.equal(flipped, _image(32, 32).flip(-1))


def test_seeded_determinism():
    transform, image = MultiViewTransform(SPECS), _image()
    torch.manual_seed(7)
    first = transform(image)
    torch.manual_seed(7)
    second = transform(image)
    torch.manual_seed(8)
    other = transform(image)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["global"], other["global"])


def test_multiview_rejects_empty_and_duplicate_names():
    with pytest.raises(ValueError, match="no views"):
        MultiViewTransform([])
    with pytest.raises(ValueError, match="distinct"):
        MultiViewTransform([ViewSpec("a", 8), ViewSpec("a", 16)])


def test_eval_transform_is_deterministic_resize_then_center_crop():
    image = _image(48, 80)
    transform = EvalTransform(32)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    assert torch.equal(first, transform(image))
    assert first.shape == (3, 32, 32) and first.dtype == torch.uint8
    resized = v2.functional.resize(image, [32, 53], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(first, resized[:, :, 10:42])
    square = _image(32, 32)
    assert torch.equal(EvalTransform(32)(square), square)


def test_decode_png_exactly_and_gray_to_rgb():
    rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    assert torch.equal(decode_image(_encoded(rgb, "PNG")), torch.from_numpy(rgb).permute(2, 0, 1))
    gray = decode_image(_encoded(rgb[..., 0], "PNG"))
    assert gray.shape == (3, 12, 20) and torch.equal(gray[0], gray[2])
    jpeg = decode_image(_encoded(rgb, "JPEG"))
    assert jpeg.shape == (3, 12, 20) and jpeg.dtype == torch.uint8


@pytest.mark.parametrize("data", [b"definitely not an image", b"", b"\x89PNG\r\n\x1a\n truncated"])
def test_decode_rejects_garbage(data):
    with pytest.raises(ValueError, match="undecodable image"):
        decode_image(data)


def test_16_bit_png_and_animated_gif_decode_to_8_bit_rgb():
    """Data made by other tools: a 16-bit PNG keeps its top 8 bits, an animated GIF its first frame."""
    deep = np.full((6, 5), 0xABCD, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    image = decode_image(buf.getvalue())
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 5) and int(image[0, 0, 0]) == 0xAB
    frames = [Image.new("RGB", (8, 4), colour) for colour in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    image = decode_image(buf.getvalue())
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 8) and image[:, 0, 0].tolist() == [255, 0, 0]
