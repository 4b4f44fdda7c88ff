"""Data: the Streaming datamodule, uint8 view transforms and the embedded demo set."""

from lit_webssl.datamodules.datamodule import WebSSLDataModule
from lit_webssl.datamodules.streaming import DataConfigError, LocalMDSDataset, MultiViewStreamingDataset
from lit_webssl.datamodules.transforms import EvalTransform, MultiViewTransform, ViewTransform, decode

__all__ = [
    "DataConfigError", "EvalTransform", "LocalMDSDataset", "MultiViewStreamingDataset", "MultiViewTransform",
    "ViewTransform", "WebSSLDataModule", "decode",
]
