"""Callbacks: probes, schedules and run hygiene."""

from lit_webssl.callbacks.knn import KNNProbe

__all__ = ["KNNProbe"]
