"""``data filter``: the text-density demo set, the classical and OCR scorers, the VLM scorer's logic on a tiny
randomly initialized SmolVLM, the MDS output (exactly the kept samples, original bytes, score columns) and flag
errors."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from streaming import MDSWriter
from streaming.base.format.mds.encodings import mds_decode

from lit_webssl.cli import main as cli_main
from lit_webssl.datamodules.demo import (
    CLASSES,
    HEAVY_KINDS,
    TEXT_TRUTHS,
    build_text_dataset,
    render,
    render_text_image,
)
from lit_webssl.datamodules.demo import (
    main as demo_main,
)
from lit_webssl.datamodules.filter import (
    DEFAULT_THRESHOLDS,
    VLM_PROMPTS,
    ClassicalScorer,
    OCRScorer,
    VLMScorer,
    decode_rgb,
    filter_dataset,
    iter_samples,
    main,
    read_index,
)
from lit_webssl.errors import ConfigError

needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None, reason="the tesseract binary is not installed (apt-get install tesseract-ocr)"
)


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _words_image(lines: list[str], size: int = 224, px: int = 26) -> np.ndarray:
    """Black text on white, Pillow's own font (no system font needed)."""
    picture = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=px)
    for k, line in enumerate(lines):
        draw.text((10, 10 + k * int(px * 1.4)), line, font=font, fill=(0, 0, 0))
    return np.asarray(picture)


SIGN = ["OPEN DAILY"]
PAGE = [" ".join(f"word{k}{j}" for j in range(2)) + " report" for k in range(9)]


def _no_text() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    textures = [np.asarray(render(CLASSES.index(kind), rng, 224)[0]) for kind in ("polka dots", "crosses", "grid")]
    return [np.full((224, 224, 3), 128, np.uint8), *textures]


