"""Fetching an ``image_url`` for the server without handing clients a proxy into its network.

``talk2dino serve --allow-image-url`` lets a client name a URL that the *server* fetches. Done naively that is
server-side request forgery: a client could make the server read its own loopback services, the cloud metadata
endpoint (169.254.169.254) or anything on the private network, and tell open ports from closed ones by the
error text. `fetch_image_url` closes that:

- **Only public addresses.** The host is resolved once, and every address it resolves to must be globally
  routable (`address_refusal`): loopback, private, link-local, shared (100.64/10), multicast, unspecified
  and reserved ranges are refused, as are IPv6 forms that embed such an IPv4 (mapped, compatible, 6to4,
  Teredo, NAT64). Numeric hosts in odd spellings (``2130706433``, ``0x7f000001``, ``0177.0.0.1``,
  ``127.1``) are covered because the check looks at what the resolver made of them, not at the text.
  ``allowed_networks`` (``--url-allow-network``) opens chosen ranges for images on a private network.
- **No DNS rebinding.** The connection goes to the address that was checked (the socket is connected to the
  IP itself; ``Host`` and the TLS server name stay the URL's host, certificates are verified), so a second
  lookup cannot answer differently.
- **Redirects are checked like the first URL**: at most `MAX_REDIRECTS`, each re-parsed, re-resolved and
  re-checked, http(s) only. They are followed (rather than refused) because image hosts and CDNs commonly
  redirect (http to https, a short link to a storage bucket).
- **One deadline for everything** (lookup, connect, TLS handshake, headers, every body chunk, every hop): each
  blocking call gets at most the time left, the read loop checks the clock between chunks, and a watchdog shuts
  the socket down at the deadline, so a server dripping one byte a second cannot hold the fetch past it.
- **A byte cap** from ``Content-Length`` and while reading; ``Accept-Encoding: identity`` and no decompression.
- **No oracle.** Every failure (refused address, DNS failure, connection refused, timeout, non-200 status, too
  many redirects, bad URL) raises the same `FetchError` text; the specific reason is logged at INFO on the
  server. Only an over-size body is told apart (`FetchTooLargeError`, HTTP 413): it describes content the
  client could fetch itself, and only a permitted address can have produced it.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import string
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from talk2dino.errors import InvalidInputError

__all__ = [
    "FETCH_ERROR",
    "MAX_REDIRECTS",
    "FetchError",
    "FetchTooLargeError",
    "address_refusal",
    "fetch_image_url",
    "parse_networks",
]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FETCH_ERROR = ("cannot fetch image_url: the server fetches only public http(s) URLs that answer 200 with the "
               "image in time (--url-timeout); the reason is in the server log")
"""The one client-facing text of every fetch failure, whatever its cause (see the module docstring)."""

MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters left as they are when a path is percent-encoded: all printable ASCII except the space, so only
# non-ASCII text (which http.client cannot put in a request line) and spaces of a redirect's Location change.
_PATH_SAFE = string.punctuation
# getaddrinfo has no timeout: lookups run in daemon threads that the fetch waits for until its deadline. A
# lookup that hangs (a dead resolver) keeps its thread until the system resolver gives up, so their number is
# bounded; a fetch that finds all of them busy waits for one until its own deadline.
_LOOKUPS = threading.BoundedSemaphore(8)
# Embedded-IPv4 prefixes (RFC 6052 NAT64): the IPv6 address reaches the IPv4 one through a translator.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# The IANA special-purpose ranges that are not globally reachable, spelled out because the `ipaddress`
# properties changed between Python releases (3.11.10/3.12.4 corrected is_global for 192.0.0.0/24, the
# IPv4-mapped forms and parts of 2001::/23): the check is the same whatever Python runs the server.
_NOT_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4",
    "::/8", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16", "fc00::/7",
    "fe80::/10", "fec0::/10", "ff00::/8",
))


class FetchError(InvalidInputError):
    """An ``image_url`` could not be fetched; the text never says why (that is logged), see the module docstring."""

    def __init__(self) -> None:
        super().__init__(FETCH_ERROR)


class FetchTooLargeError(InvalidInputError):
    """The ``image_url`` content is over the byte cap (the server answers 413)."""


class _Refused(Exception):
    """A fetch failure with its specific reason, for the server log only."""


# ---------------------------------------------------------------------------------------------- addresses
def parse_networks(networks: Iterable[str | Network]) -> tuple[Network, ...]:
    """CIDR strings (``10.0.0.0/8``, ``fd00::/8``, a single address) as networks; host bits are allowed.

    Raises:
        InvalidInputError: an entry that is not an IP network, named in one line.
    """
    parsed: list[Network] = []
    for item in networks:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            parsed.append(item)
            continue
        try:
            parsed.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError as err:
            raise InvalidInputError(f"--url-allow-network: {str(item)[:60]!r} is not an IP network in CIDR "
                                    f"notation such as 10.0.0.0/8 or fd00::/8 ({err})") from None
    return tuple(parsed)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses that traffic to `ip` may reach: 6to4, Teredo (server and client), IPv4-compatible."""
    found: list[ipaddress.IPv4Address] = []
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _IPV4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def _is_public(ip: IPAddress) -> bool:
    """Whether `ip` is globally routable unicast.

    `is_global` alone is not enough: it is True for multicast (224/4) and, before Python 3.11.10/3.12.4, it
    misjudged IPv4-mapped IPv6, so each special-purpose property is checked as well.
    """
    special = (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
               or ip.is_unspecified)
    if isinstance(ip, ipaddress.IPv6Address):
        special = special or ip.is_site_local
    listed = any(ip.version == net.version and ip in net for net in _NOT_PUBLIC)
    return ip.is_global and not special and not listed


