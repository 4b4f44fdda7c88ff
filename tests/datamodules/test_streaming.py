"""The Streaming datamodule: batch layout, splits, kNN loaders, early config errors, corrupt-image tolerance (also
through a CLI fit and its logged metric), unreachable remotes and remotes with credentials."""

from __future__ import annotations

import csv
import inspect
import logging
import os
import re
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from helpers import CONFIGS, free_port
from streaming import LocalDataset, MDSWriter

from lit_webssl.cli import main
from lit_webssl.datamodules import DataConfigError, MultiViewStreamingDataset, StreamSpec, WebSSLDataModule
from lit_webssl.objectives.base import ViewSpec

N_TRAIN, N_VAL, SIZE = 48, 20, 40  # the demo_root fixture (conftest.py)
VIEWS = [
    ViewSpec("global", size=24, count=2, scale=(0.3, 1.0), color_jitter_p=0.8, grayscale_p=0.2, blur_p=0.5),
    ViewSpec("local", size=12, count=3, scale=(0.05, 0.3)),
]


def _datamodule(root: Path, **kwargs) -> WebSSLDataModule:
    kwargs = {"batch_size": 8, "num_workers": 0, "pin_memory": False, **kwargs}
    dm = WebSSLDataModule(str(root), **kwargs)
    dm.set_views(VIEWS)
    dm.setup("fit")
    return dm


def _write_mds(path: Path, images: list[bytes], labels: list[int] | None) -> None:
    columns = {"image": "bytes", **({"label": "int"} if labels is not None else {})}
    with MDSWriter(out=str(path), columns=columns, progress_bar=False) as writer:
        for i, image in enumerate(images):
            writer.write({"image": image, **({"label": labels[i]} if labels is not None else {})})


