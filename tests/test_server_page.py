"""The server around the web page (issue 13.13): the feature cache behind a labels-only change, no CDN-only
/docs, the favicon, the example images, and a clear 415 for a body that is not a form."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from test_server import FAST, assert_error, png_bytes, post_segment, running_server  # noqa: E402

from talk2dino import Segmenter  # noqa: E402
from talk2dino.server import ServerConfig, create_app  # noqa: E402
from talk2dino.server.worker import FeatureCache  # noqa: E402

FIELDS = {"label_png": "true", "overlay": "true", "heatmaps": "true", "rle": "compressed", "background": "true"}


def counting(segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the backbone passes of `segmenter` (one entry per `_run_backbone` call)."""
    calls: list[int] = []
    original = segmenter._run_backbone

    def run_backbone(windows: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(windows.shape[0]))
        return original(windows, *args, **kwargs)

    monkeypatch.setattr(segmenter, "_run_backbone", run_backbone)
    return calls


@pytest.fixture(scope="module")
def page_server(tiny_model: Any) -> Iterator[str]:
    with running_server(create_app(Segmenter(tiny_model, FAST), ServerConfig())) as url:
        yield url


def test_labels_only_change_skips_the_backbone_and_matches_an_uncached_answer(tiny_model: Any,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    image = png_bytes(96, 128, seed=3)
    cached = Segmenter(tiny_model, FAST)
    calls = counting(cached, monkeypatch)
    with running_server(create_app(cached, ServerConfig(feature_cache_size=2))) as url:
        started = time.monotonic()
        first = post_segment(url, {"labels": "cat, sofa", **FIELDS}, image)
        full_ms = (time.monotonic() - started) * 1000
        assert first.status_code == 200, first.text
        assert len(calls) == 1 and first.json()["timings"]["cached_features"] == 0
        started = time.monotonic()
        second = post_segment(url, {"labels": "window, dog, tree", **FIELDS}, image, name="again.png")
        labels_ms = (time.monotonic() - started) * 1000
        assert second.status_code == 200, second.text
        assert len(calls) == 1, "a labels-only change ran the backbone again"
        assert second.json()["timings"]["cached_features"] == 1 and second.json()["timings"]["embed_image"] == 0
        # Another image is a miss; the first one is still cached (capacity 2).
        assert post_segment(url, {"labels": "cat", **FIELDS}, png_bytes(96, 128, seed=4)).status_code == 200
        assert len(calls) == 2
        assert post_segment(url, {"labels": "cat", **FIELDS}, image).status_code == 200
        assert len(calls) == 2
        cache = httpx.get(f"{url}/healthz").json()["queue"]["feature_cache"]
        assert cache == {"size": 2, "capacity": 2, "hits": 2, "misses": 2}
    print(f"\nfull request {full_ms:.0f} ms, labels-only change {labels_ms:.0f} ms")

    uncached = Segmenter(tiny_model, FAST)
    calls = counting(uncached, monkeypatch)
    with running_server(create_app(uncached, ServerConfig(feature_cache_size=0))) as url:
        for _ in range(2):
            reference = post_segment(url, {"labels": "window, dog, tree", **FIELDS}, image)
            assert reference.status_code == 200, reference.text
        assert len(calls) == 2  # cache off: every request runs the backbone
    got, want = second.json(), reference.json()
    for key in ("size", "labels", "background_index", "settings", "label_png", "overlay_png", "rle", "heatmaps",
                "heatmap_range"):
        assert got[key] == want[key], key


def test_feature_cache_is_a_bounded_lru() -> None:
    cache = FeatureCache(2)
    a, b, c = object(), object(), object()
    cache.put("a", a)  # type: ignore[arg-type]
    cache.put("b", b)  # type: ignore[arg-type]
    assert cache.get("a") is a  # a is now the most recently used
    cache.put("c", c)  # type: ignore[arg-type]
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c and len(cache) == 2
    off = FeatureCache(0)
    off.put("a", a)  # type: ignore[arg-type]
    assert off.get("a") is None and len(off) == 0


def test_feature_cache_size_is_validated() -> None:
    from talk2dino.errors import InvalidInputError

    assert ServerConfig().feature_cache_size > 0
    with pytest.raises(InvalidInputError, match="feature_cache_size"):
        ServerConfig(feature_cache_size=-1).validate()
    assert ServerConfig.from_env({"TALK2DINO_SERVE_FEATURE_CACHE_SIZE": "3"}).feature_cache_size == 3


def test_docs_route_is_gone_and_points_to_the_schema(page_server: str) -> None:
    for path in ("/docs", "/redoc"):
        assert_error(httpx.get(f"{page_server}{path}"), 404, "/openapi.json")
    assert httpx.get(f"{page_server}/openapi.json").json()["paths"]
    page = httpx.get(f"{page_server}/").text
    assert 'href="/docs"' not in page and 'href="/openapi.json"' in page


def test_favicon_is_served(page_server: str) -> None:
    response = httpx.get(f"{page_server}/favicon.ico")
    assert response.status_code == 200 and response.headers["content-type"] == "image/x-icon"
    with Image.open(io.BytesIO(response.content)) as icon:
        assert icon.format == "ICO" and icon.size == (32, 32)
    assert 'rel="icon"' in httpx.get(f"{page_server}/").text


def test_example_images_are_served_small_and_linked(page_server: str) -> None:
    page = httpx.get(f"{page_server}/").text
    for name in ("example-rocket.jpg", "example-house.png"):
        assert f'data-src="/static/{name}"' in page
        response = httpx.get(f"{page_server}/static/{name}")
        assert response.status_code == 200 and 0 < len(response.content) < 100_000
        with Image.open(io.BytesIO(response.content)) as picture:
            assert min(picture.size) >= 100


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (b'{"labels": "cat", "image": "aGVsbG8="}', "application/json", 415),
    (b"<labels>cat</labels>", "application/xml", 415),
    (b"", None, 422),  # nothing sent: the required fields are missing (what the OpenAPI schema promises)
])
def test_a_body_that_is_not_a_form_is_415_naming_multipart(page_server: str, body: bytes,
                                                           content_type: str | None, status: int) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{page_server}/v1/segment", content=body, headers=headers)
    assert_error(response, status, "send multipart/form-data")


def test_healthz_reports_seconds_per_request_for_the_page_estimate(page_server: str) -> None:
    assert post_segment(page_server, {"labels": "cat"}, png_bytes()).status_code == 200
    queue = httpx.get(f"{page_server}/healthz").json()["queue"]
    assert queue["seconds_per_request"] > 0


def test_feature_cache_size_flag_reaches_the_server_config() -> None:
    from talk2dino.cli.main import build_parser
    from talk2dino.cli.serve import serve_config

    parser = build_parser()
    assert serve_config(parser.parse_args(["serve", "--feature-cache-size", "3"])).feature_cache_size == 3
    assert serve_config(parser.parse_args(["serve", "--feature-cache-size", "0"])).feature_cache_size == 0
