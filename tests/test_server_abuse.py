"""The server under abuse, on a real uvicorn socket: each bad client is refused without hurting the others.

Every case runs against uvicorn on 127.0.0.1:<free port> (raw sockets for what httpx will not send) and
proves, with a normal request made while the abuse is going on, that other clients are still served. The
SIGTERM test runs ``talk2dino serve`` as a subprocess with the tiny random model.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")

from test_server import header_only_png, png_bytes, running_server  # noqa: E402

from talk2dino import InferenceConfig, Segmenter  # noqa: E402
from talk2dino.server import ServerConfig, create_app  # noqa: E402

FAST = InferenceConfig(short_side=56, max_long_side=400, window=28, stride=14, pamr_iterations=3)
BODY_TIMEOUT_S = 2.0
LIMITS = ServerConfig(max_upload_bytes=300_000, max_pixels=200_000, max_score_values=2_000_000, max_labels=5,
                      max_label_length=20, body_timeout_s=BODY_TIMEOUT_S, request_timeout_s=60)
WAIT_S = 60.0
BOUNDARY = "talk2dino-abuse"


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def server(tiny_model: Any) -> Iterator[str]:
    with running_server(create_app(Segmenter(tiny_model, FAST), LIMITS)) as url:
        yield url


def normal_request(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/segment", data={"labels": "cat, sofa", "pamr": "false"},
                      files={"image": ("ok.png", png_bytes(), "image/png")}, timeout=WAIT_S)


def assert_served_meanwhile(url: str, abuse: Callable[[], Any]) -> Any:
    """Run `abuse` in a thread; while it runs, a normal request must succeed. Returns what `abuse` returned."""
    with ThreadPoolExecutor(1) as pool:
        pending: Future[Any] = pool.submit(abuse)
        time.sleep(0.3)  # let the abusive client get going first
        response = normal_request(url)
        assert response.status_code == 200, response.text
        assert not pending.done() or pending.exception() is None
        return pending.result(timeout=WAIT_S)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def multipart_head(filename: str = "x.png", labels: str = "cat") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\n{labels}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()


def multipart_body(image: bytes, labels: str = "cat") -> bytes:
    return multipart_head(labels=labels) + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def request_head(length: int | None, content_type: str = f"multipart/form-data; boundary={BOUNDARY}",
                 path: str = "/v1/segment", extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n{size}{extra}\r\n").encode()


def read_response(sock: socket.socket, timeout: float = WAIT_S) -> tuple[int, bytes]:
    """Status and raw bytes of one answer; (0, b"") when the server closed without answering."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        match = re.match(rb"HTTP/1\.1 (\d{3})", data)
        if match is None:
            return 0, data
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: (\d+)", head)
        while length is not None and len(body) < int(length.group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(match.group(1)), head + b"\r\n\r\n" + body
    return 0, data


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the server closed the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def noise_png(h: int, w: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def post_raw(url: str, body: bytes, content_type: str, path: str = "/v1/segment") -> httpx.Response:
    return httpx.post(f"{url}{path}", content=body, headers={"content-type": content_type}, timeout=WAIT_S)


# ---------------------------------------------------------------------------------------------- slow clients
def test_slow_loris_body_is_timed_out_with_408_while_others_are_served(server: str) -> None:
    def trickle() -> tuple[int, float]:
        body = multipart_body(png_bytes())
        with socket.create_connection(address(server), timeout=WAIT_S) as sock:
            sock.sendall(request_head(len(body)))
            begin = time.monotonic()
            sock.settimeout(0.2)
            for byte in body:  # a few bytes a second, for far longer than the body timeout
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break  # the server closed the connection: what we want
                with contextlib.suppress(TimeoutError):
                    if sock.recv(1, socket.MSG_PEEK):
                        break  # an answer is waiting
                if time.monotonic() - begin > 4 * BODY_TIMEOUT_S:
                    break
            status, data = read_response(sock)
            assert b"--body-timeout" in data, data
            return status, time.monotonic() - begin

    status, elapsed = assert_served_meanwhile(server, trickle)
    assert status == 408
    assert BODY_TIMEOUT_S * 0.9 <= elapsed < BODY_TIMEOUT_S + 2.0


def test_stalled_body_and_a_lying_content_length_get_408_and_the_connection_closes(server: str) -> None:
    def stall(declared_extra: int) -> int:
        body = multipart_body(png_bytes())
        with socket.create_connection(address(server), timeout=WAIT_S) as sock:
            # Half the body, then silence; or all of it under a Content-Length that promises more.
            sent = body[: len(body) // 2] if declared_extra == 0 else body
            sock.sendall(request_head(len(body) + declared_extra) + sent)
            status, data = read_response(sock)
            assert b"not received within" in data, data
            assert closed_by_server(sock)
            return status

    def both() -> list[int]:
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(stall, [0, 5000]))

    assert assert_served_meanwhile(server, both) == [408, 408]


def test_many_idle_and_slow_connections_do_not_block_a_normal_client(server: str) -> None:
    socks = []
    try:
        for i in range(20):
            sock = socket.create_connection(address(server), timeout=WAIT_S)
            if i % 2:
                sock.sendall(request_head(100_000) + multipart_head())  # then nothing
            socks.append(sock)
        response = normal_request(server)
        assert response.status_code == 200, response.text
        statuses = [read_response(s)[0] for s in socks[1::2]]
        assert statuses == [408] * 10
    finally:
        for sock in socks:
            sock.close()


# ---------------------------------------------------------------------------------------------- big bodies
def test_declared_oversized_body_is_refused_before_it_is_sent(server: str) -> None:
    def declare() -> int:
        with socket.create_connection(address(server), timeout=WAIT_S) as sock:
            sock.sendall(request_head(10 * 1024**3))  # 10 GiB announced, nothing sent
            status, data = read_response(sock, timeout=10)
            assert b"--max-upload-bytes" in data
            return status

    assert assert_served_meanwhile(server, declare) == 413


def test_chunked_oversized_body_is_refused_while_it_streams(server: str) -> None:
    def stream() -> tuple[int, int]:
        chunk = os.urandom(32 * 1024)
        with socket.create_connection(address(server), timeout=WAIT_S) as sock:
            sock.sendall(request_head(None) + b"%x\r\n%s\r\n" % (len(multipart_head()), multipart_head()))
            sent = 0
            sock.settimeout(0.05)
            status = 0
            while sent < 50 * LIMITS.max_upload_bytes:  # far more than the limit, if nobody stops us
                try:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except OSError:
                    break
                sent += len(chunk)
                with contextlib.suppress(TimeoutError):
                    if sock.recv(1, socket.MSG_PEEK):
                        break
            status, _ = read_response(sock)
            return status, sent

    status, sent = assert_served_meanwhile(server, stream)
    assert status == 413
    assert sent < 10 * LIMITS.max_upload_bytes  # answered long before the client was done


def test_content_length_smaller_than_the_body_is_a_client_error(server: str) -> None:
    body = multipart_body(png_bytes())
    with socket.create_connection(address(server), timeout=WAIT_S) as sock:
        # The first 100 bytes are the "body"; the rest is parsed as a (garbage) next request.
        sock.sendall(request_head(100) + body)
        status, _ = read_response(sock)
        assert 400 <= status < 500
    assert normal_request(server).status_code == 200


# ---------------------------------------------------------------------------------------------- bad content
def test_too_many_and_too_long_labels(server: str) -> None:
    many = ", ".join(f"label {i}" for i in range(10_000))
    assert post_raw(server, multipart_body(png_bytes(), labels=many),
                    f"multipart/form-data; boundary={BOUNDARY}").status_code == 422
    # A labels field over the multipart parser's per-field cap (1 MiB) is refused by the parser.
    huge = "x" * (LIMITS.max_upload_bytes - 10_000)
    response = post_raw(server, multipart_body(png_bytes(), labels=huge), f"multipart/form-data; boundary={BOUNDARY}")
    assert 400 <= response.status_code < 500, response.text
    embed = httpx.post(f"{server}/v1/embed-text", json={"labels": [f"l{i}" for i in range(1000)]}, timeout=WAIT_S)
    assert embed.status_code == 422, embed.text


@pytest.mark.parametrize(("body", "content_type"), [
    (b"", f"multipart/form-data; boundary={BOUNDARY}"),
    (b"no boundary anywhere", f"multipart/form-data; boundary={BOUNDARY}"),
    (multipart_head(), f"multipart/form-data; boundary={BOUNDARY}"),  # cut off inside the file part
    (f"--{BOUNDARY}\r\n\r\nno headers\r\n--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"),
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
     f"multipart/form-data; boundary={BOUNDARY}"),  # a part without a name
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"labels\"\r\nX: " .encode() + b"y" * 20_000,
     f"multipart/form-data; boundary={BOUNDARY}"),  # an endless part header
    (multipart_body(png_bytes()), "multipart/form-data; boundary=" + "b" * 300),  # a boundary that never occurs
    (multipart_body(png_bytes()), "multipart/form-data; boundary=\"\""),
    (multipart_body(png_bytes()), "multipart/mixed; boundary=" + BOUNDARY),
    ("".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nv\r\n" for i in range(2000))
     .encode() + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"),  # 2000 fields
    (b"\xff\xfe" * 1000, f"multipart/form-data; boundary={BOUNDARY}; charset=utf-16"),
], ids=["empty", "garbage", "truncated", "no-part-headers", "no-name", "endless-header", "boundary-absent",
        "empty-boundary", "multipart-mixed", "too-many-fields", "binary-junk"])
def test_malformed_multipart_is_a_4xx(server: str, body: bytes, content_type: str) -> None:
    response = post_raw(server, body, content_type)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert "error" in response.json()


@pytest.mark.parametrize(("path", "body", "content_type"), [
    ("/v1/segment", b"labels=cat", "application/x-www-form-urlencoded"),
    ("/v1/segment", b"labels: cat", "text/plain"),
    ("/v1/segment", b"\x89PNG....", "image/png"),
    ("/v1/segment", b'{"labels": "cat"}', "application/json"),
    ("/v1/segment", b"<labels>cat</labels>", "application/xml"),
    ("/v1/embed-text", b"labels=cat", "application/x-www-form-urlencoded"),
    ("/v1/embed-text", b"<labels>cat</labels>", "application/xml"),
    ("/v1/embed-text", b'{"labels": ["cat"', "application/json"),
    ("/v1/embed-text", b'{"labels": "cat"}', "application/json"),
    ("/v1/embed-text", b"\xff\xfe\x00", "application/json"),
])
def test_wrong_content_types_are_4xx(server: str, path: str, body: bytes, content_type: str) -> None:
    response = post_raw(server, body, content_type, path)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert "error" in response.json()


def test_decompression_bombs_are_413_before_decoding(server: str) -> None:
    # A real PNG: 6000 x 6000 black pixels compress to a few dozen KB (within the upload limit).
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + 6000 * 3)  # filter byte + RGB
    compressed = b"".join(packer.compress(row) for _ in range(6000)) + packer.flush()
    empty = header_only_png(6000, 6000)
    idat = (len(compressed).to_bytes(4, "big") + b"IDAT" + compressed
            + zlib.crc32(b"IDAT" + compressed).to_bytes(4, "big"))
    real_bomb = empty[:33] + idat + empty[-12:]  # signature + IHDR, the real IDAT, IEND
    assert len(real_bomb) < LIMITS.max_upload_bytes
    with Image.open(io.BytesIO(real_bomb)) as check:
        assert check.size == (6000, 6000)
    files: list[tuple[str, bytes]] = [("bomb.png", real_bomb), ("header.png", header_only_png(60_000, 60_000))]
    # A GIF whose logical screen is 65535 x 65535.
    gif = io.BytesIO()
    Image.new("P", (4, 4)).save(gif, format="GIF")
    data = bytearray(gif.getvalue())
    data[6:10] = (65535).to_bytes(2, "little") * 2
    files.append(("screen.gif", bytes(data)))

    def send_all() -> list[httpx.Response]:
        return [httpx.post(f"{server}/v1/segment", data={"labels": "cat"}, files={"image": (name, blob, "image/png")},
                           timeout=WAIT_S) for name, blob in files]

    for response in assert_served_meanwhile(server, send_all):
        assert 400 <= response.status_code < 500, response.text
    assert send_all()[0].status_code == 413


