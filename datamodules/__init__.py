"""Data: the Streaming datamodule over MDS shards (one dataset or a mixture of streams), uint8 view transforms and
the procedurally drawn demo set."""

from lit_webssl.datamodules.demo import build_demo_dataset
from lit_webssl.datamodules.streaming import (
    DataConfigError,
    LocalMDSDataset,
    MultiViewStreamingDataset,
    StreamSpec,
    WebSSLDataModule,
)
from lit_webssl.datamodules.transforms import EvalTransform, MultiViewTransform, ViewTransform, decode, decode_image

__all__ = [
    "DataConfigError",
    "EvalTransform",
    "LocalMDSDataset",
    "MultiViewStreamingDataset",
    "MultiViewTransform",
    "StreamSpec",
    "ViewTransform",
    "WebSSLDataModule",
    "build_demo_dataset",
    "decode",
    "decode_image",
]
