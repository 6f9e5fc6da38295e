"""``image_url`` (``talk2dino serve --allow-image-url``) cannot be turned against the server's network (issue 14).

Everything runs against loopback `http.server` threads started here; names other than ``localhost`` go through a
fake resolver, so no test reaches the network. The fetch is checked on its own (`fetch_image_url`: address
policy, odd numeric spellings, pinned connections, redirects, one deadline, byte cap, one error text) and through
the HTTP route (refusal, success with ``url_allow_networks``, the deadline inside ``--request-timeout``, and
slow fetches holding fetch slots rather than queue slots).
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import ipaddress
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talk2dino.errors import InvalidInputError
from talk2dino.server import ServerConfig
from talk2dino.server import fetch as fetch_module
from talk2dino.server.fetch import (
    FETCH_ERROR,
    FetchError,
    FetchTooLargeError,
    address_refusal,
    fetch_image_url,
    parse_networks,
)

LOOPBACK = ("127.0.0.0/8",)


# ---------------------------------------------------------------------------------------------- loopback sites
Route = Callable[[http.server.BaseHTTPRequestHandler], None]


@dataclass
class Site:
    """A running loopback HTTP(S) server: its base URL, the requests it saw, and a stop signal for slow routes."""

    host: str
    port: int
    scheme: str = "http"
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"


@contextlib.contextmanager
def site(routes: dict[str, Route], *, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[Site]:
    """Serve `routes` (path -> handler) on `host`; unknown paths get 404."""
    state = Site(host, 0, "https" if tls else "http")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            state.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            with contextlib.suppress(OSError):  # the client may hang up (that is what some tests check)
                route(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    # serve_forever checks for shutdown() every poll_interval (0.5 s by default): each site would take that
    # long to stop, and the tests start about 40.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()


def ok(data: bytes, content_type: str = "image/png", **headers: str) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            h.send_header(name.replace("_", "-"), value)
        h.end_headers()
        h.wfile.write(data)

    return route


def unsized(data: bytes) -> Route:
    """200 without Content-Length: the body ends when the connection closes."""

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.protocol_version = "HTTP/1.0"
        h.send_response(200)
        h.end_headers()
        h.wfile.write(data)

    return route


def redirect(location: str | Callable[[], str], status: int = 302) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location() if callable(location) else location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


# Slow routes send this many bytes at most, then hang up: a fetch that ignores its deadline then takes
# ~15 s and fails its timing assertion, rather than hanging the test run.
DRIP_BYTES = 50


def drip_body(state: list[Site], interval: float = 0.3) -> Route:
    """200 with a larger Content-Length, then one byte every `interval` s (each read well inside any timeout)."""

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.flush()
        for _ in range(DRIP_BYTES):
            if state[0].stop.wait(interval):
                return
            h.wfile.write(b"x")
            h.wfile.flush()

    return route


def drip_headers(state: list[Site], interval: float = 0.3) -> Route:
    """The status line and a header that never ends, one byte every `interval` s."""

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        for byte in (b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * DRIP_BYTES)[:DRIP_BYTES]:
            if state[0].stop.wait(interval):
                return
            h.wfile.write(bytes([byte]))
            h.wfile.flush()

    return route


def closed_port() -> int:
    """A loopback port with nobody listening (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Fake DNS for names ending in ``.test`` (value: address list, or an exception to raise); records lookups."""
    real = socket.getaddrinfo
    names: dict[str, Any] = {"lookups": []}

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if isinstance(host, str) and host.endswith(".test"):
            names["lookups"].append(host)
            answer = names.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
            if isinstance(answer, BaseException):
                raise answer
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                     (a, port, 0, 0) if ":" in a else (a, port)) for a in answer]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", getaddrinfo)
    return names


def fetch(url: str, *, seconds: float = 5.0, max_bytes: int = 100_000, allow: tuple[str, ...] = LOOPBACK,
          **kwargs: Any) -> bytes:
    return fetch_image_url(url, max_bytes=max_bytes, deadline=time.monotonic() + seconds, allowed_networks=allow,
                           **kwargs)


def refused(url: str, **kwargs: Any) -> str:
    """The client-facing text of a failed fetch (asserting it fails)."""
    with pytest.raises(FetchError) as info:
        fetch(url, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- the classifier
REFUSED = [
    "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "100.127.255.255", "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "240.0.0.1",
    "255.255.255.255", "192.0.0.8", "192.0.2.1", "198.18.0.1", "198.51.100.7", "203.0.113.9",
    "::", "::1", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "ff0e::1", "fec0::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:0.0.0.0", "::ffff:100.64.0.1",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "2002:7f00:1::", "2002:a9fe:a9fe::1", "2002:c0a8:101::",  # 6to4 of 127.0.0.1, 169.254.169.254, 192.168.1.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1",  # NAT64 of 127.0.0.1, metadata, 10.0.0.1
    "64:ff9b:1::1", "::ffff:0:808:808",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.128.0.1", "100.63.255.255", "172.32.0.1", "172.15.255.255",
          "192.169.0.1", "169.255.0.1", "223.255.255.254", "2606:4700:4700::1111", "2001:4860:4860::8888",
          "2a00:1450:4001::1", "::ffff:8.8.8.8", "2002:808:808::", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", REFUSED)
def test_classifier_refuses_non_public_addresses(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_classifier_allows_public_addresses(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(("address", "networks", "allowed"), [
    ("127.0.0.1", ["127.0.0.0/8"], True),
    ("::ffff:127.0.0.1", ["127.0.0.0/8"], True),  # the mapped form reaches the same IPv4 address
    ("64:ff9b::a00:1", ["10.0.0.0/8"], True),  # so does NAT64
    ("10.0.0.1", ["127.0.0.0/8"], False),
    ("::1", ["127.0.0.0/8"], False),
    ("::1", ["::1/128"], True),
    ("192.168.7.20", ["192.168.7.0/24"], True),
    ("192.168.8.20", ["192.168.7.0/24"], False),
    ("169.254.169.254", ["10.0.0.0/8", "192.168.0.0/16"], False),
])
def test_classifier_with_allowed_networks(address: str, networks: list[str], allowed: bool) -> None:
    assert (address_refusal(ipaddress.ip_address(address), parse_networks(networks)) is None) is allowed


PRIVATE_V4 = [ipaddress.IPv4Network(n) for n in ("127.0.0.0/8", "10.0.0.0/8", "169.254.0.0/16", "192.168.0.0/16",
                                                 "172.16.0.0/12", "100.64.0.0/10", "0.0.0.0/8", "224.0.0.0/4")]
PRIVATE_IPS = st.sampled_from(PRIVATE_V4).flatmap(
    lambda net: st.integers(int(net.network_address), int(net.broadcast_address)).map(ipaddress.IPv4Address))


@settings(max_examples=300, deadline=None)
@given(PRIVATE_IPS)
def test_classifier_refuses_every_private_ipv4_and_its_ipv6_forms(ip: ipaddress.IPv4Address) -> None:
    forms = [ip, ipaddress.IPv6Address(f"::ffff:{ip}"), ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80)),
             ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(ip))]
    for form in forms:
        assert address_refusal(form) is not None, form


def test_allowed_networks_are_validated_in_one_line() -> None:
    assert parse_networks(["10.0.0.0/8", "fd00::/8", "192.168.1.7"])[2] == ipaddress.ip_network("192.168.1.7/32")
    for bad in ("10.0.0.0/33", "localhost", "10.0.0.0/8,11.0.0.0/8", ""):
        with pytest.raises(InvalidInputError, match="--url-allow-network") as info:
            ServerConfig(url_allow_networks=(bad,)).validate()
        assert "\n" not in str(info.value)


def test_allowed_networks_from_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from talk2dino.cli.main import build_parser
    from talk2dino.cli.serve import serve_config

    config = ServerConfig.from_env({"TALK2DINO_SERVE_URL_ALLOW_NETWORKS": "10.0.0.0/8, fd00::/8"})
    assert config.url_allow_networks == ("10.0.0.0/8", "fd00::/8")
    monkeypatch.setenv("TALK2DINO_SERVE_URL_ALLOW_NETWORKS", "10.0.0.0/8")
    args = build_parser().parse_args(["serve", "--url-allow-network", "192.168.0.0/16",
                                      "--url-allow-network", "127.0.0.1"])
    assert serve_config(args).url_allow_networks == ("192.168.0.0/16", "127.0.0.1")  # flags win over the env
    assert serve_config(build_parser().parse_args(["serve"])).url_allow_networks == ("10.0.0.0/8",)
    monkeypatch.delenv("TALK2DINO_SERVE_URL_ALLOW_NETWORKS")
    assert serve_config(build_parser().parse_args(["serve"])).url_allow_networks == ()
    with pytest.raises(InvalidInputError, match="not an IP network"):
        serve_config(build_parser().parse_args(["serve", "--url-allow-network", "10.0.0.0/99"]))


# ---------------------------------------------------------------------------------------------- the fetch
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "0177.0.0.1", "127.1",
                                  "0x7f.1", "0.0.0.0", "[::ffff:127.0.0.1]", "[::1]"])
def test_loopback_in_any_spelling_is_refused_without_connecting(host: str) -> None:
    with site({"/ok.png": ok(b"image")}) as web:
        assert refused(web.url("/ok.png", host), allow=()) == FETCH_ERROR
        assert web.seen == []  # refused before connecting, not after


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0177.0.0.1", "127.1",
                                  "[::ffff:127.0.0.1]"])
def test_allowed_network_fetches_and_sends_safe_headers(host: str) -> None:
    with site({"/ok.png": ok(b"image")}) as web:
        assert fetch(web.url("/ok.png", host)) == b"image"
        (path, headers), = web.seen
        assert path == "/ok.png" and headers["accept-encoding"] == "identity"
        assert headers["host"] == f"{host}:{web.port}"  # the URL's host, though the socket went to the IP


def test_connection_goes_to_the_checked_address_looked_up_once(resolver: dict[str, Any]) -> None:
    """DNS rebinding: the name is resolved once per hop and the socket connects to that very address."""
    resolver["images.test"] = ["127.0.0.1"]
    with site({"/ok.png": ok(b"image")}) as web:
        assert fetch(web.url("/ok.png", "images.test")) == b"image"
        assert resolver["lookups"] == ["images.test"]
        assert web.seen[0][1]["host"] == f"images.test:{web.port}"
        # A name with any refused address is refused as a whole, even if another address is allowed.
        resolver["mixed.test"] = ["127.0.0.1", "10.0.0.1"]
        assert refused(web.url("/ok.png", "mixed.test")) == FETCH_ERROR
        resolver["meta.test"] = ["169.254.169.254"]
        assert refused(web.url("/ok.png", "meta.test"), allow=("127.0.0.0/8",)) == FETCH_ERROR
        assert len(web.seen) == 1


@pytest.mark.parametrize("url", [
    "ftp://127.0.0.1/x.png", "file:///etc/passwd", "gopher://127.0.0.1:70/", "//127.0.0.1/x.png", "x.png",
    "http://user:pw@127.0.0.1:{port}/ok.png", "http://user@127.0.0.1:{port}/ok.png", "http:///ok.png",
    "http://127.0.0.1:99999/ok.png", "http://127.0.0.1:port/ok.png", "http://[::1/ok.png",
    "http://" + "a" * 64 + ".test/ok.png",
])
def test_unusable_urls_get_the_same_error(url: str) -> None:
    with site({"/ok.png": ok(b"image")}) as web:
        assert refused(url.replace("{port}", str(web.port))) == FETCH_ERROR
        assert web.seen == []


def test_redirects_are_followed_only_to_allowed_addresses() -> None:
    with site({"/ok.png": ok(b"image")}, host="127.0.0.2") as inner:
        routes: dict[str, Route] = {"/ok.png": ok(b"outer image")}
        with site(routes) as outer:
            routes["/r1"] = redirect("/ok.png")
            routes["/r2"] = redirect("/r1", 301)
            routes["/r3"] = redirect(outer.url("/r2"), 307)
            routes["/r4"] = redirect("/r3", 308)
            routes["/loop"] = redirect("/loop")
            routes["/inner"] = redirect(inner.url("/ok.png"))
            routes["/metadata"] = redirect("http://169.254.169.254/latest/meta-data/")
            routes["/file"] = redirect("file:///etc/passwd")
            routes["/ftp"] = redirect("ftp://127.0.0.1/x")
            routes["/empty"] = redirect("")
            only_outer = ("127.0.0.1/32",)
            assert fetch(outer.url("/r3"), allow=only_outer) == b"outer image"  # 3 redirects: the limit
            for path in ("/r4", "/loop", "/inner", "/metadata", "/file", "/ftp", "/empty"):
                assert refused(outer.url(path), allow=only_outer) == FETCH_ERROR, path
            assert inner.seen == []  # the refused hop was never connected to
            assert fetch(outer.url("/inner"), allow=LOOPBACK) == b"image"  # allowed when its network is


def test_one_deadline_cuts_slow_servers(caplog: pytest.LogCaptureFixture) -> None:
    """A server sending a byte every 0.3 s never trips a per-read timeout; the overall deadline still holds."""
    slot: list[Site] = []
    routes = {"/body": drip_body(slot), "/headers": drip_headers(slot)}
    with site(routes) as web:
        slot.append(web)
        caplog.set_level(logging.INFO, logger="talk2dino.server.fetch")
        for path in ("/body", "/headers"):
            clock = time.monotonic()
            assert refused(web.url(path), seconds=1.5) == FETCH_ERROR
            assert 1.4 < time.monotonic() - clock < 3.0, path
        assert "deadline" in caplog.text
        # A deadline already past fails at once, before any lookup.
        clock = time.monotonic()
        assert refused(web.url("/body"), seconds=-1) == FETCH_ERROR
        assert time.monotonic() - clock < 0.5


def test_byte_cap_from_content_length_and_while_reading() -> None:
    big = b"x" * 5000
    with site({"/sized": ok(big), "/unsized": unsized(big), "/fits": unsized(b"x" * 1000)}) as web:
        for path in ("/sized", "/unsized"):
            with pytest.raises(FetchTooLargeError, match="--max-upload-bytes"):
                fetch(web.url(path), max_bytes=1000)
        assert fetch(web.url("/fits"), max_bytes=1000) == b"x" * 1000


def test_compressed_bodies_are_not_inflated() -> None:
    """The server asks for identity encoding; a server that sends gzip anyway gets its bytes back as they are."""
    bomb = gzip.compress(b"\0" * 5_000_000)
    with site({"/gz": ok(bomb, Content_Encoding="gzip")}) as web:
        assert fetch(web.url("/gz"), max_bytes=100_000) == bomb


def test_every_failure_has_the_same_text_and_the_reason_is_logged(
        resolver: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="talk2dino.server.fetch")
    slot: list[Site] = []
    with site({"/ok.png": ok(b"image"), "/500": lambda h: h.send_error(500), "/slow": drip_body(slot)}) as web:
        slot.append(web)
        texts = {
            "connection refused": refused(f"http://127.0.0.1:{closed_port()}/ok.png"),
            "404": refused(web.url("/missing.png")),
            "500": refused(web.url("/500")),
            "refused address": refused(web.url("/ok.png"), allow=()),
            "dns failure": refused(web.url("/ok.png", "nowhere.test")),
            "timeout": refused(web.url("/slow"), seconds=0.5),
            "bad scheme": refused("ftp://127.0.0.1/"),
        }
    assert set(texts.values()) == {FETCH_ERROR}, texts
    for reason in ("Connection refused", "HTTP 404", "HTTP 500", "not a public address", "DNS lookup",
                   "deadline", "scheme"):
        assert reason in caplog.text, reason


def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (openssl CLI); the test skips without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the TLS test needs the openssl command")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}"], check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_verifies_the_certificate_of_the_urls_host(tmp_path: Path, resolver: dict[str, Any]) -> None:
    cert, key = make_certificate(tmp_path, "images.test")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    resolver["images.test"] = ["127.0.0.1"]
    resolver["other.test"] = ["127.0.0.1"]
    with site({"/ok.png": ok(b"tls image")}, tls=server_context) as web:
        # Connected to 127.0.0.1, verified as images.test: the name the client gave.
        assert fetch(web.url("/ok.png", "images.test"), ssl_context=trusting) == b"tls image"
        assert refused(web.url("/ok.png", "other.test"), ssl_context=trusting) == FETCH_ERROR  # wrong name
        assert refused(web.url("/ok.png", "images.test")) == FETCH_ERROR  # default context: unknown authority


# ---------------------------------------------------------------------------------------------- through the server
def png_image(h: int = 48, w: int = 64) -> bytes:
    """A small PNG with some structure (segmentation of it is deterministic, not meaningful)."""
    import io

    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    array = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def serve(tiny_model: Any) -> Callable[[ServerConfig], Any]:
    """Start the app over the tiny model on loopback: ``with serve(config) as base_url: ...``."""
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
    pytest.importorskip("httpx", reason="the server tests need httpx")
    from test_server import FAST, running_server

    from talk2dino import Segmenter
    from talk2dino.server import create_app

    return lambda config: running_server(create_app(Segmenter(tiny_model, FAST), config))


def post_url(base: str, image_url: str, **fields: str) -> Any:
    import httpx

    return httpx.post(f"{base}/v1/segment", data={"labels": "cat, sofa", "pamr": "false", "label_png": "true",
                                                  "image_url": image_url, **fields}, timeout=60)


def post_upload(base: str, image: bytes, **fields: str) -> Any:
    import httpx

    return httpx.post(f"{base}/v1/segment", data={"labels": "cat, sofa", "pamr": "false", **fields},
                      files={"image": ("p.png", image, "image/png")}, timeout=60)


def test_server_refuses_loopback_in_any_spelling(serve: Callable[[ServerConfig], Any]) -> None:
    config = ServerConfig(allow_image_url=True, max_upload_bytes=100_000)
    with site({"/ok.png": ok(png_image())}) as web, serve(config) as base:
        answers = [post_url(base, web.url("/ok.png", host)) for host in
                   ("127.0.0.1", "localhost", "[::1]", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0.0.0.0",
                    "[::ffff:127.0.0.1]")]
        answers.append(post_url(base, f"http://127.0.0.1:{closed_port()}/ok.png"))
        assert [a.status_code for a in answers] == [400] * len(answers)
        assert {a.json()["error"] for a in answers} == {FETCH_ERROR}  # no port-scan oracle
        assert {a.content for a in answers} == {answers[0].content}
        assert web.seen == []
        # The URL text check still comes first, with its own precise message.
        spaced = post_url(base, web.url("/a b.png"))
        assert spaced.status_code == 400 and "without spaces" in spaced.json()["error"]


def test_server_fetches_from_an_allowed_network(serve: Callable[[ServerConfig], Any]) -> None:
    image = png_image()
    config = ServerConfig(allow_image_url=True, max_upload_bytes=100_000, url_allow_networks=LOOPBACK)
    with site({"/ok.png": ok(image), "/big.png": ok(b"x" * 150_000), "/moved": redirect("/ok.png")}) as web, \
            serve(config) as base:
        fetched = post_url(base, web.url("/moved"))
        assert fetched.status_code == 200, fetched.text
        uploaded = post_upload(base, image, label_png="true")
        assert fetched.json()["size"] == [48, 64]
        assert fetched.json()["label_png"] == uploaded.json()["label_png"]  # same image, same segmentation
        big = post_url(base, web.url("/big.png"))
        assert big.status_code == 413 and "--max-upload-bytes" in big.json()["error"]


def test_a_slow_url_is_cut_by_the_request_timeout(serve: Callable[[ServerConfig], Any]) -> None:
    slot: list[Site] = []
    config = ServerConfig(allow_image_url=True, url_allow_networks=LOOPBACK, request_timeout_s=2, url_timeout_s=30)
    with site({"/slow": drip_body(slot, 0.5)}) as web, serve(config) as base:
        slot.append(web)
        clock = time.monotonic()
        answer = post_url(base, web.url("/slow"))
        assert answer.status_code == 400 and answer.json()["error"] == FETCH_ERROR
        assert time.monotonic() - clock < 4.0


def test_slow_fetches_hold_fetch_slots_not_queue_slots(serve: Callable[[ServerConfig], Any]) -> None:
    """Six stalled URLs against a queue of 4: uploads are still served, extra fetches get 429 at once."""
    slot: list[Site] = []
    config = ServerConfig(allow_image_url=True, url_allow_networks=LOOPBACK, queue_size=4, request_timeout_s=20,
                          url_timeout_s=4)
    assert config.url_fetch_limit == 2
    with site({"/slow": drip_body(slot, 0.5)}) as web, serve(config) as base, ThreadPoolExecutor(6) as pool:
        slot.append(web)

        def timed(_: int) -> tuple[float, Any]:
            clock = time.monotonic()
            answer = post_url(base, web.url("/slow"))
            return time.monotonic() - clock, answer

        slow = [pool.submit(timed, i) for i in range(6)]
        deadline = time.monotonic() + 10
        while len(web.seen) < 2:  # both fetch slots busy
            assert time.monotonic() < deadline, "the slow fetches did not start"
            time.sleep(0.05)
        upload = post_upload(base, png_image())
        assert upload.status_code == 200, upload.text
        results = [future.result(timeout=60) for future in slow]
    busy = [(s, a) for s, a in results if a.status_code == 429]
    assert len(busy) == 4 and all(s < 2.0 for s, _ in busy), [(s, a.status_code) for s, a in results]
    assert all("image_url fetches" in a.json()["error"] and a.headers["Retry-After"] for _, a in busy)
    cut = [(s, a) for s, a in results if a.status_code == 400]
    assert len(cut) == 2 and all(s < 7.0 for s, _ in cut)  # --url-timeout 4 s bounds each fetch
    assert len(web.seen) == 2
