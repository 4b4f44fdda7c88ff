"""Mixtures of streams: the realized mix of an epoch, validation over every stream, resume, config errors, data blocks.

Realized vs configured: per-stream counts over an epoch equal Streaming's derived ``choose`` exactly (the epochs here
are whole batches, so nothing is dropped). ``choose`` is exact for ``choose`` and ``int(repeat x size)`` for
``repeat``; for ``proportion`` it is ``floor(p x epoch)``, plus one for as many streams (drawn with the shuffle seed)
as the floors fall short of the epoch size.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONFIGS
from streaming import MDSWriter
from streaming.base.local import LocalDataset

from lit_webssl.cli import WebSSLCLI
from lit_webssl.datamodules import DataConfigError, StreamSpec, WebSSLDataModule
from lit_webssl.objectives.base import ViewSpec
from lit_webssl.training.module import LitWebSSL

VIEWS = [ViewSpec("global", size=16, count=1, scale=(0.5, 1.0))]
SIZES = (8, 12, 8)  # training samples of streams 0, 1, 2 (4 validation samples each)
DATA_BLOCKS = sorted((CONFIGS / "data").glob("*.yaml"))


def _write(path: Path, images: list[bytes], labels: list[int]) -> None:
    with MDSWriter(out=str(path), columns={"image": "bytes", "label": "int"}, progress_bar=False) as writer:
        for image, label in zip(images, labels, strict=True):
            writer.write({"image": image, "label": label})


@pytest.fixture(scope="module")
def streams(tmp_path_factory, demo_root) -> list[Path]:
    """Three small datasets; the label of sample ``i`` of stream ``s`` is ``100 s + i``."""
    images = [LocalDataset(str(demo_root), "train")[i]["image"] for i in range(max(SIZES))]
    roots = []
    for s, size in enumerate(SIZES):
        root = tmp_path_factory.mktemp("streams") / f"s{s}"
        _write(root / "train", images[:size], [100 * s + i for i in range(size)])
        _write(root / "val", images[:4], [100 * s + i for i in range(4)])
        roots.append(root)
    return roots


def _datamodule(specs: list[dict], **kwargs) -> WebSSLDataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, "pin_memory": False, "shuffle_seed": 7, **kwargs}
    dm = WebSSLDataModule(streams=[StreamSpec(**s) for s in specs], **kwargs)
    dm.set_views(VIEWS)
    dm.setup("fit")
    return dm


def _epoch(loader) -> tuple[list[int], list[int], list[int]]:
    """(stream, index, label) of every sample of one pass."""
    batches = list(loader)
    return tuple(torch.cat([b[k] for b in batches]).tolist() for k in ("stream", "index", "label"))


@pytest.mark.parametrize(
    ("weights", "epoch_size", "workers"),
    [
        ([{"proportion": 0.5}, {"proportion": 0.25}, {"proportion": 0.25}], 32, 0),
        ([{"proportion": 1}, {"proportion": 1}, {"proportion": 1}], 32, 2),  # 10.67 each: floors + 2 spread
        ([{"repeat": 0.5}, {"choose": 20}, {}], None, 0),  # subsample, upsample, once
    ],
    ids=["proportion", "proportion_rounding_2_workers", "repeat_choose_none"],
)
def test_realized_mix_of_an_epoch_is_the_configured_one(streams, weights, epoch_size, workers):
    specs = [{"local": str(root), **w} for root, w in zip(streams, weights, strict=True)]
    dm = _datamodule(specs, epoch_size=epoch_size, num_workers=workers)
    loader = dm.train_dataloader()
    derived = [int(s.choose) for s in loader.dataset.streams]
    stream, index, label = _epoch(loader)
    counts = Counter(stream)
    assert [counts[s] for s in range(3)] == derived  # exact
    total = sum(derived)
    for s, w in enumerate(weights):
        if "proportion" in w:  # Streaming's rounding: the floor, or one more
            share = w["proportion"] / sum(x["proportion"] for x in weights) * total
            assert math.floor(share) <= derived[s] <= math.floor(share) + 1
        elif "repeat" in w:
            assert derived[s] == int(w["repeat"] * SIZES[s])
        else:
            assert derived[s] == w.get("choose", SIZES[s])
    per_sample = Counter(label)  # every sample of a stream drawn floor(r) or ceil(r) times, r = choose / size
    for s, size in enumerate(SIZES):
        r = derived[s] / size
        drawn = [per_sample[100 * s + i] for i in range(size)]
        assert sum(drawn) == derived[s] and all(math.floor(r) <= d <= math.ceil(r) for d in drawn), (s, drawn)
    offsets = [0, SIZES[0], SIZES[0] + SIZES[1]]  # `stream` and `index` agree: ids run over the concatenated streams
    assert all(offsets[s] <= i < offsets[s] + SIZES[s] for s, i in zip(stream, index, strict=True))
    assert all(lab // 100 == s for s, lab in zip(stream, label, strict=True))


def test_validation_reads_every_sample_of_every_stream_once(streams):
    dm = _datamodule([{"local": str(r), "proportion": p} for r, p in zip(streams, (0.9, 0.05, 0.05), strict=True)])
    stream, _, label = _epoch(dm.val_dataloader())
    assert sorted(label) == [100 * s + i for s in range(3) for i in range(4)]
    assert Counter(stream) == {0: 4, 1: 4, 2: 4}


def test_a_mixture_resumes_exactly_mid_epoch(streams):
    specs = [
        {"local": str(streams[0]), "repeat": 2},
        {"local": str(streams[1]), "choose": 4},
        {"local": str(streams[2])},
    ]  # 16 + 4 + 8 = 7 batches
    straight = [b["index"].tolist() for b in _datamodule(specs).train_dataloader()]
    first = _datamodule(specs).train_dataloader()
    seen = []
    for batch in first:
        seen.append(batch["index"].tolist())
        if len(seen) == 3:
            break
    state = first.state_dict()
    resumed = _datamodule(specs).train_dataloader()
    resumed.load_state_dict(state)
    assert seen + [b["index"].tolist() for b in resumed] == straight


def test_a_corrupt_image_is_replaced_from_its_own_stream(streams, tmp_path):
    good = LocalDataset(str(streams[0]), "train")
    images = [good[i]["image"] for i in range(4)]
    images[3] = images[3][: len(images[3]) // 2]  # the last sample of stream 0: truncated JPEG
    _write(tmp_path / "bad" / "train", images, [0, 1, 2, 3])
    dm = _datamodule([{"local": str(tmp_path / "bad")}, {"local": str(streams[1])}], val_split=None)
    dataset = dm.train_dataloader().dataset
    sample = dataset[3]
    assert (sample["stream"], sample["corrupt"], int(sample["label"])) == (0, 1, 0)  # wrapped to stream 0's first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"streams": [{"local": "a", "proportion": 0.7, "repeat": 2}]},
            "--data.streams[0]: give at most one of proportion, repeat, choose (got proportion and repeat)",
        ),
        (
            {"streams": [{"local": "a", "proportion": 0.7}, {"local": "b", "repeat": 2}]},
            "--data.streams[1].proportion: proportions are relative, so every stream needs one or none does",
        ),
        (
            {"streams": [{"local": "a", "repeat": 2}, {"local": "b", "proportion": 0.5}]},
            "--data.streams[0].proportion: proportions are relative",
        ),
        (
            {"streams": [{"local": "a"}, {"remote": "s3://bucket/b"}]},
            "--data.streams[1].local: every stream needs its own local directory",
        ),
        (
            {"streams": [{"local": "a"}, {"local": "./a"}]},
            "--data.streams[1].local: ./a is also --data.streams[0].local",
        ),
        ({"local": "a", "streams": [{"local": "b"}]}, "--data.streams: give either --data.local/--data.remote"),
        ({}, "--data.local: give the dataset directory (or --data.streams for a mixture)"),
        ({"streams": []}, "--data.streams: empty"),
        ({"streams": [{"local": "a", "repeat": -1}]}, "--data.streams[0].repeat must be >= 0, got -1"),
        (
            {"streams": [{"local": "a", "proportion": 0}, {"local": "b", "proportion": 0}]},
            "--data.streams: the proportions sum to 0",
        ),
        (
            {"streams": [{"local": "a", "choose": 10}, {"local": "b"}], "epoch_size": 100},
            "--data.epoch_size: only with proportions or unweighted streams; --data.streams[0].choose",
        ),
        ({"streams": [{"local": "a", "weight": 1}]}, "--data.streams[0]: unknown key 'weight'"),
        ({"local": "a", "epoch_size": 0}, "--data.epoch_size must be >= 1, got 0"),
        ({"local": "a", "download_retry": 0}, "--data.download_retry must be >= 1, got 0"),
        ({"local": "a", "download_timeout": 0}, "--data.download_timeout must be > 0 seconds, got 0"),
    ],
    ids=[
        "two_weights",
        "proportion_then_repeat",
        "repeat_then_proportion",
        "no_local",
        "same_local",
        "local_and_streams",
        "neither",
        "empty",
        "negative",
        "zero_proportions",
        "epoch_size_absolute",
        "unknown_key",
        "epoch_size",
        "retry",
        "timeout",
    ],
)
def test_contradictory_settings_stop_with_one_line_naming_the_flag(kwargs, message):
    with pytest.raises(DataConfigError) as err:
        WebSSLDataModule(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_stream_names_its_flag(streams, tmp_path):
    with pytest.raises(DataConfigError, match=r"--data.streams\[1\].local: no dataset directory at .*nowhere"):
        _datamodule([{"local": str(streams[0])}, {"local": str(tmp_path / "nowhere")}])


@pytest.mark.parametrize("block", DATA_BLOCKS, ids=lambda p: p.stem)
def test_data_blocks_compose_with_a_model_config(block):
    cli = WebSSLCLI(
        LitWebSSL,
        subclass_mode_data=True,
        run=False,
        plan=True,
        args=["--config", str(CONFIGS / "webdino" / "vit_2b.yaml"), "--config", str(block)],
    )
    expected = yaml.safe_load(block.read_text())["data"]["init_args"]["streams"]
    dm = cli.datamodule
    assert [s.local for s in dm.streams] == [s["local"] for s in expected]
    assert [s.proportion for s in dm.streams] == [s.get("proportion") for s in expected]
    assert dm.batch_size == 12 and dm.val_split is None  # the model config's data settings stay


def test_a_contradictory_mixture_in_yaml_fails_at_parse_time_naming_the_flag(tmp_path):
    block = tmp_path / "mix.yaml"
    block.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "class_path": "lit_webssl.datamodules.WebSSLDataModule",
                    "init_args": {
                        "local": None,
                        "streams": [{"local": "a", "proportion": 0.7}, {"local": "b", "repeat": 2}],
                    },
                }
            }
        )
    )
    with pytest.raises(ValueError) as err:  # jsonargparse wraps errors of a subclass-mode __init__ in its own
        WebSSLCLI(
            LitWebSSL,
            subclass_mode_data=True,
            run=False,
            plan=True,
            args=["--config", str(CONFIGS / "demo" / "mae_tiny.yaml"), "--config", str(block)],
        )
    chain, cause = [], err.value
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    assert any(
        isinstance(c, DataConfigError) and str(c).startswith("--data.streams[1].proportion: proportions are relative")
        for c in chain
    )
