"""Callbacks: probes, schedules and run hygiene."""

from lit_webssl.callbacks.knn import KNNProbe
from lit_webssl.callbacks.resolution import ProgressiveResolution, ResolutionStage
from lit_webssl.callbacks.throughput import ThroughputMonitor

__all__ = ["KNNProbe", "ProgressiveResolution", "ResolutionStage", "ThroughputMonitor"]