@pytest.fixture(scope="module")
def text_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small text set (split layout): 6 train + 9 val images of 160 px."""
    return build_text_dataset(tmp_path_factory.mktemp("data") / "text", n_train=6, n_val=9, image_size=160, seed=2)


def _rows(root: Path, split: str | None = None) -> list[dict]:
    """Decoded samples of an MDS split, also from compressed-only shards (which ``LocalDataset`` cannot read)."""
    directory = root / (split or "")
    shards = read_index(directory)
    encodings = dict(zip(shards[0]["column_names"], shards[0]["column_encodings"], strict=True)) if shards else {}
    return [{k: mds_decode(encodings[k], v) for k, v in sample.items()} for sample in iter_samples(directory, shards)]


# ------------------------------------------------------------------------------------------------------ demo set
def test_text_set_columns_truth_and_determinism(text_root: Path, tmp_path: Path):
    again = build_text_dataset(tmp_path / "again", n_train=6, n_val=9, image_size=160, seed=2)
    for split, n in (("train", 6), ("val", 9)):
        rows = _rows(text_root, split)
        assert [r["image"] for r in rows] == [r["image"] for r in _rows(again, split)]
        assert sorted(r["text_truth"] for r in rows) == sorted(TEXT_TRUTHS * (n // 3))
        for r in rows:
            assert r["label"] == TEXT_TRUTHS.index(r["text_truth"])
            assert (r["text_content"] == "") == (r["text_truth"] == "none")
            assert decode_rgb(r["image"], "bytes").shape == (160, 160, 3)
    meta = json.loads((text_root / "classes.json").read_text())
    assert meta["classes"] == list(TEXT_TRUTHS) and meta["kind"] == "text" and meta["n_val"] == 9


def test_every_text_kind_renders_and_the_flag_builds_the_text_set(tmp_path: Path):
    rng = np.random.default_rng(0)
    for size in (96, 224):
        for truth in TEXT_TRUTHS:
            for _ in range(4):
                picture, caption, content = render_text_image(truth, rng, size)
                assert picture.size == (size, size) and picture.mode == "RGB" and caption
    for kind, make in HEAVY_KINDS.items():
        assert make(rng, 128)[1], kind
    root = demo_main(["--text-set", "--out", str(tmp_path / "t"), "--train", "3", "--val", "3", "--size", "96"])
    assert {r["text_truth"] for r in _rows(root, "val")} == set(TEXT_TRUTHS)
    plain = demo_main(["--out", str(tmp_path / "d"), "--train", "10", "--val", "10", "--size", "24"])
    assert json.loads((plain / "classes.json").read_text())["classes"] == list(CLASSES)  # default demo untouched
    assert _rows(plain, "val")[0].keys() == {"image", "label", "caption"}


# ------------------------------------------------------------------------------------------------------- scorers
def test_classical_scorer_finds_words_and_pages_not_patterns():
    scorer = ClassicalScorer()
    light, heavy = DEFAULT_THRESHOLDS["classical"]["light"], DEFAULT_THRESHOLDS["classical"]["heavy"]
    for image in _no_text():
        assert scorer.score_one(image)["light"] < light
    sign = scorer.score_one(_words_image(SIGN, px=30))
    assert sign["light"] >= light and sign["heavy"] < heavy
    assert scorer.score_one(255 - _words_image(SIGN, px=30)) == sign  # white on black: both polarities
    page = scorer.score_one(_words_image(PAGE, px=14))
    assert page["heavy"] >= heavy and page["light"] >= 40


@needs_tesseract
def test_ocr_scorer_reads_words_and_counts_confident_ones():
    scorer = OCRScorer()
    words = [w for c, w in scorer.read_words(_words_image(SIGN, px=30)) if c >= scorer.min_conf]
    assert "OPEN" in words and "DAILY" in words
    assert scorer.score_one(_words_image(SIGN, px=30))["light"] == 2
    assert scorer.score_one(_words_image(PAGE, px=14))["heavy"] >= DEFAULT_THRESHOLDS["ocr"]["heavy"]
    blank = _no_text()[0]
    assert scorer.score_one(blank) == {"light": 0.0, "heavy": 0.0}  # the prescreen: no tesseract call
    assert OCRScorer(prescreen=False).score_one(blank)["light"] == 0


# ---------------------------------------------------------------------------------------------------- MDS output
@pytest.mark.spawns  # the tool starts its own worker processes (--workers 2)
def test_filter_split_layout_keeps_exactly_the_passing_samples(text_root: Path, tmp_path: Path):
    out = tmp_path / "light"
    summary = filter_dataset(text_root, out, "light", "classical", threshold=5, workers=2)
    scorer = ClassicalScorer()
    for split in ("train", "val"):
        source, kept = _rows(text_root, split), _rows(out, split)
        scores = [scorer.score_one(decode_rgb(r["image"], "bytes")) for r in source]
        expected = [(r, s) for r, s in zip(source, scores, strict=True) if s["light"] >= 5]
        assert len(kept) == len(expected) == summary["splits"][split]["kept"]
        for row, (src, score) in zip(kept, expected, strict=True):
            assert {k: row[k] for k in src} == src  # every original column, byte for byte, in order
            assert row["text_score"] == score["light"]
            assert row["text_level"] == (
                "heavy" if score["heavy"] >= DEFAULT_THRESHOLDS["classical"]["heavy"] else "light"
            )
        result = summary["splits"][split]
        assert result["samples"] == len(source) and result["kept_fraction"] == len(kept) / len(source)
        positives = sum(r["text_truth"] != "none" for r in source)
        assert result["tp"] + result["fn"] == positives and 0 <= result["precision"] <= 1
    assert json.loads((out / "filter.json").read_text())["splits"]["val"]["kept"] == summary["splits"]["val"]["kept"]
    assert (out / "classes.json").read_bytes() == (text_root / "classes.json").read_bytes()
    assert not (tmp_path / "light.partial").exists()


def test_filter_flat_layout_drops_undecodable_and_refilters(tmp_path: Path):
    src = tmp_path / "flat"
    images = [
        _png(Image.fromarray(_words_image(PAGE, px=14))),
        b"not an image",
        _png(Image.fromarray(_no_text()[1])),
        _png(Image.fromarray(_words_image(SIGN, px=30))),
    ]
    with MDSWriter(
        out=str(src), columns={"image": "bytes", "id": "int", "url": "str"}, compression="zstd", progress_bar=False
    ) as writer:
        for i, image in enumerate(images):
            writer.write({"image": image, "id": i, "url": f"https://example.com/{i}.png"})
    for raw in src.glob("shard.*.mds"):
        raw.unlink()  # only the compressed shards remain, as in a remote dataset's cache
    summary = main(
        [
            "--in",
            str(src),
            "--out",
            str(tmp_path / "heavy"),
            "--keep",
            "heavy",
            "--scorer",
            "classical",
            "--workers",
            "1",
        ]
    )
    assert (tmp_path / "heavy" / "index.json").is_file()
    assert summary["splits"]["."]["undecodable"] == 1 and summary["splits"]["."]["samples"] == 4
    assert [r["id"] for r in _rows(tmp_path / "heavy")] == [0]
    light = filter_dataset(src, tmp_path / "light", "light", "classical")
    rows = _rows(tmp_path / "light")
    assert [r["id"] for r in rows] == [0, 3] and rows[1]["url"] == "https://example.com/3.png"
    assert [r["text_level"] for r in rows] == ["heavy", "light"] and light["splits"]["."]["kept"] == 2
    again = filter_dataset(tmp_path / "light", tmp_path / "again", "heavy", "classical")  # score columns replaced
    assert [r["id"] for r in _rows(tmp_path / "again")] == [0] and again["splits"]["."]["samples"] == 2
    with pytest.raises(ConfigError, match="--out: .* exists"):
        filter_dataset(src, tmp_path / "light", "light", "classical")
    with pytest.raises(ConfigError, match="--out: .* not the output of an earlier filter"):
        filter_dataset(tmp_path / "light", src, "light", "classical", overwrite=True)  # never deletes the source
    with pytest.raises(ConfigError, match="must not contain one another"):
        filter_dataset(src, src / "sub", "light", "classical")
    filter_dataset(src, tmp_path / "light", "light", "classical", threshold=1e9, overwrite=True)
    assert _rows(tmp_path / "light") == []
    empty = filter_dataset(tmp_path / "light", tmp_path / "empty", "light", "classical")  # nothing in, nothing out
    assert empty["splits"]["."]["samples"] == 0 and _rows(tmp_path / "empty") == []


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--keep", "medium"], "--keep"),
        (["--keep", "light", "--scorer", "magic"], "--scorer"),
        (["--keep", "light", "--workers", "0"], "--workers"),
        (["--keep", "light", "--threshold", "-1"], "--threshold"),
        (["--keep", "light", "--threshold", "nan"], "--threshold"),
        (["--keep", "light", "--scorer", "vlm"], "--vlm-model"),
        (["--keep", "light", "--scorer", "ocr", "--vlm-model", "m"], "--vlm-model"),
        (["--keep", "light", "--vlm-model", "no/such/dir"], "--vlm-model"),
        (["--keep", "light", "--image-key", "picture"], "--image-key"),
        (["--keep", "light", "--in", "no/such/dir"], "--in"),
        (["--in", "x", "--out", "y"], "--keep"),
    ],
)
def test_bad_flags_raise_one_line_errors_naming_the_flag(argv, flag, text_root: Path, tmp_path: Path):
    base = [] if "--in" in argv else ["--in", str(text_root)]
    base += [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    with pytest.raises(ConfigError, match=flag) as info:
        main(base + argv)
    assert "\n" not in str(info.value)


def test_cli_prints_the_error_and_exits_2(text_root: Path, tmp_path: Path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(SystemExit) as info:
        cli_main(["data", "filter", "--in", str(text_root), "--out", str(tmp_path / "taken"), "--keep", "light"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: --out:") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------------------ VLM
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized SmolVLM (1-layer vision and text towers, word-level tokenizer) saved as a local model
    directory, with SmolVLM2's chat format and image splitting."""
    pytest.importorskip("num2words", reason="SmolVLM's processor needs num2words (pip install 'lit_webssl[vlm]')")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    special = [
        "<unk>",
        "<pad>",
        "<|im_start|>",
        "<end_of_utterance>",
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
    ] + [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    words = sorted(
        {w for p in VLM_PROMPTS.values() for w in p.replace("?", " ? ").replace(",", " , ").replace(".", " . ").split()}
        | {"User", ":", "Assistant", "yes", "Yes", "no", "No", "\n"}
    )
    vocab = {t: i for i, t in enumerate(special + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        additional_special_tokens=special[4:],
    )
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=4,
        chat_template=template,
    )
    torch.manual_seed(0)
    config = SmolVLMConfig(
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "pad_token_id": vocab["<pad>"],
        },
        image_token_id=vocab["<image>"],
        scale_factor=2,
        pad_token_id=vocab["<pad>"],
    )
    path = tmp_path_factory.mktemp("models") / "tiny-smolvlm"
    processor.save_pretrained(path)
    SmolVLMForConditionalGeneration(config).save_pretrained(path)
    return path


