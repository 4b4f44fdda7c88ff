"""Data: the Streaming datamodule over MDS shards, uint8 view transforms and the procedurally drawn demo set."""

from lit_webssl.datamodules.demo import build_demo_dataset
from lit_webssl.datamodules.streaming import (
    DataConfigError,
    LocalMDSDataset,
    MultiViewStreamingDataset,
    WebSSLDataModule,
)
from lit_webssl.datamodules.transforms import EvalTransform, MultiViewTransform, ViewTransform, decode, decode_image

__all__ = [
    "DataConfigError",
    "EvalTransform",
    "LocalMDSDataset",
    "MultiViewStreamingDataset",
    "MultiViewTransform",
    "ViewTransform",
    "WebSSLDataModule",
    "build_demo_dataset",
    "decode",
    "decode_image",
]
