"""Demo set, uint8 view transforms and the Streaming datamodule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_demo
from streaming import MDSWriter
from streaming.base.local import LocalDataset

from lit_webssl.datamodules import DataConfigError, MultiViewTransform, WebSSLDataModule, decode
from lit_webssl.datamodules.demo import CLASSES, build_demo_dataset
from lit_webssl.objectives.base import ViewSpec

VIEWS = [ViewSpec("global", size=32, count=2, scale=(0.3, 1.0), color_jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                  solarize_p=0.2),
         ViewSpec("local", size=16, count=3, scale=(0.05, 0.3))]


def test_demo_is_deterministic_balanced_and_described(tmp_path):
    a = build_demo_dataset(tmp_path / "a", n_train=40, n_val=20, image_size=32, seed=3)
    b = build_demo_dataset(tmp_path / "b", n_train=40, n_val=20, image_size=32, seed=3)
    assert LocalDataset(str(a), "train")[0]["image"] == LocalDataset(str(b), "train")[0]["image"]
    labels = [LocalDataset(str(a), "train")[i]["label"] for i in range(40)]
    assert np.bincount(labels).tolist() == [4] * len(CLASSES)
    assert json.loads((a / "classes.json").read_text())["classes"] == CLASSES
    sample = LocalDataset(str(a), "val")[0]
    assert CLASSES[sample["label"]] in sample["caption"]
    assert decode(sample["image"]).shape == (3, 32, 32)


def test_multiview_transform_shapes_and_seeded_determinism():
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    transform = MultiViewTransform(VIEWS)
    torch.manual_seed(0)
    first = transform(image)
    assert first["global"].shape == (2, 3, 32, 32) and first["global"].dtype == torch.uint8
    assert first["local"].shape == (3, 3, 16, 16)


def test_decode_rejects_garbage():
    with pytest.raises(ValueError, match="undecodable image"):
        decode(b"not an image at all")


@pytest.mark.parametrize("workers", [0, 2])
def test_datamodule_yields_views_labels_and_knn_sets(tmp_path, workers):
    root = tiny_demo(tmp_path, n_train=64, n_val=24)
    dm = WebSSLDataModule(str(root), batch_size=8, num_workers=workers, pin_memory=False)
    dm.set_views(VIEWS)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["views"]["global"].shape == (8, 2, 3, 32, 32)
    assert batch["views"]["local"].dtype == torch.uint8
    assert batch["label"].shape == (8,) and (batch["label"] >= 0).all()
    val = list(dm.val_dataloader())
    assert sum(len(b["label"]) for b in val) == 24
    bank, queries = dm.knn_dataloaders(size=32, batch_size=10)
    labels = torch.cat([b["label"] for b in bank])
    assert len(labels) == 64 and next(iter(queries))["image"].shape == (10, 3, 32, 32)


def test_views_of_a_sample_do_not_depend_on_workers(tmp_path):
    root = tiny_demo(tmp_path, n_train=32, n_val=8)
    seen = {}
    for workers in (0, 2):
        dm = WebSSLDataModule(str(root), batch_size=8, num_workers=workers, pin_memory=False, shuffle=False,
                              val_split=None)
        dm.set_views(VIEWS)
        batches = list(dm.train_dataloader())
        idx = torch.cat([b["index"] for b in batches])
        views = torch.cat([b["views"]["global"] for b in batches])
        seen[workers] = dict(zip(idx.tolist(), views))
    for i in seen[0]:
        assert torch.equal(seen[0][i], seen[2][i])


def test_missing_directory_and_split_name_the_flag(tmp_path):
    dm = WebSSLDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(DataConfigError, match="--data.local: no dataset directory"):
        dm.setup("fit")
    root = tiny_demo(tmp_path, n_train=20, n_val=10)
    with pytest.raises(DataConfigError, match="--data.val_split: no MDS index"):
        WebSSLDataModule(str(root), val_split="test").setup("fit")


def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "corrupt"
    good = LocalDataset(str(tiny_demo(tmp_path, n_train=10, n_val=10)), "train")
    with MDSWriter(out=str(root / "train"), columns={"image": "bytes", "label": "int"}) as writer:
        for i in range(8):
            image = b"\xff\xd8\xff garbage, not a jpeg" if i == 3 else good[i]["image"]
            writer.write({"image": image, "label": int(good[i]["label"])})
    dm = WebSSLDataModule(str(root), batch_size=8, num_workers=0, shuffle=False, val_split=None, pin_memory=False)
    dm.set_views(VIEWS[:1])
    batch = next(iter(dm.train_dataloader()))
    assert batch["corrupt"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert batch["views"]["global"].shape[0] == 8
    assert "skipping sample 3" in caplog.text