def _unmap(ip: IPAddress) -> IPAddress:
    """The IPv4 address of an IPv4-mapped IPv6 one (``::ffff:a.b.c.d``: a dual-stack socket reaches the IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _judged_as(ip: IPAddress) -> IPAddress:
    """The address whose reachability decides: the IPv4 one behind a mapped or NAT64 (64:ff9b::/96) address.

    On an IPv6-only host with DNS64 every public IPv4 site resolves to a NAT64 address, and the translator
    forwards to the embedded IPv4 address: that one must be public (or allowed), whatever 64:ff9b:: is.
    """
    ip = _unmap(ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_refusal(ip: IPAddress, allowed_networks: Iterable[Network] = ()) -> str | None:
    """Why the server must not connect to `ip`, or None when it may.

    An address is allowed when it (or the IPv4 address it maps or NAT64-translates to) lies in one of
    `allowed_networks`, or when it is globally routable and so is every IPv4 address embedded in it (6to4,
    Teredo, IPv4-compatible).
    """
    target = _judged_as(ip)
    if any(target.version == net.version and target in net for net in allowed_networks):
        return None
    if not _is_public(target):
        return f"{ip} is not a public address" + (f" (it reaches {target})" if target != ip else "")
    if isinstance(target, ipaddress.IPv6Address):
        for inner in _embedded_ipv4(target):
            if not _is_public(inner):
                return f"{ip} embeds {inner}, which is not a public address"
    return None


# ---------------------------------------------------------------------------------------------- one hop
@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, without brackets
    port: int
    path: str  # path and query, percent-encoded, never empty

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _parse(url: str) -> _Target:
    """Split and check one URL (the first one or a redirect's); raise `_Refused` for anything unusable."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError for a non-numeric or out-of-range port
    except ValueError as err:
        raise _Refused(f"malformed URL ({err})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise _Refused(f"scheme {scheme!r} is not http or https")
    if "@" in parts.netloc:
        # user:password@host hides the real host from a casual reader and would send credentials along.
        raise _Refused("user information in the URL")
    host = parts.hostname
    if not host:
        raise _Refused("no host")
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError as err:
        raise _Refused(f"host name does not encode ({err})") from None
    path = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe=_PATH_SAFE)
    return _Target(scheme, ascii_host, port or _DEFAULT_PORTS[scheme], path)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Refused("deadline reached")
    return left


def _resolve(target: _Target, deadline: float, allowed: tuple[Network, ...]) -> list[tuple[int, Any]]:
    """The (family, sockaddr) pairs to try, after checking every address the host resolves to.

    The host is looked up exactly once per hop; these addresses are the ones connected to (no second lookup
    that a rebinding DNS server could answer differently). A name that resolves to any refused address is
    refused as a whole: a public host has no reason to also point into a private network.
    """
    if not _LOOKUPS.acquire(timeout=_remaining(deadline)):
        raise _Refused("DNS lookup did not start before the deadline (lookups busy)")
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(target.host, target.port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting fetch, which decides
            outcome["error"] = err
        finally:
            _LOOKUPS.release()
            done.set()

    threading.Thread(target=lookup, name="talk2dino-resolve", daemon=True).start()
    if not done.wait(_remaining(deadline)):
        raise _Refused(f"DNS lookup of {target.host!r} timed out")
    if "error" in outcome:
        raise _Refused(f"DNS lookup of {target.host!r} failed ({outcome['error']})")
    pairs: list[tuple[int, Any]] = []
    for family, _, _, _, sockaddr in outcome["infos"]:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        reason = address_refusal(ip, allowed)
        if reason is not None:
            raise _Refused(f"{target.host!r} resolves to a refused address: {reason}")
        unmapped = _unmap(ip)
        pair = (socket.AF_INET, (str(unmapped), sockaddr[1])) if unmapped is not ip else (family, sockaddr)
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        raise _Refused(f"{target.host!r} resolves to no IP address")
    return pairs


class _Watchdog:
    """Shuts the current connection down at the deadline, whatever blocking call is in progress.

    Per-call socket timeouts alone do not bound a fetch: a server that sends one byte just inside each timeout
    (during the TLS handshake, the status line or the headers, which http.client reads in many small calls)
    could hold it for as long as it likes. Shutting the socket down makes the blocked call return at once.
    """

    def __init__(self, deadline: float) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        """Make `sock` the connection to cut (the TLS socket replaces the TCP one it wraps)."""
        with self._lock:
            self._sock = sock
            fired = self.fired
        if fired:
            _cut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sock = self._sock
        if sock is not None:
            _cut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _cut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown would drop its TLS state under the
    # thread reading from it; shutdown(2) on the descriptor just makes that read return.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _connect(pairs: list[tuple[int, Any]], deadline: float) -> socket.socket:
    """A TCP connection to the first of the checked addresses that accepts one before the deadline."""
    errors: list[str] = []
    for family, sockaddr in pairs:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(sockaddr)
        except _Refused:
            sock.close()
            raise
        except OSError as err:
            sock.close()
            errors.append(f"{sockaddr[0]}: {err}")
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise _Refused(f"cannot connect ({'; '.join(errors)})")


def _get(target: _Target, pairs: list[tuple[int, Any]], *, deadline: float, max_bytes: int,
         watchdog: _Watchdog, ssl_context: ssl.SSLContext | None) -> tuple[int, str | None, bytes]:
    """One GET: (status, Location header, body); the body is read only for a 200."""
    sock: socket.socket = _connect(pairs, deadline)
    connection = http.client.HTTPConnection(target.host, target.port, timeout=_remaining(deadline))
    try:
        watchdog.watch(sock)
        if target.scheme == "https":
            context = ssl_context if ssl_context is not None else ssl.create_default_context()
            sock.settimeout(_remaining(deadline))
            # server_hostname is the URL's host: SNI and certificate verification are about the name the
            # client asked for, while the socket stays connected to the address that was checked.
            sock = context.wrap_socket(sock, server_hostname=target.host)
            watchdog.watch(sock)
        # An already connected socket: http.client only connects when it has none, so it never looks the
        # host up again.
        connection.sock = sock
        sock.settimeout(_remaining(deadline))
        connection.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", target.host_header)
        connection.putheader("User-Agent", "talk2dino-server")
        connection.putheader("Accept", "image/*")
        connection.putheader("Accept-Encoding", "identity")  # bytes as stored: no decompression (bombs)
        connection.putheader("Connection", "close")
        connection.endheaders()
        response = connection.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > max_bytes:
            raise FetchTooLargeError(f"image_url content is {int(declared):,} bytes, above this server's limit "
                                     f"of {max_bytes:,} (--max-upload-bytes)")
        chunks: list[bytes] = []
        total = 0
        while True:
            sock.settimeout(_remaining(deadline))  # also the clock check between chunks
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise FetchTooLargeError(f"image_url content is larger than this server's limit of "
                                         f"{max_bytes:,} bytes (--max-upload-bytes)")
            chunks.append(chunk)
        if watchdog.fired or time.monotonic() >= deadline:
            # The watchdog's shutdown reads as an end of file: a body cut there is not a whole image.
            raise _Refused("deadline reached while reading the body")
        return 200, None, b"".join(chunks)
    finally:
        connection.close()
        sock.close()


# ---------------------------------------------------------------------------------------------- the fetch
def fetch_image_url(url: str, *, max_bytes: int, deadline: float, allowed_networks: Iterable[str | Network] = (),
                    ssl_context: ssl.SSLContext | None = None) -> bytes:
    """GET an http(s) ``image_url`` safely for a server (see the module docstring for what that means).

    Blocking: call it in a worker thread.

    Args:
        url: the client's URL.
        max_bytes: the most bytes the body may have.
        deadline: `time.monotonic()` value by which the whole fetch (lookups, connections, redirects, body)
            must finish.
        allowed_networks: CIDR ranges (or networks) fetched even though they are not public, e.g. a private
            image store; empty by default.
        ssl_context: TLS settings (default: `ssl.create_default_context()`, which verifies certificates and
            host names); tests pass one that trusts their own certificate authority.

    Returns:
        The body of the final 200 answer.

    Raises:
        FetchError: any failure; the one text says nothing about the cause, which is logged at INFO.
        FetchTooLargeError: the body is over `max_bytes`.
        InvalidInputError: `allowed_networks` holds something that is not a network.
    """
    allowed = parse_networks(allowed_networks)
    watchdog = _Watchdog(deadline)
    current = url
    try:
        for hop in range(MAX_REDIRECTS + 1):
            target = _parse(current)
            pairs = _resolve(target, deadline, allowed)
            status, location, body = _get(target, pairs, deadline=deadline, max_bytes=max_bytes,
                                          watchdog=watchdog, ssl_context=ssl_context)
            if status == 200:
                return body
            if status not in _REDIRECT_STATUSES or not location:
                raise _Refused(f"HTTP {status}")
            if hop == MAX_REDIRECTS:
                raise _Refused(f"more than {MAX_REDIRECTS} redirects")
            current = urllib.parse.urljoin(current, location)
        raise AssertionError("unreachable: the loop returns or raises")
    except FetchTooLargeError:
        raise
    except _Refused as err:
        reason = str(err)
    except (OSError, ValueError, http.client.HTTPException) as err:  # ssl.SSLError and TimeoutError are OSErrors
        # A socket timeout is the deadline too (each socket call gets only the time left): whether the socket's
        # timeout or the watchdog fires first is a race, and the log must name the cause either way.
        timed_out = watchdog.fired or isinstance(err, TimeoutError) or time.monotonic() >= deadline
        reason = f"deadline reached ({type(err).__name__}: {err})" if timed_out else f"{type(err).__name__}: {err}"
    finally:
        watchdog.cancel()
    logger.info("image_url %r not fetched (last URL %r): %s", url[:200], current[:200], reason[:300])
    raise FetchError()