def test_noise_image_at_the_upload_limit_is_refused_not_crashed(server: str) -> None:
    big = noise_png(300, 400)
    assert len(big) > LIMITS.max_upload_bytes
    response = httpx.post(f"{server}/v1/segment", data={"labels": "cat"},
                          files={"image": ("n.png", big, "image/png")}, timeout=WAIT_S)
    assert response.status_code == 413
    assert response.headers.get("connection") == "close"


def test_the_server_is_healthy_after_the_abuse(server: str) -> None:
    health = httpx.get(f"{server}/healthz", timeout=WAIT_S).json()
    assert health["worker_alive"] is True
    assert health["queue"]["failed"] == 0
    assert normal_request(server).status_code == 200


# ---------------------------------------------------------------------------------------------- overload
def test_admission_refuses_with_429_when_the_work_ahead_would_time_out(tiny_model: Any) -> None:
    from test_server import heavy_request, heavy_segmenter, wait_idle

    # Each heavy request holds the worker ~3 s; with a 5 s timeout (4 s admission budget) at most one may wait.
    config = ServerConfig(request_timeout_s=5.0, max_batch=1, queue_size=16, retry_after_s=1)
    with running_server(create_app(heavy_segmenter(tiny_model), config)) as url:
        assert heavy_request(url, labels=5).status_code == 200  # teaches the worker its speed
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: heavy_request(url, labels=5), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429} and 429 in codes, codes  # refused up front: no 503 timeouts
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        queue = wait_idle(url)
        assert queue["timed_out"] == 0 and queue["rejected_overloaded"] >= 1


