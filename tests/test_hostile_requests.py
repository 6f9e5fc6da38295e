"""Hostile templates, label fields and image URLs (issue 14): each is a one-line 4xx, never a 500, and the
server keeps answering on the same keep-alive connection."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from talk2dino.config import ModelConfig, check_template
from talk2dino.errors import InvalidInputError

httpx = pytest.importorskip("httpx", reason="the server tests need httpx")
pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")

pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")

from test_server import FAST, LIMITS, WAIT_S, png_bytes, running_server  # noqa: E402

from talk2dino import Segmenter  # noqa: E402
from talk2dino.server import ServerConfig, create_app  # noqa: E402
from talk2dino.server.uploads import parse_labels  # noqa: E402

BAD_TEMPLATES = ["a {} {x}", "{} {0}", "{} {", "{} }", "{} {:>99999999999}", "{!r}", "{0}", "{}{}", "none",
                 "{[0]}", "{.real}"]
BAD_LABELS = ["[" * 100000, "[" + "1" * 5000 + "]", "[" + "[" * 3000 + "]" * 3000 + "]"]
BAD_URLS = ["http://127.0.0.1:1/a b.png", "http://127.0.0.1:1/a\r\nX-Injected: 1", "http://127.0.0.1:1/a\n",
            "http://127.0.0.1:abc/x.png"]


def assert_one_line_4xx(response: Any) -> None:
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert isinstance(body["error"], str) and "\n" not in body["error"] and "\r" not in body["error"]


@pytest.mark.parametrize("template", BAD_TEMPLATES)
def test_check_template_refuses(template: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        check_template(template)
    message = str(info.value)
    assert "\n" not in message and "template" in message


@pytest.mark.parametrize("template", ["a {}.", "{}", "a {{literal}} {}", "{{}} {}"])
def test_check_template_accepts(template: str) -> None:
    assert check_template(template) == template
    assert "cat" in template.format("cat")


def test_model_config_refuses_bad_template(tiny_model) -> None:
    data = tiny_model.config.to_dict()
    data["text"]["templates"] = ["a {}.", "a {} {x}"]
    with pytest.raises(InvalidInputError, match=r"a \{\} \{x\}"):
        ModelConfig.from_dict(data)
    data["text"]["templates"] = ["a {}."]
    assert ModelConfig.from_dict(data).text == dataclasses.replace(tiny_model.config.text, templates=("a {}.",))


@pytest.mark.parametrize("text", BAD_LABELS)
def test_parse_labels_refuses_hostile_json(text: str) -> None:
    with pytest.raises(InvalidInputError, match="labels"):
        parse_labels(text)
    with pytest.raises(InvalidInputError, match="labels"):
        parse_labels(text, max_json_chars=1000)


def test_hostile_requests_answer_4xx_and_keep_serving(tiny_model) -> None:
    app = create_app(Segmenter(tiny_model, FAST), LIMITS)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as client:
        for template in BAD_TEMPLATES:
            bad = client.post("/v1/embed-text", json={"labels": ["cat"], "templates": [template]})
            assert_one_line_4xx(bad)
            assert template[:20] in bad.json()["error"] or "template" in bad.json()["error"]
            ok = client.post("/v1/embed-text", json={"labels": ["cat"], "templates": ["a {}."]})
            assert ok.status_code == 200, ok.text
        for labels in BAD_LABELS:
            bad = client.post("/v1/segment", data={"labels": labels}, files={"image": ("p.png", png_bytes())})
            assert_one_line_4xx(bad)
            assert "labels" in bad.json()["error"]
            ok = client.post("/v1/segment", data={"labels": "cat", "pamr": "false"},
                             files={"image": ("p.png", png_bytes())})
            assert ok.status_code == 200, ok.text


def test_hostile_labels_with_default_limits(tiny_model) -> None:
    """With the default (large) limits the size bound alone does not refuse "[" * 100000: depth is caught too."""
    config = dataclasses.replace(ServerConfig(), max_labels=255, max_label_length=200)
    with running_server(create_app(Segmenter(tiny_model, FAST), config)) as url, \
            httpx.Client(base_url=url, timeout=WAIT_S) as client:
        for labels in BAD_LABELS:
            bad = client.post("/v1/segment", data={"labels": labels}, files={"image": ("p.png", png_bytes())})
            assert_one_line_4xx(bad)
        ok = client.post("/v1/segment", data={"labels": "cat", "pamr": "false"},
                         files={"image": ("p.png", png_bytes())})
        assert ok.status_code == 200, ok.text


def test_hostile_image_urls(tiny_model) -> None:
    config = ServerConfig(allow_image_url=True, max_upload_bytes=100_000, url_timeout_s=5)
    with running_server(create_app(Segmenter(tiny_model, FAST), config)) as url, \
            httpx.Client(base_url=url, timeout=WAIT_S) as client:
        for image_url in BAD_URLS:
            bad = client.post("/v1/segment", data={"labels": "cat", "image_url": image_url})
            assert_one_line_4xx(bad)
            assert "image_url" in bad.json()["error"]
        ok = client.post("/v1/segment", data={"labels": "cat", "pamr": "false"},
                         files={"image": ("p.png", png_bytes())})
        assert ok.status_code == 200, ok.text


def test_library_refuses_a_template_with_a_named_field(tiny_model) -> None:
    """The Python API checks templates as the server and model configs do: one line, not a KeyError later."""
    from talk2dino import Segmenter
    from talk2dino.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"a \{\} \{x\}"):
        Segmenter(tiny_model).class_embeddings(["cat"], ["a {} {x}"])
