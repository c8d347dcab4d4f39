"""The caption describer on tiny seeded models: BLIP (tests/conftest.py) and a GPT-2-shaped causal
LM with a word-level tokenizer, both saved and loaded back through the loaders real weights take;
the chat route against a real HTTP server on loopback that serves the same tiny LM."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from services.embedder.language import (
    SYSTEM,
    CaptionDescriber,
    ChatEndpointError,
    ChatEndpointUnavailable,
    ChatEndpointWriter,
    LanguageModelWriter,
    beyond_messages,
    clean_answer,
    load_caption_describer,
    load_language_model_writer,
    sd_prompt,
)
from shared.errors import ModelLoadError, SettingsError
from shared.settings import CadSettings, EmbedderSettings

LAYOUT = "a large region (41%) across the bottom; a small subject (5%) at the top left"
API_KEY = "sk-test-key-0123456789"
SCENE_WORDS = ["sky", "sea", "sand", "trees", "road", "hills", "clouds", "grass", "water", "more"]
TEMPLATE = (
    "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


def _vocab() -> list[str]:
    """Every word and mark of the prompt text, a few scene words, roles; specials first."""
    text = " ".join(m["content"] for m in beyond_messages("x", LAYOUT)) + " Answer:"
    pieces = re.findall(r"\w+|[^\w\s]+", text)
    return [
        "[UNK]",
        "[PAD]",
        "[EOS]",
        *dict.fromkeys([*pieces, *SCENE_WORDS, "system", "user", "assistant"]),
    ]


def _save_tiny_lm(folder: Path, chat_template: str | None) -> Path:
    vocab = _vocab()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=vocab.index("[EOS]"),
        eos_token_id=vocab.index("[EOS]"),
        pad_token_id=vocab.index("[PAD]"),
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm")
    return {
        "plain": _save_tiny_lm(root / "plain", None),
        "chat": _save_tiny_lm(root / "chat", TEMPLATE),
    }


def _cad(**fields: Any) -> CadSettings:
    return CadSettings(device="cpu", max_new_tokens=6, **fields)


@pytest.fixture(scope="module")
def embedder(tiny_blip_folders: dict[str, Path]) -> EmbedderSettings:
    return EmbedderSettings(blip_caption_model=str(tiny_blip_folders["caption"]), device="cpu")


@pytest.fixture(scope="module")
def lm_describer(embedder: EmbedderSettings, lm_folders: dict[str, Path]) -> CaptionDescriber:
    return load_caption_describer(
        embedder, _cad(describer="lm", language_model=str(lm_folders["chat"]))
    )


@pytest.fixture(scope="module")
def photo(photos: list[Image.Image]) -> Image.Image:
    return photos[0]


def test_lm_route_describes_inside_beyond_and_prompt(
    lm_describer: CaptionDescriber, photo: Image.Image
) -> None:
    scene = lm_describer.describe(photo, LAYOUT)
    caption = lm_describer.captioner.caption([photo])[0]
    assert scene.inside == f"{caption}. Layout: {LAYOUT}"
    assert scene.beyond  # the tiny LM's words, greedy
    assert scene.beyond == lm_describer.writer.write(beyond_messages(caption, LAYOUT))
    assert scene.prompt == sd_prompt(caption, scene.beyond)
    assert scene.beyond in scene.prompt
    assert lm_describer.describe(photo, LAYOUT) == scene  # greedy: the same every time


def test_version_names_both_models_weights(lm_describer: CaptionDescriber) -> None:
    assert lm_describer.name == "caption-lm"
    blip, lm = lm_describer.version.split(";")
    assert re.fullmatch(r"caption:[0-9a-f]{12}", blip)
    assert re.fullmatch(r"chat:[0-9a-f]{12}", lm)  # the LM folder's name and digest


def test_chat_template_when_the_tokenizer_has_one(lm_folders: dict[str, Path]) -> None:
    messages = beyond_messages("a dog", LAYOUT)
    for kind, start, end in (("chat", "system", "assistant"), ("plain", "You", ":")):
        writer = load_language_model_writer(_cad(language_model=str(lm_folders[kind])))
        ids = writer._encode(messages)["input_ids"][0]
        words = writer.tokenizer.convert_ids_to_tokens(ids.tolist())
        assert (words[0], words[-1]) == (start, end), kind


class _ChatHandler(BaseHTTPRequestHandler):
    """POST /v1/chat/completions answered by the tiny LM; anything else is an error."""

    server: _ChatServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), **body})
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._send(401, {"error": {"message": "invalid api key"}})
        if body["model"] == "busy":
            return self._send(503, {"error": {"message": "overloaded"}})
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "no such route"}})
        text = self.server.writer.write(body["messages"], body["max_tokens"])
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        self._send(200, {"object": "chat.completion", "model": body["model"], **reply})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _ChatServer(ThreadingHTTPServer):
    def __init__(self, writer: LanguageModelWriter) -> None:
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.writer = writer
        self.requests: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def chat_server(lm_describer: CaptionDescriber) -> Iterator[_ChatServer]:
    assert isinstance(lm_describer.writer, LanguageModelWriter)
    server = _ChatServer(lm_describer.writer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _chat_url(server: _ChatServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def test_chat_route_round_trip_over_http(
    embedder: EmbedderSettings,
    chat_server: _ChatServer,
    lm_describer: CaptionDescriber,
    photo: Image.Image,
) -> None:
    cad = _cad(
        describer="chat",
        chat_url=_chat_url(chat_server),
        chat_model="tiny-gpt",
        chat_api_key=API_KEY,
    )
    describer = load_caption_describer(embedder, cad)
    scene = describer.describe(photo, LAYOUT)
    request = chat_server.requests[-1]
    caption = describer.captioner.caption([photo])[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert request["model"] == "tiny-gpt" and request["max_tokens"] == 6
    assert request["messages"] == beyond_messages(caption, LAYOUT)
    assert request["messages"][0] == {"role": "system", "content": SYSTEM}
    # the server's LM is the lm route's: the same question gets the same answer either way
    assert scene == lm_describer.describe(photo, LAYOUT)
    assert describer.name == "caption-chat" and "tiny-gpt@http://127.0.0.1" in describer.version


def test_chat_refusal_is_a_one_line_error(chat_server: _ChatServer) -> None:
    writer = ChatEndpointWriter(_chat_url(chat_server), "tiny-gpt", api_key="wrong-key")
    with pytest.raises(ChatEndpointError, match=r"refused the request \(401\): .*invalid api key"):
        writer.write(beyond_messages("a dog", LAYOUT))
    assert chat_server.requests[-1]["headers"]["Authorization"] == "Bearer wrong-key"
    busy = ChatEndpointWriter(_chat_url(chat_server), "busy", api_key=API_KEY)
    with pytest.raises(ChatEndpointUnavailable, match="answered 503"):
        busy.write(beyond_messages("a dog", LAYOUT))


def test_unreachable_chat_endpoint_is_retryable() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there
    writer = ChatEndpointWriter(f"http://127.0.0.1:{port}/v1", "m", timeout_s=2)
    with pytest.raises(ChatEndpointUnavailable, match="unreachable") as caught:
        writer.write(beyond_messages("a dog", LAYOUT))
    assert isinstance(caught.value, ConnectionError)  # the stage wrapper's transient errors


def test_bad_settings_fail_naming_the_variable(embedder: EmbedderSettings, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="PROCROP_CAD__CHAT_URL"):
        load_caption_describer(embedder, _cad(describer="chat"))
    with pytest.raises(SettingsError, match="PROCROP_CAD__CHAT_URL: expected an http"):
        load_caption_describer(embedder, _cad(describer="chat", chat_url="127.0.0.1:8000/v1"))
    with pytest.raises(SettingsError, match="PROCROP_CAD__DESCRIBER"):
        load_caption_describer(embedder, _cad(describer="layout"))
    with pytest.raises(ModelLoadError, match="language model folder not found"):
        load_caption_describer(embedder, _cad(describer="lm", language_model=str(tmp_path / "x")))


def test_answers_are_cleaned_and_prompts_capped() -> None:
    assert clean_answer('  "More sea,\n  and sky."\n\nSecond paragraph') == "More sea, and sky."
    assert len(clean_answer("word " * 200)) <= 300
    assert sd_prompt("a dog on the beach.", "more sand") == "a dog on the beach, more sand"
    assert sd_prompt("a dog", "") == "a dog"
    assert len(sd_prompt("a " * 50, "b " * 50).split()) == 60
