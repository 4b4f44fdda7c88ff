"""Float photometric kernels against torchvision's uint8 kernels: the same values (or within rounding)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from lit_webssl.datamodules import photometric as photo
from lit_webssl.datamodules.transforms import MultiViewTransform
from lit_webssl.objectives.base import ViewSpec


def _images(n: int = 6, size: int = 40) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen) for _ in range(n)]
    images.append(torch.full((3, size, size), 128, dtype=torch.uint8))  # grey: zero chroma
    smooth = torch.nn.functional.interpolate(images[0][None].float(), scale_factor=0.25, mode="bilinear")
    images.append(torch.nn.functional.interpolate(smooth, size=(size, size), mode="bilinear")[0].round().byte())
    return images


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (photo.adjust_brightness, TF.adjust_brightness, (0.6, 0.93, 1.0, 1.37)),
        (photo.adjust_contrast, TF.adjust_contrast, (0.6, 0.93, 1.0, 1.37)),
        (photo.adjust_saturation, TF.adjust_saturation, (0.0, 0.8, 1.0, 1.2)),
    ],
    ids=["brightness", "contrast", "saturation"],
)
def test_exact_kernels_equal_torchvision(ours, theirs, factors):
    for image in _images():
        for factor in factors:
            assert torch.equal(ours(image.float(), factor).byte(), theirs(image, factor)), factor


def test_grayscale_and_solarize_equal_torchvision():
    for image in _images():
        gray = photo.FloatGrayscale(p=1.0)(image.float()).byte()
        assert torch.equal(gray, TF.rgb_to_grayscale(image, num_output_channels=3))
        solarized = photo.FloatSolarize(threshold=128, p=1.0)(image.float()).byte()
        assert torch.equal(solarized, TF.solarize(image, 128))


def test_hue_within_one_level_of_torchvision():
    differing = total = 0
    for image in _images():
        for factor in (-0.1, -0.03, 0.0, 0.05, 0.1, 0.5):
            diff = (photo.adjust_hue(image.float(), factor) - TF.adjust_hue(image, factor).float()).abs()
            assert diff.max() <= 1, factor
            differing += int((diff > 0).sum())
            total += diff.numel()
    assert differing / total < 1e-3


def test_blur_within_one_level_of_torchvision():
    for image in _images():
        for sigma in (0.1, 0.7, 2.0):
            ours = photo.gaussian_blur(image.float(), 9, sigma)
            theirs = TF.gaussian_blur(image, [9, 9], [sigma, sigma]).float()
            assert (ours - theirs).abs().max() <= 1, sigma


def test_views_match_the_uint8_pipeline_under_the_same_seed():
    specs = [
        ViewSpec("g", 32, scale=(0.3, 1.0), color_jitter_p=0.8, grayscale_p=0.2, blur_p=1.0, solarize_p=0.2),
        ViewSpec("l", 16, count=4, scale=(0.05, 0.3), color_jitter_p=0.8, grayscale_p=0.2, blur_p=0.5),
    ]
    fast, reference = MultiViewTransform(specs), MultiViewTransform(specs, photometric="uint8")
    differing = total = 0
    for seed, image in enumerate(_images(size=64)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            a = fast(image)
            torch.manual_seed(seed)
            b = reference(image)
        for key in a:
            assert a[key].dtype == torch.uint8 and a[key].shape == b[key].shape
            diff = (a[key].int() - b[key].int()).abs()
            assert diff.max() <= 4, key
            differing += int((diff > 0).sum())
            total += diff.numel()
    assert differing / total < 1e-3


def test_unknown_kernel_choice_is_refused():
    with pytest.raises(ValueError, match="photometric"):
        MultiViewTransform([ViewSpec("g", 32)], photometric="fp16")