# ---------------------------------------------------------------------------------------------- SIGTERM
def _start_cli_server(tiny_sources: dict[str, str], *extra: str) -> tuple[subprocess.Popen[str], str, list[str]]:
    command = [sys.executable, "-m", "talk2dino.cli", "serve", "--offline", "--backbone", tiny_sources["backbone"],
               "--text-encoder", tiny_sources["text_encoder"], "--projection", tiny_sources["projection"],
               "--port", "0", "--max-batch", "1", *extra]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"running on http://127\.0\.0\.1:(\d+)", line, re.IGNORECASE)
        if match:
            reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
            reader.start()
            return proc, f"http://127.0.0.1:{match.group(1)}", lines
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def _heavy(url: str) -> httpx.Response:
    names = ", ".join(f"thing {i}" for i in range(30))
    return httpx.post(f"{url}/v1/segment", data={"labels": names, "pamr": "true", "background": "true"},
                      files={"image": ("big.png", png_bytes(600, 800, seed=4), "image/png")}, timeout=WAIT_S)


def _sigterm_mid_request(tiny_sources: dict[str, str], grace: str, requests: int) -> tuple[list[int], int, str]:
    proc, url, lines = _start_cli_server(tiny_sources, "--shutdown-grace", grace)
    try:
        with ThreadPoolExecutor(requests) as pool:
            pending = [pool.submit(_heavy, url) for _ in range(requests)]
            deadline = time.monotonic() + WAIT_S
            while True:  # every request admitted (one computing, the others queued), so all are in flight
                queue = httpx.get(f"{url}/healthz", timeout=WAIT_S).json()["queue"]
                if queue["busy"] and queue["waiting"] >= requests - 1:
                    break
                assert time.monotonic() < deadline, f"the requests never got in: {queue}"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            statuses = [p.result().status_code for p in pending]
        code = proc.wait(WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    time.sleep(0.2)  # the reader thread drains the last lines
    return statuses, code, "".join(lines)


def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny_sources: dict[str, str]) -> None:
    statuses, code, log = _sigterm_mid_request(tiny_sources, grace="60", requests=3)
    assert statuses == [200, 200, 200], (statuses, log)
    assert code == 0, log
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "refusing new requests" in log and "server stopped" in log, log


