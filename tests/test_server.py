"""The HTTP server on loopback with a tiny random model: valid requests, every limit, bad requests, queueing.

Every test talks to a real uvicorn server bound to 127.0.0.1 on a free port (no traffic leaves the machine);
loops that wait are bounded.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

fastapi = pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")

from talk2dino import InferenceConfig, Segmenter  # noqa: E402
from talk2dino.render import overlay, palette, rle_decode  # noqa: E402
from talk2dino.server import ServerConfig, create_app  # noqa: E402
from talk2dino.server.uploads import parse_labels  # noqa: E402

# Small geometry keeps the tiny model fast while still producing several windows (as tests/test_predictor.py).
FAST = InferenceConfig(short_side=56, max_long_side=400, window=28, stride=14, pamr_iterations=3)
LIMITS = ServerConfig(max_upload_bytes=300_000, max_pixels=200_000, max_score_values=400_000, max_labels=5,
                      max_label_length=20, request_timeout_s=60)
WAIT_S = 60.0


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def running_server(app: Any, *, limit_concurrency: int | None = None) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on 127.0.0.1:<free port>; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # port 0: the kernel picks a free one, no race with other tests
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", limit_concurrency=limit_concurrency))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


def png_bytes(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    array = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def solid_png(h: int, w: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring `width` x `height`, with one tiny IDAT: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def decode_png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def post_segment(url: str, data: dict[str, str], image: bytes | None = None, name: str = "photo.png",
                 timeout: float = WAIT_S) -> httpx.Response:
    files = {"image": (name, image, "image/png")} if image is not None else None
    return httpx.post(f"{url}/v1/segment", data=data, files=files, timeout=timeout)


def assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "details"}
    assert "\n" not in body["error"]
    assert fragment in body["error"], body["error"]


@pytest.fixture(scope="module")
def server(tiny_model) -> Iterator[str]:
    """One loopback server with small limits for the request/limit tests of this module."""
    with running_server(create_app(Segmenter(tiny_model, FAST), LIMITS)) as url:
        yield url


HEAVY_SECONDS = 3.0  # how long a heavy image occupies the worker, whatever the machine's speed


class _SlowSegmenter(Segmenter):
    """A real Segmenter that also holds the worker for HEAVY_SECONDS on large images.

    The queueing tests (timeouts, a full queue, batching) need the worker busy for a known time; real
    computation alone takes anywhere from 0.3 s to several seconds depending on the machine's load.
    """

    def embed_images(self, images, **options):  # type: ignore[no-untyped-def]
        if any(getattr(image, "shape", (0, 0))[0] * getattr(image, "shape", (0, 0))[1] >= 400 * 400
               for image in images):
            time.sleep(HEAVY_SECONDS)
        return super().embed_images(images, **options)


def heavy_segmenter(tiny_model) -> Segmenter:
    # The protocol geometry (448-pixel windows) with PAMR, plus a fixed hold on large images.
    return _SlowSegmenter(tiny_model, InferenceConfig(pamr=True))


def heavy_request(url: str, labels: int = 60, size: tuple[int, int] = (600, 800)) -> httpx.Response:
    names = ", ".join(f"thing {i}" for i in range(labels))
    return post_segment(url, {"labels": names, "pamr": "true", "background": "true"}, png_bytes(*size, seed=3))


def wait_idle(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        queue = httpx.get(f"{url}/healthz", timeout=WAIT_S).json()["queue"]
        if not queue["busy"] and queue["waiting"] == 0:
            return queue
        assert time.monotonic() < deadline, "worker never became idle"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- valid requests
def test_health_models_schema_and_page(server: str) -> None:
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["worker_alive"] is True and health["model"] == "composed"
    models = httpx.get(f"{server}/v1/models").json()
    assert models["loaded"]["name"] == "composed"
    assert models["loaded"]["defaults"]["pamr"] is True
    assert models["limits"]["max_labels"] == 5 and models["limits"]["allow_image_url"] is False
    assert "talk2dino-vitb14-reg" in [m["name"] for m in models["available"]]
    assert httpx.get(f"{server}/v1/models/composed").json()["loaded"] is True
    assert httpx.get(f"{server}/v1/models/talk2dino-vitb14-reg").json()["loaded"] is False
    assert_error(httpx.get(f"{server}/v1/models/no-such-model"), 404, "unknown model 'no-such-model'")
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/segment", "/v1/embed-text", "/healthz", "/v1/models"} <= set(schema["paths"])
    form = schema["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in form
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "<title>talk2dino</title>" in page.text
    assert httpx.get(f"{server}/static/app.js").status_code == 200
    assert_error(httpx.get(f"{server}/no/such/route"), 404, "Not Found")


def test_segment_returns_legend_label_map_rle_overlay_and_pictures(server: str, tiny_model) -> None:
    image = png_bytes()
    response = post_segment(server, {
        "labels": "cat, sofa", "background": "true", "pamr": "false", "label_png": "true", "overlay": "true",
        "alpha": "0.4", "rle": "compressed", "heatmaps": "true", "attention": "true", "model": "composed",
    }, image)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == [48, 64]
    assert body["background_index"] == 0
    assert [entry["name"] for entry in body["labels"]] == ["background", "cat", "sofa"]
    assert [entry["color"] for entry in body["labels"]] == palette(3).tolist()
    assert sum(entry["pixels"] for entry in body["labels"]) == 48 * 64
    assert abs(sum(entry["share"] for entry in body["labels"]) - 1) < 1e-5
    assert body["settings"]["background"] is True and body["settings"]["pamr"] is False
    assert body["settings"]["bg_clean"] is True
    assert {"queue", "embed_image", "batch_size", "scores", "encode", "total"} <= set(body["timings"])

    # The label map is what the library itself predicts (the server is a plain client of Segmenter).
    label_image = decode_png(body["label_png"])
    assert label_image.mode == "P" and label_image.size == (64, 48)
    labels = np.array(label_image)
    direct = Segmenter(tiny_model, FAST)
    direct.set_classes(["cat", "sofa"])
    rgb = np.array(Image.open(io.BytesIO(image)).convert("RGB"))
    direct.set_image(rgb)
    np.testing.assert_array_equal(labels, direct.predict(background=True, pamr=False).labels.numpy())
    for entry in body["labels"]:
        assert int((labels == entry["index"]).sum()) == entry["pixels"]

    # One overlay implementation: the server's PNG is render.overlay of the same inputs.
    np.testing.assert_array_equal(np.array(decode_png(body["overlay_png"])),
                                  overlay(rgb, labels, 3, alpha=0.4, background_index=0))

    assert [r["name"] for r in body["rle"]] == ["background", "cat", "sofa"]
    for rle in body["rle"]:
        assert isinstance(rle["counts"], str) and rle["size"] == [48, 64]
        np.testing.assert_array_equal(rle_decode(rle), labels == rle["index"])

    assert [h["name"] for h in body["heatmaps"]] == ["cat", "sofa"]  # the constant background is left out
    low, high = body["heatmap_range"]
    assert 0 < low <= high < 1
    for heat in body["heatmaps"]:
        assert decode_png(heat["png"]).size == tuple(reversed(body["heatmap_size"]))
    heads = tiny_model.backbone.model.config.num_attention_heads
    assert [a["head"] for a in body["attention"]] == list(range(heads))
    assert decode_png(body["attention"][0]["png"]).size == tuple(reversed(body["attention_size"]))


def test_segment_minimal_answer_json_labels_and_uncompressed_rle(server: str) -> None:
    response = post_segment(server, {"labels": '["a, b", "c"]', "pamr": "false", "rle": "uncompressed"},
                            png_bytes(30, 40))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [entry["name"] for entry in body["labels"]] == ["a, b", "c"]
    assert body["background_index"] is None
    assert not {"label_png", "overlay_png", "heatmaps", "attention"} & set(body)
    for rle in body["rle"]:
        assert isinstance(rle["counts"], list) and sum(rle["counts"]) == 30 * 40


def test_embed_text_matches_the_segmenter_and_is_validated(server: str, tiny_model) -> None:
    response = httpx.post(f"{server}/v1/embed-text", json={"labels": ["cat", "dog"]}, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["labels"] == ["cat", "dog"] and body["dim"] == 32 and body["templates"] == 7
    vectors = torch.tensor(body["embeddings"])
    torch.testing.assert_close(vectors, Segmenter(tiny_model, FAST).class_embeddings(["cat", "dog"]))
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))
    custom = httpx.post(f"{server}/v1/embed-text", json={"labels": ["cat"], "templates": ["a {}."]}, timeout=WAIT_S)
    assert custom.status_code == 200 and custom.json()["templates"] == 1
    assert_error(httpx.post(f"{server}/v1/embed-text", json={"labels": []}), 422, "labels")
    assert_error(httpx.post(f"{server}/v1/embed-text", json={"labels": ["a"] * 6}), 422, "--max-labels")
    assert_error(httpx.post(f"{server}/v1/embed-text", json={"labels": "cat"}), 422, "labels")
    assert_error(httpx.post(f"{server}/v1/embed-text", json={"labels": ["cat"], "templates": ["no slot"]},
                            timeout=WAIT_S), 400, "exactly one '{}'")
    assert_error(httpx.post(f"{server}/v1/embed-text", json={"labels": ["cat", "cat"]}, timeout=WAIT_S), 400,
                 "duplicate label")
    assert_error(httpx.post(f"{server}/v1/embed-text", json={"labels": ["cat"], "model": "other"}), 404,
                 "not served here")


# ---------------------------------------------------------------------------------------------- limits
@pytest.mark.parametrize(("labels", "status", "fragment"), [
    ("a, b, c, d, e, f", 422, "6 labels given; this server accepts at most 5 (--max-labels)"),
    ("cat, " + "x" * 21, 422, "--max-label-length"),
    ("cat,, dog", 400, "entry 2 of 3 is empty"),
    ("cat, cat", 400, "duplicate label 'cat'"),
    ("background, cat", 400, "clashes with the background channel"),
    ('["cat", 3]', 400, "list of strings"),
])
def test_label_limits_and_errors(server: str, labels: str, status: int, fragment: str) -> None:
    assert_error(post_segment(server, {"labels": labels, "background": "true"}, png_bytes()), status, fragment)


def test_body_over_the_upload_limit_is_refused_by_length_and_while_streaming(server: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    big = buffer.getvalue()
    assert len(big) > LIMITS.max_upload_bytes
    assert_error(post_segment(server, {"labels": "cat"}, big), 413, "--max-upload-bytes")

    # Without Content-Length (chunked), the cap applies while the body streams in.
    boundary = "talk2dino-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\ncat\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]
        yield tail

    response = httpx.post(f"{server}/v1/segment", content=chunks(), timeout=WAIT_S,
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_error(response, 413, "--max-upload-bytes")


def test_images_over_the_pixel_limits_are_refused_before_decoding(server: str) -> None:
    assert_error(post_segment(server, {"labels": "cat"}, solid_png(400, 600)), 413,
                 "600x400 (240,000 pixels), above this server's limit of 200,000 (--max-pixels)")
    # 40,000 pixels x 4 channels is fine, 120,000 x 4 is over the score-volume cap of 400,000.
    assert post_segment(server, {"labels": "a, b, c, d", "pamr": "false"}, solid_png(200, 200)).status_code == 200
    assert_error(post_segment(server, {"labels": "a, b, c, d"}, solid_png(300, 400)), 413, "--max-score-values")
    # A header declaring 2.5 gigapixels: refused from the header alone (the file is a few dozen bytes).
    bomb = header_only_png(50_000, 50_000)
    assert len(bomb) < 100
    response = post_segment(server, {"labels": "cat"}, bomb, name="bomb.png")
    assert response.status_code == 413, response.text
    assert "bomb.png" in response.json()["error"] or "decompression bomb" in response.json()["error"]


def test_bad_images_and_sources(server: str) -> None:
    response = post_segment(server, {"labels": "cat"}, b"certainly not an image", name="notes.png")
    assert_error(response, 400, "notes.png: cannot identify image file")
    assert "talk2dino-upload" not in response.json()["error"]  # no server temp path leaks
    assert_error(post_segment(server, {"labels": "cat"}, png_bytes()[:200], name="cut.png"), 400, "cut.png")
    assert_error(post_segment(server, {"labels": "cat"}, solid_png(1, 50)), 400, "at least 2x2")
    assert_error(post_segment(server, {"labels": "cat"}), 400, "exactly one of an 'image' file or an 'image_url'")
    assert_error(post_segment(server, {"labels": "cat", "image_url": "http://127.0.0.1:9/x.png"}), 403,
                 "--allow-image-url")
    assert_error(post_segment(server, {"labels": "cat", "model": "talk2dino-vitl14-reg"}, png_bytes()), 404,
                 "not served here")


@pytest.mark.parametrize(("data", "fragment"), [
    ({"labels": "cat", "bg_threshold": "abc"}, "bg_threshold"),
    ({"labels": "cat", "bg_threshold": "1.5"}, "bg_threshold"),
    ({"labels": "cat", "threshold": "1.5"}, "threshold"),  # the deprecated alias is validated alike
    ({"labels": "cat", "pamr": "maybe"}, "pamr"),
    ({"labels": "cat", "rle": "zip"}, "rle"),
    ({"labels": "cat", "alpha": "2"}, "alpha"),
    ({"background": "true"}, "labels"),
])
def test_wrong_field_types_are_422(server: str, data: dict[str, str], fragment: str) -> None:
    assert_error(post_segment(server, data, png_bytes()), 422, fragment)


def test_bg_threshold_and_bg_clean_with_their_deprecated_aliases(tiny_model, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="talk2dino.server.uploads")
    with running_server(create_app(Segmenter(tiny_model, FAST), LIMITS)) as url:
        base = {"labels": "cat, sofa", "background": "true", "pamr": "false"}
        new = post_segment(url, {**base, "bg_threshold": "0.3", "bg_clean": "false"}, png_bytes())
        assert new.status_code == 200, new.text
        assert new.json()["settings"]["bg_threshold"] == 0.3 and new.json()["settings"]["bg_clean"] is False
        assert not [r for r in caplog.records if "deprecated" in r.getMessage()]

        old = post_segment(url, {**base, "threshold": "0.3", "clean": "false"}, png_bytes())
        assert old.status_code == 200, old.text
        assert old.json()["settings"] == new.json()["settings"]
        assert old.json()["labels"] == new.json()["labels"]
        warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
        assert len(warned) == 2 and "'threshold'" in warned[0] and "'bg_threshold'" in warned[0]
        assert "'clean'" in warned[1] and "'bg_clean'" in warned[1]
        assert post_segment(url, {**base, "threshold": "0.3"}, png_bytes()).status_code == 200
        assert len([r for r in caplog.records if "deprecated" in r.getMessage()]) == 2  # once per alias

        # Both names (a client talking to old and new servers): fine when they agree, a 400 when not.
        both = post_segment(url, {**base, "threshold": "0.3", "bg_threshold": "0.3"}, png_bytes())
        assert both.status_code == 200 and both.json()["settings"]["bg_threshold"] == 0.3
        assert_error(post_segment(url, {**base, "clean": "true", "bg_clean": "false"}, png_bytes()), 400,
                     "bg_clean=False and its deprecated alias clean=True disagree; send bg_clean only")

        schema = httpx.get(f"{url}/openapi.json").json()
        ref = schema["paths"]["/v1/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        form = schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[-1]]["properties"]
        assert form["threshold"]["deprecated"] is True and form["clean"]["deprecated"] is True
        assert "deprecated" not in form["bg_threshold"] and "deprecated" not in form["bg_clean"]


def test_request_options_never_change_the_served_segmenter(tiny_model) -> None:
    segmenter = Segmenter(tiny_model, FAST)
    defaults = segmenter.config
    with running_server(create_app(segmenter, LIMITS)) as url:
        first = post_segment(url, {"labels": "cat, sofa", "background": "true", "bg_threshold": "0.3",
                                   "bg_clean": "false", "pamr": "false"}, png_bytes())
        assert first.status_code == 200, first.text
        assert segmenter.config is defaults
        plain = post_segment(url, {"labels": "cat, sofa"}, png_bytes())
        assert plain.status_code == 200, plain.text
        settings = plain.json()["settings"]
        assert settings["background"] is defaults.background and settings["bg_threshold"] == defaults.bg_threshold
        assert settings["pamr"] is defaults.pamr
        assert httpx.get(f"{url}/v1/models").json()["loaded"]["defaults"] == defaults.effective_dict()
        # A label named 'background' is fine for a request without the background channel, whatever the other
        # requests asked for.
        named = post_segment(url, {"labels": "background, cat", "background": "false"}, png_bytes())
        assert named.status_code == 200, named.text
        assert_error(post_segment(url, {"labels": "background, cat", "background": "true"}, png_bytes()), 400,
                     "clashes with the background channel")


def test_uploads_are_decoded_from_memory_with_one_header_read(tiny_model, monkeypatch) -> None:
    import tempfile

    opened: list[object] = []
    real_open = Image.open

    def counting_open(source: Any, *args: Any, **kwargs: Any) -> Image.Image:
        opened.append(source)
        return real_open(source, *args, **kwargs)

    def no_temp_file(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the upload was copied to a temporary file")

    with running_server(create_app(Segmenter(tiny_model, FAST), LIMITS)) as url:
        monkeypatch.setattr(Image, "open", counting_open)
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_temp_file)
        monkeypatch.setattr(tempfile, "mkstemp", no_temp_file)
        response = post_segment(url, {"labels": "cat", "pamr": "false"}, png_bytes(seed=5))
        assert response.status_code == 200, response.text
        assert len(opened) == 1 and not isinstance(opened[0], (str, Path))  # the spooled upload itself
        # The bytes' sha256 still keys the feature cache.
        again = post_segment(url, {"labels": "sofa", "pamr": "false"}, png_bytes(seed=5))
        assert again.json()["timings"]["cached_features"] == 1


def test_malformed_and_non_multipart_bodies(server: str) -> None:
    url = f"{server}/v1/segment"
    garbage = httpx.post(url, content=b"--x\r\nthis is not multipart at all",
                         headers={"content-type": "multipart/form-data; boundary=x"})
    assert_error(garbage, 400, "multipart")
    assert_error(httpx.post(url, content=b"abc", headers={"content-type": "multipart/form-data"}), 400, "boundary")
    assert_error(httpx.post(url, json={"labels": "cat"}), 415, "send multipart/form-data")
    # The image sent as a text field instead of a file.
    assert_error(httpx.post(url, data={"labels": "cat", "image": "not a file"}), 422, "image")
    # A broken Content-Length (httpx refuses to send one, so a raw socket does): 400, whichever layer says it.
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as raw:
        raw.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: nonsense\r\n\r\nx")
        assert raw.recv(200).startswith(b"HTTP/1.1 400")


def test_no_queue_slot_leaks_after_errors(server: str) -> None:
    queue = wait_idle(server)
    assert queue["waiting"] == 0 and queue["failed"] == 0


# ---------------------------------------------------------------------------------------------- queueing
def test_full_queue_answers_429_with_retry_after(tiny_model) -> None:
    config = ServerConfig(queue_size=1, max_batch=1, retry_after_s=7)
    with running_server(create_app(heavy_segmenter(tiny_model), config)) as url:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: heavy_request(url, labels=10), range(4)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 7  # the configured floor, or the worker's estimate
        assert "requests are already waiting" in refused.json()["error"]
        assert wait_idle(url)["rejected_queue_full"] >= 1


def test_timeouts_answer_503_and_the_worker_survives(tiny_model) -> None:
    config = ServerConfig(request_timeout_s=1.0, max_batch=1)  # well below HEAVY_SECONDS
    with running_server(create_app(heavy_segmenter(tiny_model), config)) as url:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(heavy_request, url, 50)
            # The second request queues behind the first: sent once the worker holds the first (a fixed pause
            # let it overtake the first's upload on a loaded machine).
            # Up to WAIT_S: on a loaded CI machine the first upload can take longer than a few seconds, and a
            # second request sent before the worker holds the first is simply served (200), which is not the
            # case under test.
            deadline = time.monotonic() + WAIT_S
            while not httpx.get(f"{url}/healthz").json()["queue"]["busy"]:
                assert time.monotonic() < deadline, "the worker never picked up the first request"
                time.sleep(0.02)
            second = pool.submit(post_segment, url, {"labels": "cat", "pamr": "false"}, png_bytes())
            results = [first.result(), second.result()]
        for response in results:
            assert_error(response, 503, "--request-timeout")
        queue = wait_idle(url)
        assert queue["timed_out"] == 2
        assert queue["skipped_cancelled"] + queue["completed"] <= 2  # queued work was dropped, not crashed on
        light = post_segment(url, {"labels": "cat", "pamr": "false"}, png_bytes())
        assert light.status_code == 200, light.text
        assert httpx.get(f"{url}/healthz").json()["worker_alive"] is True


def test_concurrent_requests_share_a_batch_and_match_single_runs(tiny_model) -> None:
    config = ServerConfig(max_batch=4)
    with running_server(create_app(heavy_segmenter(tiny_model), config)) as url:
        def light(seed: int) -> httpx.Response:
            return post_segment(url, {"labels": "cat, sofa", "pamr": "false", "label_png": "true"},
                                png_bytes(48, 64, seed=seed))

        with ThreadPoolExecutor(4) as pool:
            blocker = pool.submit(heavy_request, url, 40)  # keeps the worker busy while the others queue
            time.sleep(0.3)
            batched = list(pool.map(light, range(3)))
            assert blocker.result().status_code == 200
        assert all(r.status_code == 200 for r in batched), [r.text for r in batched]
        assert max(r.json()["timings"]["batch_size"] for r in batched) >= 2
        assert wait_idle(url)["largest_batch"] >= 2
        # Batch equivalence: each answer equals the same request served alone.
        for seed, response in enumerate(batched):
            alone = light(seed).json()
            assert alone["timings"]["batch_size"] == 1
            assert np.array_equal(np.array(decode_png(response.json()["label_png"])),
                                  np.array(decode_png(alone["label_png"])))


# ---------------------------------------------------------------------------------------------- image_url
@contextlib.contextmanager
def static_site(files: dict[str, bytes]) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            data = files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll_interval: shutdown() waits for the next poll (0.5 s by default).
    thread = threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


def test_image_url_when_enabled(tiny_model) -> None:
    # Loopback is refused unless allowed (server/fetch.py); tests/test_image_url.py covers the refusals.
    config = ServerConfig(allow_image_url=True, max_upload_bytes=100_000, url_timeout_s=5,
                          url_allow_networks=("127.0.0.0/8",))
    files = {"/ok.png": png_bytes(), "/big.png": b"x" * 150_000}
    with static_site(files) as site, running_server(create_app(Segmenter(tiny_model, FAST), config)) as url:
        ok = post_segment(url, {"labels": "cat", "pamr": "false", "image_url": f"{site}/ok.png"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["size"] == [48, 64]
        assert_error(post_segment(url, {"labels": "cat", "image_url": f"{site}/missing.png"}), 400,
                     "cannot fetch image_url")
        assert_error(post_segment(url, {"labels": "cat", "image_url": f"{site}/big.png"}), 413, "--max-upload-bytes")
        assert_error(post_segment(url, {"labels": "cat", "image_url": "file:///etc/passwd"}), 400,
                     "cannot fetch image_url")
        assert_error(post_segment(url, {"labels": "cat", "image_url": f"{site}/ok.png"}, png_bytes()), 400,
                     "exactly one")


# ---------------------------------------------------------------------------------------------- units
def test_parse_labels() -> None:
    assert parse_labels(" cat , sofa ,window") == ["cat", "sofa", "window"]
    assert parse_labels('["a, b", " c "]') == ["a, b", " c "]


def test_server_config_validation_and_environment() -> None:
    from talk2dino.errors import InvalidInputError

    config = ServerConfig.from_env({"TALK2DINO_SERVE_PORT": "9001", "TALK2DINO_SERVE_ALLOW_IMAGE_URL": "yes",
                                    "TALK2DINO_SERVE_REQUEST_TIMEOUT_S": "2.5"})
    assert (config.port, config.allow_image_url, config.request_timeout_s) == (9001, True, 2.5)
    assert config.replace(port=None, max_batch=2).max_batch == 2
    with pytest.raises(InvalidInputError, match="TALK2DINO_SERVE_PORT"):
        ServerConfig.from_env({"TALK2DINO_SERVE_PORT": "http"})
    with pytest.raises(InvalidInputError, match="--max-labels"):
        ServerConfig(max_labels=256).validate()
    with pytest.raises(InvalidInputError, match="--queue-size"):
        create_app(Segmenter.__new__(Segmenter), ServerConfig(queue_size=0))


def test_library_does_not_import_the_server() -> None:
    import subprocess
    import sys

    code = ("import sys, talk2dino.cli, talk2dino.render, talk2dino.predictor; "
            "assert not [m for m in sys.modules if m.startswith(('talk2dino.server.app', 'fastapi', 'uvicorn'))]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_static_files_are_package_data() -> None:
    from talk2dino.server.app import STATIC_DIR

    assert {p.name for p in Path(STATIC_DIR).iterdir()} >= {"index.html", "app.js", "style.css"}
