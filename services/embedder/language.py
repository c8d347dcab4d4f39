"""The paper profile's dual-space description for CAD: BLIP for the inside, a language model for
the beyond (the paper asked GPT-4).

    inside  "<BLIP caption>. Layout: <layout cues>"
    beyond  one sentence on what plausibly lies past the photo's borders, from
              "lm":   any causal LM through transformers (hub id or folder), greedy decoding, the
                      tokenizer's chat template when it has one
              "chat": an OpenAI-compatible endpoint, POST {chat_url}/chat/completions, temperature 0
            both asked the same messages (`beyond_messages`), so either answers the same question
    prompt  "<caption>, <beyond>", at most `PROMPT_WORDS` words (SD's CLIP reads 77 tokens)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Protocol

import httpx
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BlipForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from services.embedder.blip import BlipCaptioner, load_blip
from services.embedder.describer import Scene
from shared.devices import resolve_device, resolve_dtype
from shared.errors import ProCropError, SettingsError, one_line, shorten
from shared.model_sources import load_local_first, resolve_source, source_version
from shared.settings import CadSettings, EmbedderSettings

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]

SYSTEM = (
    "You describe photographs for an image out-painting model. Answer with one short sentence "
    "of plain visual description, no preamble."
)
PROMPT_WORDS = 60
BEYOND_CHARS = 300  # a longer answer is cut at a word boundary
CHAT_TIMEOUT_S = 60.0


class ChatEndpointError(ProCropError):
    """The chat endpoint refused the request (e.g. 401, 404) or answered something unreadable."""


class ChatEndpointUnavailable(ChatEndpointError, ConnectionError):
    """The chat endpoint is unreachable, timed out, or is overloaded (429, 5xx): worth a retry
    (a `ConnectionError`, which the stage wrapper retries with backoff)."""


def beyond_messages(caption: str, layout: str) -> Messages:
    """The chat messages that ask what lies beyond a photo's borders."""
    user = (
        f"A photo shows {caption}. Its layout: {layout}. The photo is cropped from a wider scene. "
        "Describe what plausibly lies beyond its borders: above, below, left and right."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def clean_answer(text: str) -> str:
    """The first paragraph of a model's answer, whitespace collapsed, quotes stripped, capped."""
    paragraph = next((part for part in re.split(r"\n\s*\n", text.strip()) if part.strip()), "")
    flat = " ".join(paragraph.split()).strip("\"'")
    if len(flat) <= BEYOND_CHARS:
        return flat
    return flat[:BEYOND_CHARS].rsplit(" ", 1)[0]


def sd_prompt(caption: str, beyond: str) -> str:
    """The out-painter's prompt: the caption, then the beyond, at most `PROMPT_WORDS` words."""
    words = ", ".join(part for part in (caption.strip(" ."), beyond.strip()) if part).split()
    return " ".join(words[:PROMPT_WORDS])


class Captioner(Protocol):
    def caption(self, images: Sequence[Image.Image]) -> list[str]: ...


class BeyondWriter(Protocol):
    """Answers `beyond_messages` with text."""

    name: str
    version: str

    def write(self, messages: Messages) -> str: ...


class LanguageModelWriter:
    """A causal language model (transformers) answering chat messages, greedy, `max_new_tokens`."""

    name = "lm"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        version: str,
        max_new_tokens: int = 48,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.version = version
        self.max_new_tokens = max_new_tokens

    def _encode(self, messages: Messages) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask, (1, T): the chat template if the tokenizer has one, else
        the messages as plain text ending in "Answer:"."""
        encoded: Any  # a BatchEncoding either way
        if self.tokenizer.chat_template:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            text = "\n\n".join(message["content"] for message in messages) + "\nAnswer:"
            encoded = self.tokenizer(text, return_tensors="pt")
        return {key: encoded[key] for key in ("input_ids", "attention_mask")}

    @torch.inference_mode()
    def write(self, messages: Messages, max_new_tokens: int | None = None) -> str:
        inputs = {k: v.to(self.model.device) for k, v in self._encode(messages).items()}
        pad = self.tokenizer.pad_token_id
        output = self.model.generate(  # type: ignore[operator]
            **inputs,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.eos_token_id if pad is None else pad,
        )  # (1, T + new) token ids
        new = output[0, inputs["input_ids"].shape[1] :]
        text: str = self.tokenizer.decode(new.tolist(), skip_special_tokens=True)  # type: ignore[assignment]
        return clean_answer(text)


class ChatEndpointWriter:
    """An OpenAI-compatible chat endpoint: POST {url}/chat/completions, temperature 0."""

    name = "chat"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str = "",
        max_new_tokens: int = 48,
        timeout_s: float = CHAT_TIMEOUT_S,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise SettingsError(f"PROCROP_CAD__CHAT_URL: expected an http(s) URL, got {url!r}")
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.version = f"{model}@{url.rstrip('/')}"
        self.max_new_tokens = max_new_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout_s)

    def write(self, messages: Messages) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_new_tokens,
            "temperature": 0,
        }
        try:
            response = self.client.post(self.endpoint, json=body)
        except httpx.HTTPError as exc:  # connect, read, timeout
            raise ChatEndpointUnavailable(
                f"chat endpoint {self.endpoint} unreachable: {one_line(exc)}"
            ) from None
        return clean_answer(self._answer(response))

    def _answer(self, response: httpx.Response) -> str:
        """choices[0].message.content of a 200; a one-line error otherwise."""
        status = response.status_code
        if status == 429 or status >= 500:
            raise ChatEndpointUnavailable(f"chat endpoint {self.endpoint} answered {status}")
        if status != 200:
            raise ChatEndpointError(
                f"chat endpoint {self.endpoint} refused the request ({status}): "
                f"{shorten(' '.join(response.text.split()), 200)}"
            )
        try:
            reply: Any = response.json()
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ChatEndpointError(
                f"chat endpoint {self.endpoint} sent no choices[0].message.content"
            ) from None
        if not isinstance(content, str):
            raise ChatEndpointError(f"chat endpoint {self.endpoint} sent non-text content")
        return content


class CaptionDescriber:
    """Describer: a caption for the inside, a `BeyondWriter`'s answer for the beyond."""

    def __init__(self, captioner: Captioner, writer: BeyondWriter, *, captioner_version: str):
        self.captioner, self.writer = captioner, writer
        self.name = f"caption-{writer.name}"
        self.version = f"{captioner_version};{writer.version}"

    def describe(self, photo: Image.Image, layout: str) -> Scene:
        caption = self.captioner.caption([photo.convert("RGB")])[0]
        beyond = self.writer.write(beyond_messages(caption, layout))
        return Scene(
            inside=f"{caption}. Layout: {layout}",
            beyond=beyond,
            prompt=sd_prompt(caption, beyond),
        )


def load_language_model_writer(cad: CadSettings) -> LanguageModelWriter:
    """`cad.language_model` (hub id or folder) on `cad.device` in `cad.dtype`.

    Raises:
        ModelLoadError: the model or its tokenizer is missing or does not load.
        SettingsError: `device` is not a torch device.
    """
    try:
        device = resolve_device(cad.device)
    except ValueError as exc:
        raise SettingsError(f"PROCROP_CAD__DEVICE: {exc}") from None
    what = "language model"
    source, local = resolve_source(cad.language_model, what)
    dtype = resolve_dtype(cad.dtype, device)
    model, tokenizer = load_local_first(
        lambda offline: (
            AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=offline),
            AutoTokenizer.from_pretrained(source, local_files_only=offline),
        ),
        source,
        local,
        what,
    )
    module: torch.nn.Module = model  # transformers' typed wrapper of `to` confuses type checkers
    module.to(device).eval()  # in place
    version = source_version(source, local)
    logger.info("loaded language model %s (%s) on %s", source, version, device)
    return LanguageModelWriter(model, tokenizer, version=version, max_new_tokens=cad.max_new_tokens)


