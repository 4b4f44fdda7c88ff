"""Object storage: MDS shards on an S3 server on loopback (moto) read by the datamodule, the kNN probe and a CLI fit;
credentials come from the environment and never reach a saved config or a log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, fast_overrides, tiny_demo
from s3server import moto_server_fixture, s3_bucket_fixture  # noqa: F401  (pytest fixtures)
from streaming.base.local import LocalDataset

from lit_webssl.cli import main
from lit_webssl.datamodules import WebSSLDataModule
from lit_webssl.objectives.base import ViewSpec

N_TRAIN, N_VAL = 48, 20  # the demo_root fixture (conftest.py)
VIEWS = [ViewSpec("global", size=16, count=1, scale=(0.5, 1.0))]


def _remote_datamodule(bucket, cache: Path, prefix: str, **kwargs) -> WebSSLDataModule:
    kwargs = {"batch_size": 8, "num_workers": 0, "pin_memory": False, "caption_key": "caption", **kwargs}
    dm = WebSSLDataModule(str(cache), remote=bucket.url(prefix), **kwargs)
    dm.set_views(VIEWS)
    dm.setup("fit")
    return dm


def _labels(root: Path, split: str) -> list[int]:
    reader = LocalDataset(str(root), split)
    return [reader[i]["label"] for i in range(reader.size)]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_arrives_once_per_epoch_from_s3(demo_root, tmp_path, s3_bucket, workers):
    s3_bucket.upload_dir(demo_root, "demo")
    dm = _remote_datamodule(s3_bucket, tmp_path / "cache", "demo", num_workers=workers, batch_size=6)
    loader = dm.train_dataloader()
    local = _labels(demo_root, "train")
    for _ in range(2):  # two epochs of the same loader
        batches = list(loader)
        index = torch.cat([b["index"] for b in batches]).tolist()
        assert sorted(index) == list(range(N_TRAIN))
        assert torch.cat([b["label"] for b in batches]).tolist() == [local[i] for i in index]
        assert batches[0]["views"]["global"].shape == (6, 1, 3, 16, 16) and all(b["caption"][0] for b in batches)
    assert (tmp_path / "cache" / "train" / "index.json").is_file()  # the shards came through the local cache
    val = list(dm.val_dataloader())
    assert sorted(torch.cat([b["index"] for b in val]).tolist()) == list(range(N_VAL))


def test_knn_probe_loaders_download_the_remote_shards(demo_root, tmp_path, s3_bucket):
    s3_bucket.upload_dir(demo_root, "demo")
    dm = _remote_datamodule(s3_bucket, tmp_path / "cache", "demo", knn_train_samples=30)
    bank, queries = dm.knn_dataloaders(size=16, batch_size=7)
    assert torch.cat([b["label"] for b in bank]).tolist() == _labels(demo_root, "train")[:30]
    assert torch.cat([b["label"] for b in queries]).tolist() == _labels(demo_root, "val")
    assert sorted(p.name for p in (tmp_path / "cache" / "_knn_cache").iterdir()) == ["train", "val"]


def test_missing_remote_prefix_is_an_error_naming_the_object(tmp_path, s3_bucket):
    dm = WebSSLDataModule(
        str(tmp_path / "cache"), remote=s3_bucket.url("nothing-here"), num_workers=0, pin_memory=False
    )
    dm.set_views(VIEWS)
    with pytest.raises(Exception, match="nothing-here/train/index.json"):
        next(iter(dm.train_dataloader()))


@pytest.mark.slow  # whole fits in this process: the full suite, not the fast tier
def test_fit_on_s3_data_keeps_the_secret_out_of_configs_and_logs(tmp_path, s3_bucket, capfd):
    data = tiny_demo(tmp_path, n_train=32, n_val=16)
    remote = s3_bucket.upload_dir(data, "tiny")
    overrides = fast_overrides(tmp_path / "cache", steps=2, run_name="s3fit")
    main(["fit", "--config", str(CONFIGS / "demo" / "mae_tiny.yaml"), *overrides, "--data.init_args.remote", remote])
    out, err = capfd.readouterr()
    run = Path("runs/s3fit")
    config = (run / "version_0" / "config.yaml").read_text()
    assert f"remote: {remote}" in config and "local: " + str(tmp_path / "cache") in config
    assert "knn_top1" in json.loads((run / "version_0" / "metrics.json").read_text())  # the probe read s3 too
    written = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "last.ckpt" for p in written) and any(p.name.startswith("events.out") for p in written)
    secret = s3_bucket.secret.encode()
    assert [p for p in written if secret in p.read_bytes()] == []
    assert s3_bucket.secret not in out + err
