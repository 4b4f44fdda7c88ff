"""The demo set: determinism, balance, metadata, rebuild rules, captions, and that pixels do not solve it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from streaming.base.local import LocalDataset

from lit_webssl.datamodules import EvalTransform, build_demo_dataset, decode_image
from lit_webssl.datamodules.demo import CLASSES, main, render
from lit_webssl.eval.knn import knn_top1
from lit_webssl.objectives.base import IMAGENET_MEAN, IMAGENET_STD, normalize_uint8


def _column(root, split: str, key: str) -> list:
    reader = LocalDataset(str(root), split)
    return [reader[i][key] for i in range(len(reader))]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = build_demo_dataset(tmp_path / "a", n_train=20, n_val=10, image_size=32, seed=3)
    b = build_demo_dataset(tmp_path / "b", n_train=20, n_val=10, image_size=32, seed=3)
    c = build_demo_dataset(tmp_path / "c", n_train=20, n_val=10, image_size=32, seed=4)
    for split in ("train", "val"):
        assert _column(a, split, "image") == _column(b, split, "image")
        assert _column(a, split, "caption") == _column(b, split, "caption")
    assert _column(a, "train", "image")[0] != _column(c, "train", "image")[0]
    assert _column(a, "train", "image")[0] not in _column(a, "val", "image")


def test_balanced_classes_metadata_and_images(tmp_path):
    root = build_demo_dataset(tmp_path / "demo", n_train=50, n_val=30, image_size=40, seed=0)
    assert np.bincount(_column(root, "train", "label")).tolist() == [5] * len(CLASSES)
    assert np.bincount(_column(root, "val", "label")).tolist() == [3] * len(CLASSES)
    meta = json.loads((root / "classes.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["n_train"] == 50 and meta["image_size"] == 40
    reader = LocalDataset(str(root), "val")
    for i in range(len(reader)):
        sample = reader[i]
        assert CLASSES[sample["label"]] in sample["caption"]
        assert decode_image(sample["image"]).shape == (3, 40, 40)
    assert not list(tmp_path.glob("*.partial"))


def test_complete_build_is_kept_unless_overwrite(tmp_path, capsys):
    root = build_demo_dataset(tmp_path / "demo", n_train=10, n_val=10, image_size=24)
    index = root / "train" / "index.json"
    stamp = index.stat().st_mtime_ns
    assert main(["--out", str(root), "--train", "10", "--val", "10", "--size", "24"]) == root
    assert "already complete" in capsys.readouterr().out and index.stat().st_mtime_ns == stamp
    build_demo_dataset(root, n_train=10, n_val=10, image_size=24, overwrite=True)
    assert index.stat().st_mtime_ns != stamp
    build_demo_dataset(root, n_train=20, n_val=10, image_size=24)  # other arguments: rebuilt
    assert len(LocalDataset(str(root), "train")) == 20


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--out: .* is not a demo dataset"):
        build_demo_dataset(tmp_path / "mine", n_train=10, n_val=10, image_size=24)
    assert (tmp_path / "mine" / "notes.txt").is_file()


def test_every_class_renders_at_several_sizes():
    rng = np.random.default_rng(0)
    for size in (24, 64, 160):
        for label in range(len(CLASSES)):
            picture, caption = render(label, rng, size)
            assert picture.size == (size, size) and picture.mode == "RGB" and CLASSES[label] in caption


def test_raw_pixels_do_not_solve_it(tmp_path):
    """Pixel-space kNN (cosine, k=20) stays far from solving the set: the class is the pattern, not its colours."""
    root = build_demo_dataset(tmp_path / "demo", n_train=1000, n_val=200, image_size=64, seed=0)
    probe = EvalTransform(32)

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([probe(decode_image(b)) for b in _column(root, split, "image")])
        labels = torch.tensor(_column(root, split, "label"))
        return normalize_uint8(images, IMAGENET_MEAN, IMAGENET_STD).flatten(1), labels

    top1 = knn_top1(*features("train"), *features("val"), k=20)
    assert top1 < 0.35
