"""Checking one encoded image: kept as it is when training decodes it, else re-encoded as JPEG, else skipped."""

from __future__ import annotations

import io

from lit_webssl.datamodules.convert.plan import JPEG_QUALITY, Skip


def prepare_image(data: bytes, min_size: int = 0) -> tuple[bytes, bool]:
    """Check one encoded image and return the bytes to store.

    The original bytes are kept when :func:`lit_webssl.datamodules.transforms.decode_image` decodes them to one
    uint8 RGB image; otherwise an image that PIL can decode in full (BMP, TIFF, 16-bit PNG, a JPEG torchvision
    rejects...) is re-encoded as a quality-95 JPEG. Truncated and corrupt files are refused, not repaired.

    Args:
        data: The encoded file's bytes.
        min_size: Smallest accepted shorter side, in pixels (0: any).

    Returns:
        The bytes to store and whether they were re-encoded.

    Raises:
        Skip: ``undecodable`` (neither decoder reads it) or ``too_small`` (shorter side below ``min_size``).
    """
    import torch
    from PIL import Image

    from lit_webssl.datamodules.transforms import decode_image

    try:
        image = decode_image(data)
        if image.dtype == torch.uint8 and image.ndim == 3:
            height, width = image.shape[-2:]
            _check_size(int(width), int(height), min_size)
            return data, False
        first_error = f"decoded as {tuple(image.shape)} {image.dtype}, not one uint8 RGB image"
    except ValueError as err:
        first_error = str(err)
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            rgb = picture.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise Skip("undecodable", first_error) from err
    _check_size(rgb.width, rgb.height, min_size)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    encoded = buffer.getvalue()
    decode_image(encoded)  # the stored bytes must decode on the training side
    return encoded, True


def _check_size(width: int, height: int, min_size: int) -> None:
    if min(width, height) < min_size:
        raise Skip("too_small", f"{width}x{height} px, shorter side below --min-size {min_size}")
