"""Frozen-encoder evaluation: kNN classification."""
