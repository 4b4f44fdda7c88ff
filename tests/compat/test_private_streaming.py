"""The Streaming internals lit_webssl relies on (lit_webssl/compat/streaming.py), checked on the installed release: an
upgrade that changes one fails here, loudly, instead of silently in a run."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from streaming import MDSWriter, Stream, StreamingDataset
from streaming.base.format import reader_from_json
from streaming.base.util import clean_stale_shared_memory

from lit_webssl.compat import streaming as compat

WORLD = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Streaming keeps lock files in TMPDIR and shared memory per dataset: a world of one, isolated and cleaned."""
    for name in WORLD:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    clean_stale_shared_memory()
    yield
    for name in WORLD:  # a test may have set a larger world; cleaning in one would wait for the others
        monkeypatch.delenv(name, raising=False)
    clean_stale_shared_memory()


def _write(root: Path, n: int, first: int = 0, size_limit: int = 1 << 10) -> Path:
    """An MDS split of ``n`` samples ``{"value": first + i, "blob": 200 bytes}`` in several shards."""
    with MDSWriter(out=str(root), columns={"value": "int", "blob": "bytes"}, size_limit=size_limit) as writer:
        for i in range(n):
            writer.write({"value": first + i, "blob": bytes([i % 256]) * 200})
    return root


def _dataset(tmp_path: Path, **kwargs) -> StreamingDataset:
    streams = [Stream(local=str(_write(tmp_path / "a", 10))), Stream(local=str(_write(tmp_path / "b", 6, first=100)))]
    return StreamingDataset(streams=streams, batch_size=2, shuffle=False, **kwargs)


def test_world_ranks_reads_the_environment(monkeypatch):
    assert compat.world_ranks() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert compat.world_ranks() == 4


def test_stream_shards_lists_the_shards_in_index_order(tmp_path):
    root = _write(tmp_path / "a", 10)
    shards = compat.stream_shards(Stream(local=str(root)))
    index = json.loads((root / "index.json").read_text())["shards"]
    assert len(shards) == len(index) > 1
    assert [s.samples for s in shards] == [s["samples"] for s in index]


def test_where_a_sample_lives_and_its_stream(tmp_path):
    dataset = _dataset(tmp_path, shuffle_seed=1234)
    assert compat.stream_span(dataset, 0) == (0, 10) and compat.stream_span(dataset, 1) == (10, 16)
    assert [compat.stream_of(dataset, i) for i in (0, 9, 10, 15)] == [0, 0, 1, 1]
    location = compat.sample_location(dataset, 12)
    assert location is not None and location.startswith("#")
    shard = location.split(" of shard ", 1)[1]
    assert os.path.isfile(shard) and shard.startswith(str(tmp_path / "b"))
    assert dataset.get_item(12)["value"] == 102
    assert compat.sample_location(object(), 0) is None
    assert compat.shuffle_seed(dataset) == 1234
    assert compat.replication(dataset) == 1 and compat.replication(object()) == 1


def test_epoch_of_counts_started_epochs(tmp_path):
    dataset = _dataset(tmp_path)
    assert compat.epoch_of(dataset) == 0
    assert len(list(dataset)) == 16 and compat.epoch_of(dataset) == 0
    first = next(iter(dataset))
    assert compat.epoch_of(dataset) == 1 and first["value"] == 0


def test_the_loader_counts_samples_through_the_hook(tmp_path):
    def collate(samples):
        values = torch.tensor([s["value"] for s in samples])
        return {"views": {"a": values, "b": values, "c": values}, "index": values}

    class Counting(compat.SampleCountingLoader):
        def samples_in(self, batch):
            return len(batch["index"])

    for loader, per_batch in (
        (compat.SampleCountingLoader(_dataset(tmp_path / "stock"), batch_size=2, collate_fn=collate), 3),
        (Counting(_dataset(tmp_path / "hook"), batch_size=2, collate_fn=collate), 2),
    ):
        batches = iter(loader)
        for _ in range(3):
            next(batches)
        # Streaming's own count takes the length of a dict batch's first value (here 3 view names)
        assert loader.state_dict()["sample_in_epoch"] == 3 * per_batch


def test_written_shards_are_the_index_entries(tmp_path):
    writer = MDSWriter(out=str(tmp_path / "out"), columns={"value": "int"}, size_limit=1 << 10)
    for i in range(300):
        writer.write({"value": i})
    writer.finish()
    shards = compat.written_shards(writer)
    assert len(shards) > 1 and shards == json.loads((tmp_path / "out" / "index.json").read_text())["shards"]


def test_uploader_schemes():
    schemes = compat.uploader_schemes()
    assert {"s3", "gs", "oci"} <= set(schemes) and "" not in schemes and not any(":" in s for s in schemes)


def test_bytes_are_written_as_given_whatever_the_encoding(tmp_path):
    columns = {"image": "jpeg", "value": "int", "caption": "str"}
    encoded = {"image": b"not a jpeg, stored as given", "value": (7).to_bytes(8, "little"), "caption": b"caption"}
    with MDSWriter(out=str(tmp_path / "out"), columns=columns) as writer:
        compat.write_encoded(writer, encoded)
        compat.write_encoded(writer, {"image": b"\xff\xd8", "value": 8, "caption": "encoded by the writer"})
    info = json.loads((tmp_path / "out" / "index.json").read_text())["shards"][0]
    assert dict(zip(info["column_names"], info["column_encodings"], strict=True)) == columns
    reader = reader_from_json(str(tmp_path / "out"), "", {**info, "column_encodings": ["bytes"] * 3})
    assert reader.get_item(0) == encoded
    assert reader.get_item(1) == {
        "image": b"\xff\xd8",
        "value": (8).to_bytes(8, "little"),
        "caption": b"encoded by the writer",
    }
    plain_image = [
        ("bytes" if n == "image" else e) for n, e in zip(info["column_names"], info["column_encodings"], strict=True)
    ]
    decoded = reader_from_json(str(tmp_path / "out"), "", {**info, "column_encodings": plain_image}).get_item(0)
    assert decoded["value"] == 7 and decoded["caption"] == "caption"


def test_an_unsupported_release_stops_with_one_line(monkeypatch):
    from lit_webssl.compat import UnsupportedVersion, require

    with pytest.raises(UnsupportedVersion, match="^mosaicml-streaming .* is not supported"):
        require("mosaicml-streaming", "0.1", "0.2")
    assert compat.VERSION.startswith("0.13")