@pytest.mark.parametrize("workers", [0, 2])
def test_train_and_val_batches(demo_root, workers):
    dm = _datamodule(demo_root, num_workers=workers, caption_key="caption")
    batch = next(iter(dm.train_dataloader()))
    assert batch["views"]["global"].shape == (8, 2, 3, 24, 24)
    assert batch["views"]["local"].shape == (8, 3, 3, 12, 12)
    assert batch["views"]["global"].dtype == torch.uint8 and batch["views"]["local"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (8,)
    assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()
    assert batch["corrupt"].tolist() == [0] * 8
    assert len(batch["caption"]) == 8 and all(isinstance(c, str) and c for c in batch["caption"])
    val = list(dm.val_dataloader())
    assert sorted(torch.cat([b["index"] for b in val]).tolist()) == list(range(N_VAL))


def test_train_epoch_drops_last_and_covers_samples_once(demo_root):
    batches = list(_datamodule(demo_root, batch_size=10).train_dataloader())
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert all(len(b["label"]) == 10 for b in batches) and len(seen) == len(set(seen)) == N_TRAIN // 10 * 10


def test_views_are_handed_over_and_required_text_needs_captions(demo_root):
    dm = WebSSLDataModule(str(demo_root), num_workers=0, pin_memory=False)
    dm.setup("fit")
    with pytest.raises(DataConfigError, match=r"^--data: no views set; .*set_views\(objective.views\(\)\)$"):
        dm.train_dataloader()
    dm.set_views(VIEWS[:1])
    assert dm.views == VIEWS[:1]
    assert WebSSLDataModule(str(demo_root), views=VIEWS[:1]).views == VIEWS[:1]
    dm.set_text_transform(None, required_by="CLIP")
    with pytest.raises(DataConfigError, match=f"^--data.caption_key: CLIP needs captions; .* at {demo_root}$"):
        dm.setup("fit")
    dm.set_text_transform(None)  # optional again
    dm.setup("fit")


def test_the_objectives_text_transform_runs_in_the_workers(demo_root):
    from lit_webssl.objectives import CLIP

    objective = CLIP(crop_size=24, context_length=20)
    dm = WebSSLDataModule(str(demo_root), batch_size=8, num_workers=1, pin_memory=False, caption_key="caption")
    dm.set_views(objective.views())
    dm.set_text_transform(objective.text_transform(), required_by="CLIP")
    dm.setup("fit")
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        assert batch["text"].shape == (8, 20) and batch["text"].dtype == torch.int64
        assert torch.equal(batch["text"], objective.tokenizer.batch(batch["caption"]))
        assert (batch["text"][:, 0] == 49406).all()  # SOT


def test_views_of_a_sample_do_not_depend_on_workers(demo_root):
    seen = {}
    for workers in (0, 2):
        batches = list(_datamodule(demo_root, num_workers=workers, shuffle=False).train_dataloader())
        index = torch.cat([b["index"] for b in batches]).tolist()
        seen[workers] = dict(zip(index, torch.cat([b["views"]["global"] for b in batches]), strict=True))
    assert seen[0].keys() == seen[2].keys()
    assert all(torch.equal(seen[0][i], seen[2][i]) for i in seen[0])


def test_knn_loaders_return_every_sample_once_in_order(demo_root):
    dm = _datamodule(demo_root)
    bank, queries = dm.knn_dataloaders(size=16, batch_size=7)
    images = [b["image"] for b in bank]
    assert images[0].shape == (7, 3, 16, 16) and images[0].dtype == torch.uint8 and len(images[-1]) == N_TRAIN % 7
    for loader, split in ((bank, "train"), (queries, "val")):
        labels = torch.cat([b["label"] for b in loader])
        reader = LocalDataset(str(demo_root), split)
        assert labels.dtype == torch.int64 and labels.tolist() == [reader[i]["label"] for i in range(len(reader))]


def test_knn_caps_and_label_errors(demo_root, tmp_path):
    bank, queries = _datamodule(demo_root, knn_train_samples=10, knn_val_samples=100).knn_dataloaders(16, 4)
    assert sum(len(b["label"]) for b in bank) == 10 and sum(len(b["label"]) for b in queries) == N_VAL
    with pytest.raises(DataConfigError, match="--data.label_key"):
        _datamodule(demo_root, label_key=None).knn_dataloaders(16, 4)
    image = LocalDataset(str(demo_root), "val")[0]["image"]
    for split in ("train", "val"):
        _write_mds(tmp_path / "unlabelled" / split, [image] * 4, labels=None)
    dm = _datamodule(tmp_path / "unlabelled", batch_size=4)
    assert next(iter(dm.train_dataloader()))["label"].tolist() == [-1] * 4
    with pytest.raises(DataConfigError, match="--data.label_key: split 'train' has no label column"):
        dm.knn_dataloaders(16, 4)


def test_no_val_split_means_no_validation(demo_root):
    dm = _datamodule(demo_root, val_split=None)
    assert dm.val_dataloader() == []
    with pytest.raises(DataConfigError, match="--data.val_split"):
        dm.knn_dataloaders(16, 4)


def test_missing_data_fails_early_naming_the_flag(demo_root, tmp_path):
    with pytest.raises(DataConfigError, match=r"--data.local: no dataset directory at .*nowhere.*data demo"):
        WebSSLDataModule(str(tmp_path / "nowhere")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataConfigError, match=r"--data.local: no MDS index at .*empty/train/index.json"):
        WebSSLDataModule(str(tmp_path / "empty")).setup("fit")
    with pytest.raises(DataConfigError, match=r"--data.val_split: no MDS index at .*test/index.json.*train, val"):
        WebSSLDataModule(str(demo_root), val_split="test").setup("fit")
    with pytest.raises(DataConfigError, match="--data.image_key: split 'train'"):
        WebSSLDataModule(str(demo_root), image_key="jpg").setup("fit")
    with pytest.raises(DataConfigError, match="--data.batch_size must be >= 1"):
        WebSSLDataModule(str(demo_root), batch_size=0)


def test_corrupt_image_is_skipped_counted_and_logged_once(demo_root, tmp_path, caplog):
    good = LocalDataset(str(demo_root), "train")
    images = [good[i]["image"] for i in range(8)]
    images[3] = b"\xff\xd8\xff\xe0 this is not a JPEG"
    _write_mds(tmp_path / "bad" / "train", images, labels=list(range(8)))
    dm = _datamodule(tmp_path / "bad", val_split=None, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="lit_webssl.datamodules.datasets"):
        batch = next(iter(dm.train_dataloader()))
        assert batch["corrupt"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
        assert batch["label"].tolist() == [0, 1, 2, 4, 4, 5, 6, 7]  # sample 3 was replaced by sample 4
        assert batch["views"]["global"].shape == (8, 2, 3, 24, 24)
        dataset = MultiViewStreamingDataset(views=VIEWS, local=str(tmp_path / "bad"), split="train")
        dataset[3], dataset[3]
    warnings = [r.getMessage() for r in caplog.records if "skipping sample 3" in r.getMessage()]
    assert len(warnings) == 2 and "shard.00000.mds" in warnings[0]  # once per dataset instance


def test_remote_reads_through_a_local_cache(demo_root, tmp_path):
    dm = _datamodule(tmp_path / "cache", remote=str(demo_root))
    batch = next(iter(dm.train_dataloader()))
    assert batch["views"]["global"].shape == (8, 2, 3, 24, 24)
    bank, queries = dm.knn_dataloaders(size=SIZE, batch_size=16)
    assert sum(len(b["label"]) for b in bank) == N_TRAIN and sum(len(b["label"]) for b in queries) == N_VAL
    assert (tmp_path / "cache" / "_knn_cache" / "val" / "index.json").is_file()


# -- corrupt data, unreachable remotes, credentials ---------------------------------------------------------------
def _fit_config(tmp_path: Path, block: dict) -> list[str]:
    """mae_tiny shrunk to one block, without the kNN probe, then ``block`` as a second config."""
    config = yaml.safe_load((CONFIGS / "demo" / "mae_tiny.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    config["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].endswith(("KNNProbe", "ProgressBar"))]
    config["trainer"].update(
        enable_progress_bar=False,
        log_every_n_steps=1,
        limit_val_batches=0,
        val_check_interval=None,
        check_val_every_n_epoch=1,
    )
    config["model"]["backbone_overrides"].update(embed_dim=32, depth=1, num_heads=2)
    config["model"]["objective"]["init_args"].update(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "block.yaml").write_text(
        yaml.safe_dump({"data": {"class_path": "lit_webssl.datamodules.WebSSLDataModule", "init_args": block}})
    )
    return ["fit", "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "block.yaml")]


def test_truncated_jpegs_in_a_shard_are_skipped_and_counted_by_a_cli_fit(demo_root, tmp_path):
    good = LocalDataset(str(demo_root), "train")
    images = [good[i]["image"] for i in range(16)]
    _write_mds(tmp_path / "clean" / "train", images[:8], labels=list(range(8)))
    planted = images[8:]
    for i in (2, 5):  # not adjacent: each costs one substitution
        planted[i] = planted[i][: len(planted[i]) // 2]
    _write_mds(tmp_path / "planted" / "train", planted, labels=list(range(8)))
    block = {
        "local": None,
        "streams": [{"local": str(tmp_path / "clean")}, {"local": str(tmp_path / "planted")}],
        "val_split": None,
        "batch_size": 8,
        "num_workers": 1,
        "pin_memory": False,
    }
    main([*_fit_config(tmp_path, block), "--run_name", "corrupt", "--trainer.max_steps", "2"])  # one epoch of 16
    rows = list(csv.DictReader((Path("runs/corrupt/version_0/metrics.csv")).open()))
    logged = [float(r["train/corrupt_samples"]) for r in rows if r.get("train/corrupt_samples")]
    assert logged == [2.0]
    assert int(rows[-1]["step"]) == 1 and Path("runs/corrupt/checkpoints/last.ckpt").is_file()


@pytest.fixture
def closed_s3(monkeypatch) -> str:
    """An S3 endpoint on a closed port of 127.0.0.1, dummy credentials and one boto attempt per Streaming try."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    for key, value in {
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "dummy",
        "AWS_SECRET_ACCESS_KEY": "dummy",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }.items():
        monkeypatch.setenv(key, value)
    return endpoint


def test_an_unreachable_remote_stops_the_fit_fast_with_one_line(closed_s3, tmp_path, capsys):
    block = {
        "local": str(tmp_path / "cache"),
        "remote": "s3://bucket/mc2b",
        "download_retry": 2,
        "download_timeout": 2,
        "val_split": None,
        "num_workers": 0,
    }
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        main([*_fit_config(tmp_path, block), "--run_name", "unreachable", "--trainer.max_steps", "1"])
    assert time.monotonic() - start < 30
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    expected = "error: --data.remote s3://bucket/mc2b unreachable after 2 tries: EndpointConnectionError: "
    assert err.strip().splitlines()[-1].startswith(expected + "Could not connect")


def _unreachable_on_two_ranks(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dm = WebSSLDataModule(str(Path(out) / "cache"), remote="s3://bucket/mc2b", download_retry=1, val_split=None)
        with pytest.raises(DataConfigError) as err:
            dm.setup("fit")
        Path(out, f"rank{rank}.txt").write_text(str(err.value))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_every_rank_stops_with_the_downloading_ranks_error(closed_s3, tmp_path):
    """Only the first rank of a node downloads; the others must not wait for a file that never comes."""
    mp.start_processes(_unreachable_on_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert messages[0].startswith("--data.remote s3://bucket/mc2b unreachable after 1 try: ")


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"local": "cache", "remote": "s3://AKIAKEYID:sEcReT123@bucket/mc2b"}, "--data.remote"),
        ({"local": "cache", "remote": "s3://bucket/mc2b?X-Amz-Signature=sEcReT123"}, "--data.remote"),
        (
            {"streams": [{"local": "a"}, {"local": "b", "remote": "gs://tok:sEcReT123@bucket/x"}]},
            "--data.streams[1].remote",
        ),
        ({"local": "cache", "remote": "sftp://user:sEcReT123@host/data"}, "--data.remote"),
    ],
    ids=["userinfo", "query", "stream", "sftp_password"],
)
def test_remotes_with_credentials_are_refused_without_echoing_them(kwargs, flag):
    with pytest.raises(DataConfigError) as err:
        WebSSLDataModule(**kwargs)
    message = str(err.value)
    assert message.startswith(f"{flag}: ") and "embeds credentials" in message
    assert "sEcReT123" not in message and "AKIAKEYID" not in message and "\n" not in message


def test_the_datamodule_takes_no_secrets():
    names = set(inspect.signature(WebSSLDataModule).parameters) | {f.name for f in fields(StreamSpec)}
    assert not [n for n in names if re.search(r"key_id|secret|token|password|credential|access_key", n)]
    WebSSLDataModule("cache", remote="sftp://user@host/data")  # an account name is no secret
    WebSSLDataModule("cache", remote="s3://bucket/mc2b")