def test_sigterm_answers_503_after_the_grace_period_and_exits_0(tiny_sources: dict[str, str]) -> None:
    statuses, code, log = _sigterm_mid_request(tiny_sources, grace="0", requests=4)
    assert set(statuses) <= {200, 503} and 503 in statuses, (statuses, log)
    assert code == 0, log
    assert "Traceback" not in log, log


# ---------------------------------------------------------------------------------------------- schemathesis finds
def test_inputs_schemathesis_generated_are_4xx(server: str) -> None:
    """Schema-valid-looking inputs from the fuzz runs: each a one-line 4xx, never a 5xx."""
    cases = [
        ("/v1/embed-text", {"json": {"labels": [""]}}, 400),
        ("/v1/embed-text", {"json": {"labels": ["cat", "cat"]}}, 400),
        ("/v1/embed-text", {"json": {"labels": ["cat"], "templates": ["no placeholder"]}}, 400),
        ("/v1/segment", {"data": {"labels": "cat", "background": "None"},
                         "files": {"image": ("x.png", png_bytes(), "image/png")}}, 422),
        ("/v1/segment", {"data": {"labels": "cat", "image": "x"}}, 422),  # the image as a text field
    ]
    for path, kwargs, status in cases:
        response = httpx.post(f"{server}{path}", timeout=WAIT_S, **kwargs)
        assert response.status_code == status, (path, kwargs, response.text)
        assert "\n" not in response.json()["error"]


def test_schema_documents_form_fields_as_a_client_can_send_them(server: str) -> None:
    schema = httpx.get(f"{server}/openapi.json", timeout=WAIT_S).json()
    form = schema["components"]["schemas"]["Body_segment_v1_segment_post"]["properties"]
    assert form["image"]["format"] == "binary"
    assert not any({"type": "null"} in field.get("anyOf", []) for field in form.values())
    for code in ("408", "413", "422", "429", "503"):
        assert code in schema["paths"]["/v1/segment"]["post"]["responses"]
