"""``plan``: per-device memory of a configured run, built on the meta device."""
