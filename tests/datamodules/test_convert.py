"""The converters (image folder, webdataset tars, parquet -> MDS): bad inputs and their manifest, resume after a
kill, flag errors, object storage, and training on the result."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from s3server import moto_server_fixture, s3_bucket_fixture  # noqa: F401  (pytest fixtures)
from streaming import LocalDataset

from lit_webssl.cli import main as cli_main
from lit_webssl.datamodules import WebSSLDataModule, decode_image
from lit_webssl.datamodules import convert as cv
from lit_webssl.objectives.base import ViewSpec

VIEWS = [ViewSpec("global", size=16, count=1, scale=(0.5, 1.0))]
DEFAULTS = ["--no-progress", "--workers", "1", "--min-size", "16"]  # later flags override these


def _encode(seed: int, size: tuple[int, int] = (40, 32), fmt: str = "JPEG") -> bytes:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


BAD = {  # name -> (bytes, reason in the manifest)
    "corrupt.jpg": (b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 4, "undecodable"),
    "truncated.jpg": (_encode(99)[:400], "undecodable"),
    "tiny.png": (_encode(98, (6, 6), "PNG"), "too_small"),
    "text.png": (b"just some text, not an image\n", "undecodable"),
}


def _read(root: Path, split: str = "train") -> list[dict]:
    reader = LocalDataset(str(root), split)
    return [reader[i] for i in range(reader.size)]


def _manifest(path: Path) -> dict[str, str]:
    return {row["source"]: row["reason"] for row in map(json.loads, path.read_text().splitlines())}


def _convert(*args: str) -> cv.ConvertSummary:
    return cv.main([*DEFAULTS, *args])


def _folder(root: Path) -> dict[str, bytes]:
    """An image folder: 6 good images (JPEG, PNG, BMP) in two subfolders, the bad files and a stray file."""
    good = {f"a/img{i}.jpg": _encode(i) for i in range(3)}
    good |= {"b/img3.png": _encode(3, fmt="PNG"), "b/deep/img4.jpg": _encode(4), "b/img5.bmp": _encode(5, fmt="BMP")}
    for name, data in {**good, **{f"b/{n}": d for n, (d, _) in BAD.items()}}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "a" / "img0.txt").write_text("a caption from a text file beside the image\n")
    (root / "a" / "notes.md").write_text("not an image")
    return good


def test_folder_with_sidecar_keeps_jpegs_reencodes_bmp_and_lists_bad_files(tmp_path):
    good = _folder(tmp_path / "in")
    sidecar = tmp_path / "meta.csv"
    sidecar.write_text(
        'path,caption,label\na/img1.jpg,"a cat, sitting",cat\nb/img3.png,a dog,dog\n'
        "b/deep/img4.jpg,,dog\nmissing.jpg,gone,cat\n"
    )
    out = tmp_path / "mds" / "train"
    summary = _convert(
        "--from",
        "folder",
        "--in",
        str(tmp_path / "in"),
        "--out",
        str(out),
        "--sidecar",
        str(sidecar),
        "--min-size",
        "16",
        "--chunk-size",
        "3",
    )
    samples = {s["source"]: s for s in _read(out.parent)}
    assert sorted(samples) == sorted(good) and summary.samples == 6 and summary.reencoded == 1
    for name, data in good.items():
        image = decode_image(samples[name]["image"])
        assert image.shape == (3, 32, 40) and image.dtype == torch.uint8
        if not name.endswith(".bmp"):
            assert samples[name]["image"] == data  # original bytes kept
    assert samples["b/img5.bmp"]["image"][:2] == b"\xff\xd8"  # BMP -> JPEG
    assert samples["a/img1.jpg"]["caption"] == "a cat, sitting" and samples["b/img3.png"]["caption"] == "a dog"
    assert samples["a/img0.jpg"]["caption"] == "a caption from a text file beside the image"
    assert samples["a/img2.jpg"]["caption"] == "" and samples["a/img2.jpg"]["label"] == -1
    assert [samples[n]["label"] for n in ("a/img1.jpg", "b/img3.png", "b/deep/img4.jpg")] == [0, 1, 1]
    plan = json.loads((out / "convert_plan.json").read_text())
    assert plan["classes"] == ["cat", "dog"] and plan["chunks"] == 4
    expected = {f"b/{n}": reason for n, (_, reason) in BAD.items()}
    assert _manifest(out / "skipped.jsonl") == {**expected, "a/notes.md": "not_image", "missing.jpg": "missing_file"}


def test_folder_class_subfolders_and_jsonl_sidecar(tmp_path):
    good = _folder(tmp_path / "in")
    (tmp_path / "in" / "top.jpg").write_bytes(_encode(7))
    sidecar = tmp_path / "in" / "captions.jsonl"  # inside --in: not listed as a stray file
    sidecar.write_text("\n".join(json.dumps({"file": n, "text": f"caption {n}"}) for n in good) + "\n")
    out = tmp_path / "out"
    _convert(
        "--from",
        "folder",
        "--in",
        str(tmp_path / "in"),
        "--out",
        str(out),
        "--sidecar",
        str(sidecar),
        "--class-folders",
    )
    samples = {s["source"]: s for s in _read(tmp_path, "out")}
    assert {n: s["label"] for n, s in samples.items()} == {n: int(n.startswith("b/")) for n in good}
    assert all(s["caption"] == f"caption {n}" for n, s in samples.items())
    manifest = _manifest(out / "skipped.jsonl")
    assert manifest["top.jpg"] == "no_class_folder" and "captions.jsonl" not in manifest


def _tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue()[:cut])


def test_webdataset_shards_group_members_by_key(tmp_path):
    (tmp_path / "wds").mkdir()
    _tar(
        tmp_path / "wds" / "00000.tar",
        [
            ("s/000.jpg", _encode(0)),
            ("s/000.txt", b"first caption"),
            ("s/000.cls", b"3"),
            ("s/001.png", _encode(1, fmt="PNG")),
            ("s/001.json", json.dumps({"caption": "from json", "label": 5}).encode()),
            ("s/002.txt", b"a caption without its image"),
            ("s/003.jpg", BAD["corrupt.jpg"][0]),
            ("s/003.txt", b"corrupt"),
            ("s/004.webp", _encode(4, fmt="WEBP")),
            ("s/004.extra.json", b"{}"),
        ],
    )
    second = [(f"t/{i:03d}.jpg", _encode(10 + i, (64, 64))) for i in range(4)]
    _tar(tmp_path / "full.tar", second)
    full = (tmp_path / "full.tar").read_bytes()
    cut = full.index(b"t/003.jpg") + 512 + 100  # past the last header, in the middle of the last image
    _tar(tmp_path / "wds" / "00001.tar", second, cut=cut)
    out = tmp_path / "out"
    summary = _convert("--from", "wds", "--in", str(tmp_path / "wds"), "--out", str(out))
    samples = {s["source"]: s for s in _read(tmp_path, "out")}
    assert sorted(samples) == [
        "00000.tar/s/000",
        "00000.tar/s/001",
        "00000.tar/s/004",
        "00001.tar/t/000",
        "00001.tar/t/001",
        "00001.tar/t/002",
    ]
    assert (samples["00000.tar/s/000"]["caption"], samples["00000.tar/s/000"]["label"]) == ("first caption", 3)
    assert (samples["00000.tar/s/001"]["caption"], samples["00000.tar/s/001"]["label"]) == ("from json", 5)
    assert (samples["00000.tar/s/004"]["caption"], samples["00000.tar/s/004"]["label"]) == ("", -1)
    assert samples["00000.tar/s/000"]["image"] == _encode(0)
    assert all(decode_image(s["image"]).shape[0] == 3 for s in samples.values())
    manifest = _manifest(out / "skipped.jsonl")
    assert manifest == {"00000.tar/s/002": "no_image", "00000.tar/s/003": "undecodable", "00001.tar": "read_error"}
    assert summary.chunks == 2


def test_parquet_binary_and_struct_image_columns(tmp_path):
    (tmp_path / "pq").mkdir()
    images = [_encode(i) for i in range(5)]
    images[2] = None
    images[3] = BAD["truncated.jpg"][0]
    table = pa.table(
        {
            "jpg": pa.array(images, pa.binary()),
            "text": [f"row {i}" for i in range(5)],
            "label": pa.array(range(5), pa.int64()),
            "url": ["u"] * 5,
        }
    )
    pq.write_table(table, tmp_path / "pq" / "a.parquet", row_group_size=2)
    struct = pa.array(
        [{"bytes": _encode(20), "path": "x.jpg"}, {"bytes": _encode(21, fmt="PNG"), "path": None}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(
        pa.table({"jpg": struct, "text": ["s0", "s1"], "label": pa.array([7, 8], pa.int64()), "url": ["u"] * 2}),
        tmp_path / "pq" / "b.parquet",
    )
    with pytest.raises(cv.ConfigError, match="--image-field: no binary"):
        _convert(
            "--from", "parquet", "--in", str(tmp_path / "pq"), "--out", str(tmp_path / "x"), "--image-field", "url"
        )
    out = tmp_path / "out"
    summary = _convert("--from", "parquet", "--in", str(tmp_path / "pq"), "--out", str(out))
    assert summary.chunks == 4  # three row groups of a.parquet, one of b.parquet
    samples = _read(tmp_path, "out")
    assert [s["source"] for s in samples] == ["a.parquet#0", "a.parquet#1", "a.parquet#4", "b.parquet#0", "b.parquet#1"]
    assert [s["label"] for s in samples] == [0, 1, 4, 7, 8]
    assert [s["caption"] for s in samples] == ["row 0", "row 1", "row 4", "s0", "s1"]
    assert samples[0]["image"] == images[0] and samples[3]["image"] == _encode(20)
    assert _manifest(out / "skipped.jsonl") == {"a.parquet#2": "no_image", "a.parquet#3": "undecodable"}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


KILLER = """
import os, signal, sys
from lit_webssl.datamodules import convert as cv
real, calls = cv.workers.prepare_image, [0]
def dying(data, min_size=0):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(data, min_size)
cv.workers.prepare_image = dying
cv.main(sys.argv[1:])
"""


def test_resume_after_a_kill_gives_the_same_dataset(tmp_path):
    _folder(tmp_path / "in")
    for i in range(6, 20):
        (tmp_path / "in" / "c" / f"img{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / "c" / f"img{i}.jpg").write_bytes(_encode(i, (48, 40)))
    args = [
        "--from",
        "folder",
        "--in",
        str(tmp_path / "in"),
        "--chunk-size",
        "4",
        "--shard-size",
        "2KiB",
        "--min-size",
        "16",
    ]
    reference = tmp_path / "reference"
    _convert(*args, "--out", str(reference))
    out = tmp_path / "out"
    env = {**os.environ, "KILL_AT": "15"}  # SIGKILL at the 3rd image of chunk 3, its first shard already written
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *DEFAULTS, *args, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    assert (out / "part.00002" / "convert.done").is_file() and not (out / "part.00003" / "convert.done").exists()
    assert list((out / "part.00003").glob("shard.*.mds")) and not (out / "index.json").exists()
    with pytest.raises(cv.ConfigError, match="--out: .* holds a conversion; pass --resume"):
        _convert(*args, "--out", str(out))
    with pytest.raises(cv.ConfigError, match=r"--resume: .*differs: options.min_size"):
        _convert(*args, "--out", str(out), "--resume", "--min-size", "8")
    summary = _convert(*args, "--out", str(out), "--resume")
    assert summary.resumed == 3 and summary.chunks == 6
    assert _files(out) == _files(reference)
    assert _convert(*args, "--out", str(out), "--resume").resumed == 6  # a complete run resumes to itself


def test_interrupt_between_chunks_is_resumable(tmp_path, monkeypatch, capsys):
    _folder(tmp_path / "in")
    args = ["--from", "folder", "--in", str(tmp_path / "in"), "--chunk-size", "2", "--out", str(tmp_path / "out")]
    real, calls = cv.workers.convert_chunk, []

    def interrupted(*a):
        calls.append(a[0].index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(cv.workers, "convert_chunk", interrupted)  # where the chunks are converted
    with pytest.raises(SystemExit) as exit_info:
        _convert(*args)
    assert exit_info.value.code == 1 and "2 of 5 chunks complete" in capsys.readouterr().err
    monkeypatch.setattr(cv.workers, "convert_chunk", real)
    assert _convert(*args, "--resume").samples == 6


@pytest.mark.spawns  # the tool starts its own worker processes (--workers 2)
def test_parallel_workers_give_the_same_dataset_as_one(tmp_path):
    _folder(tmp_path / "in")
    args = ["--from", "folder", "--in", str(tmp_path / "in"), "--chunk-size", "2"]
    _convert(*args, "--out", str(tmp_path / "one"), "--workers", "1")
    _convert(*args, "--out", str(tmp_path / "two"), "--workers", "2")
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--from", "zip", "--in", "IN", "--out", "OUT"], "--from"),
        (["--from", "folder", "--out", "OUT"], "--in"),
        (["--from", "folder", "--in", "IN", "--out", "OUT", "--workers", "0"], "--workers"),
        (["--from", "folder", "--in", "IN", "--out", "OUT", "--workers", "two"], "--workers"),
        (["--from", "folder", "--in", "IN", "--out", "OUT", "--min-size", "-1"], "--min-size"),
        (["--from", "folder", "--in", "IN", "--out", "OUT", "--shard-size", "lots"], "--shard-size"),
        (["--from", "wds", "--in", "IN", "--out", "OUT", "--sidecar", "m.csv"], "--sidecar"),
        (["--from", "wds", "--in", "IN", "--out", "OUT"], "--in"),  # no tar shards there
        (["--from", "folder", "--in", "nowhere", "--out", "OUT"], "--in"),
        (["--from", "folder", "--in", "IN", "--out", "ftp://host/x"], "--out"),
        (["--from", "folder", "--in", "IN", "--out", "OTHER"], "--out"),  # not empty and holds no conversion
        (["--from", "folder", "--in", "IN", "--out", "OTHER", "--overwrite"], "--overwrite"),  # ... so not deleted
        (["--from", "folder", "--in", "IN", "--out", "IN/mds"], "--out"),  # inside --in
        (["--from", "folder", "--in", "IN", "--out", "OUT", "--bogus"], "--bogus"),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_the_flag(tmp_path, capsys, args, flag):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(_encode(0))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    paths = {"IN": str(tmp_path / "in"), "OUT": str(tmp_path / "out"), "OTHER": str(tmp_path / "other")}
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "convert", *DEFAULTS, *(paths.get(a, a).replace("IN/", paths["IN"] + "/") for a in args)])
    assert (tmp_path / "other" / "notes.txt").is_file()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and flag in err, err


@pytest.mark.spawns  # the tool starts its own worker processes (--workers 2)
def test_convert_folder_straight_to_s3_and_resume_there(tmp_path, s3_bucket):
    good = _folder(tmp_path / "in")
    url = s3_bucket.url("converted", "train")
    args = [
        "--from",
        "folder",
        "--in",
        str(tmp_path / "in"),
        "--out",
        url,
        "--chunk-size",
        "5",
        "--manifest",
        str(tmp_path / "skipped.jsonl"),
    ]
    assert _convert(*args, "--workers", "2").samples == len(good)
    keys = s3_bucket.keys("converted/train/")
    assert {
        "converted/train/index.json",
        "converted/train/skipped.jsonl",
        "converted/train/convert_plan.json",
        "converted/train/part.00000/convert.done",
        "converted/train/part.00000/shard.00000.mds",
    } <= set(keys)
    assert _manifest(tmp_path / "skipped.jsonl")["b/corrupt.jpg"] == "undecodable"
    assert _convert(*args, "--resume").resumed == 2
    with pytest.raises(cv.ConfigError, match="--out: .* holds a conversion"):
        _convert(*args)
    dm = WebSSLDataModule(
        str(tmp_path / "cache"),
        remote=s3_bucket.url("converted"),
        val_split=None,
        batch_size=2,
        num_workers=0,
        pin_memory=False,
        drop_last=False,
        caption_key="caption",
    )
    dm.set_views(VIEWS)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(len(good)))


def test_converted_folder_trains_through_the_datamodule(tmp_path):
    for split in ("train", "val"):
        _folder(tmp_path / "in" / split)
        _convert(
            "--from",
            "folder",
            "--in",
            str(tmp_path / "in" / split),
            "--out",
            str(tmp_path / "data" / split),
            "--class-folders",
        )
    dm = WebSSLDataModule(
        str(tmp_path / "data"), batch_size=3, num_workers=0, pin_memory=False, drop_last=False, caption_key="caption"
    )
    dm.set_views(VIEWS)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(6))
    assert batches[0]["views"]["global"].shape == (3, 1, 3, 16, 16) and batches[0]["corrupt"].sum() == 0
    bank, queries = dm.knn_dataloaders(size=16, batch_size=4)
    assert sorted(torch.cat([b["label"] for b in bank]).tolist()) == [0, 0, 0, 1, 1, 1]