def load_caption_describer(embedder: EmbedderSettings, cad: CadSettings) -> CaptionDescriber:
    """BLIP (`embedder.blip_caption_model`) plus the writer `cad.describer` names: "lm" or "chat".

    Raises:
        ModelLoadError: a model cannot be loaded.
        SettingsError: a device, the describer or the chat URL is invalid.
    """
    if cad.describer not in ("lm", "chat"):
        raise SettingsError(
            f"PROCROP_CAD__DESCRIBER: the caption describer needs lm or chat, got {cad.describer!r}"
        )
    writer: BeyondWriter
    if cad.describer == "chat":
        if not cad.chat_url:
            raise SettingsError("PROCROP_CAD__CHAT_URL: the chat describer needs an endpoint URL")
        writer = ChatEndpointWriter(
            cad.chat_url,
            cad.chat_model,
            api_key=cad.chat_api_key.get_secret_value(),
            max_new_tokens=cad.max_new_tokens,
        )
    else:
        writer = load_language_model_writer(cad)
    try:
        device = resolve_device(embedder.device)
    except ValueError as exc:
        raise SettingsError(f"PROCROP_EMBEDDER__DEVICE: {exc}") from None
    model, processor = load_blip(BlipForConditionalGeneration, embedder.blip_caption_model, device)
    captioner = BlipCaptioner(model, processor, batch_size=embedder.batch_size)
    blip_version = source_version(*resolve_source(embedder.blip_caption_model, "BLIP model"))
    return CaptionDescriber(captioner, writer, captioner_version=blip_version)