def test_vlm_scores_p_yes_from_the_first_answer_token(tiny_vlm: Path):
    scorer = VLMScorer(tiny_vlm, device="cpu", batch_size=4)
    assert scorer.prompts["light"].endswith("Assistant:") and VLM_PROMPTS["light"] in scorer.prompts["light"]
    assert VLM_PROMPTS["heavy"] in scorer.prompts["heavy"]
    tokens = scorer.tokenizer.convert_ids_to_tokens
    assert set(tokens(scorer.yes_ids)) == {"yes", "Yes"} and set(tokens(scorer.no_ids)) == {"no", "No"}
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 56), (20, 20), (64, 30))]
    batch = scorer.yes_probability(images, "light")  # several tile counts: left padding in the batch
    alone = [scorer.yes_probability([image], "light")[0] for image in images]
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    assert all(0 < p < 1 for p in batch)
    assert scorer.score(images, ["heavy"])[1].keys() == {"heavy"}

    import torch

    def push(ids: list[int]):  # add 20 to the logits of some answer tokens at the last position
        def hook(module, args, output):
            assert output.shape[1] == 1  # only the answer position's logits are computed
            output = output.clone()
            output[:, -1, ids] += 20.0
            return output

        return scorer.model.get_output_embeddings().register_forward_hook(hook)

    handle = push(scorer.yes_ids)
    assert min(scorer.yes_probability(images, "light")) > 0.999
    handle.remove()
    handle = push(scorer.no_ids[:1])
    probs = scorer.yes_probability(images, "light")
    handle.remove()
    assert max(probs) < 1e-3
    logits = torch.zeros(len(scorer.tokenizer))  # the definition: P(yes) / (P(yes) + P(no)) over both spellings
    assert (
        abs(torch.sigmoid(torch.logsumexp(logits[scorer.yes_ids], 0) - torch.logsumexp(logits[scorer.no_ids], 0)) - 0.5)
        < 1e-6
    )


