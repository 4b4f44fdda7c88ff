"""The vision-language-model scorer (SmolVLM2 from a local directory): P(yes) of a yes/no question per level."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lit_webssl.datamodules.filter.base import TextScorer, first_line
from lit_webssl.errors import ConfigError

VLM_PROMPTS = {
    "light": "Does this image contain any readable text? Answer yes or no.",
    "heavy": "Does this image contain a chart, table, document, or other text-dense content? Answer yes or no.",
}
"""docs/recipe.md section 7's reconstruction of the paper's SmolVLM2 questions (the exact prompts are unpublished)."""

YES_WORDS = ("yes", "Yes", "YES", " yes", " Yes", " YES")

NO_WORDS = ("no", "No", "NO", " no", " No", " NO")


class VLMScorer(TextScorer):
    """A vision-language model from a local directory (SmolVLM2) asked a yes/no question per level.

    The chat is one user turn (the image, then :data:`VLM_PROMPTS` of the level) with the generation prompt; one
    forward pass gives the logits of the first answer token, and the score is P(yes) / (P(yes) + P(no)), the
    probabilities summed over the tokens that start "yes"/"Yes"/" yes"... and "no"/"No"/" no"... Batches are
    left-padded (with position ids counting real tokens only), so the last position is the answer's for every image
    and an image scores the same alone or in any batch.

    Args:
        model_path: Directory holding the weights, config and processor (``save_pretrained`` layout).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        batch_size: Images per forward pass.
        image_splitting: Let the processor split large images into tiles (SmolVLM's default; ``False``: one global
            view per image, several times fewer image tokens, small text missed more often).
        prompts: Question per level (default :data:`VLM_PROMPTS`).

    Raises:
        ConfigError: ``transformers`` is missing, or ``model_path`` holds no loadable model (message names
            ``--vlm-model``).
    """

    name = "vlm"
    batched = True

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        batch_size: int = 8,
        image_splitting: bool = True,
        prompts: dict[str, str] | None = None,
    ) -> None:
        try:
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as err:
            raise ConfigError(
                f"--vlm-model: the VLM scorer needs transformers ({err}); pip install transformers"
            ) from err
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--vlm-model: {path} is not a local model directory (no config.json); download the "
                "weights first, e.g. huggingface-cli download HuggingFaceTB/SmolVLM2-2.2B-Instruct "
                f"--local-dir {path}"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        except ImportError as err:  # e.g. SmolVLM's processor needs num2words
            raise ConfigError(
                f"--vlm-model: loading {path} needs a missing package ({first_line(err)}); "
                "pip install 'lit_webssl[vlm]'"
            ) from err
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"--vlm-model: cannot load a model and processor from {path}: {first_line(err)}") from err
        self.model.to(device).eval()
        self.device, self.batch_size = device, batch_size
        image_processor = getattr(self.processor, "image_processor", None)
        if not image_splitting and hasattr(image_processor, "do_image_splitting"):
            image_processor.do_image_splitting = False
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        self.yes_ids = self._first_token_ids(YES_WORDS)
        self.no_ids = self._first_token_ids(NO_WORDS)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise ConfigError(f"--vlm-model: the tokenizer of {path} has no distinct first tokens for yes and no")
        self.prompts = {level: self.chat(text) for level, text in (prompts or VLM_PROMPTS).items()}
        forward = _parameters(self.model.forward)
        self._keep_last, self._positions = "logits_to_keep" in forward, "position_ids" in forward

    def _first_token_ids(self, words: Sequence[str]) -> list[int]:
        ids = {
            self.tokenizer.encode(word, add_special_tokens=False)[0]
            for word in words
            if self.tokenizer.encode(word, add_special_tokens=False)
        }
        unknown = getattr(self.tokenizer, "unk_token_id", None)
        return sorted(i for i in ids if i != unknown)

    def chat(self, question: str) -> str:
        """The prompt text for one image and ``question``: the processor's chat template with the generation
        prompt (a plain ``User:<image>question\\nAssistant:`` when it has none)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"User:{image_token}{question}\nAssistant:"

    def yes_probability(self, images: Sequence[np.ndarray], level: str) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the first answer token for each image, for the question of ``level``."""
        import torch

        pictures = [Image.fromarray(image) for image in images]
        inputs = self.processor(
            text=[self.prompts[level]] * len(pictures),
            images=[[p] for p in pictures],
            return_tensors="pt",
            padding=True,
        )
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        if self._positions and "attention_mask" in inputs:  # left padding: positions count real tokens only
            extra["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(**inputs, **extra).logits[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        yes = torch.logsumexp(logp[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logp[:, self.no_ids], dim=-1)
        return torch.sigmoid(yes - no).tolist()

    def score(self, images: Sequence[np.ndarray], levels: Sequence[str]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = [{} for _ in images]
        for level in levels:
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size]
                for k, p in enumerate(self.yes_probability(batch, level)):
                    out[start + k][level] = p
        return out

    def score_one(self, image: np.ndarray) -> dict[str, float]:
        return self.score([image], list(self.prompts))[0]


def _parameters(fn: Callable) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