def test_vlm_filter_from_the_command_line(tiny_vlm: Path, text_root: Path, tmp_path: Path):
    summary = main(
        [
            "--in",
            str(text_root),
            "--out",
            str(tmp_path / "all"),
            "--keep",
            "heavy",
            "--vlm-model",
            str(tiny_vlm),
            "--vlm-device",
            "cpu",
            "--vlm-batch-size",
            "4",
            "--threshold",
            "0",
        ]
    )
    assert summary["scorer"] == "vlm" and summary["splits"]["val"]["kept"] == 9
    rows = _rows(tmp_path / "all", "val")
    scorer = VLMScorer(tiny_vlm, device="cpu")
    expected = scorer.yes_probability([decode_rgb(r["image"], "bytes") for r in rows], "heavy")
    np.testing.assert_allclose([r["text_score"] for r in rows], expected, atol=1e-5)
    assert {r["text_level"] for r in rows} == {"heavy"}
    summary = main(
        [
            "--in",
            str(text_root),
            "--out",
            str(tmp_path / "none"),
            "--keep",
            "light",
            "--scorer",
            "vlm",
            "--vlm-model",
            str(tiny_vlm),
            "--vlm-device",
            "cpu",
            "--vlm-no-split",
            "--threshold",
            "1",
        ]
    )
    assert summary["splits"]["train"]["kept"] == 0 and _rows(tmp_path / "none", "train") == []


def test_vlm_errors_name_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^--vlm-model: .*empty is not a local model directory"):
        VLMScorer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^--vlm-model: cannot load"):
        VLMScorer(tmp_path / "broken")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"^--vlm-model: the VLM scorer needs transformers"):
        VLMScorer(tmp_path / "empty")
