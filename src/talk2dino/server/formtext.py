"""Form text fields must be UTF-8: a 400 instead of Starlette's silent Latin-1 fallback (issue 14).

Starlette decodes a multipart text field that is not valid UTF-8 as Latin-1 without a word, so the label bytes
``cat\\xff\\xfe`` became the label ``catÿþ`` and were segmented. The decoded string cannot tell that fallback
apart from real text (``café`` in UTF-8 and ``caf\\xe9`` in Latin-1 both read back as Latin-1-encodable text),
so the check has to see the bytes: :class:`Utf8FormMiddleware` feeds the body, chunk by chunk as the app reads
it, to a second (callback-only, non-buffering) multipart parser and decodes each text part with an incremental
UTF-8 decoder. File parts are skipped. The first bad field is reported when the last chunk is read, so the
whole body has arrived and the connection stays usable.

A URL-encoded body must be ASCII: Starlette reads raw bytes in it as Latin-1 too (``labels=caf\\xc3\\xa9``
became ``cafÃ©``). Percent-encoded bytes that are not UTF-8 become U+FFFD, which
:meth:`talk2dino.Segmenter.check_labels` refuses.

A body that declares another charset (``multipart/form-data; charset=latin-1``) is left alone: Starlette
decodes it with that charset, as asked.
"""

from __future__ import annotations

import codecs
import logging
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talk2dino.errors import one_line

try:  # python-multipart >= 0.0.13 is python_multipart; older releases (the declared floor) are multipart
    from python_multipart.multipart import MultipartParser, parse_options_header
except ModuleNotFoundError:  # pragma: no cover - depends on the installed python-multipart
    from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

__all__ = ["FormTextError", "Utf8FormMiddleware"]

logger = logging.getLogger(__name__)


class FormTextError(StarletteHTTPException):
    """400: a form text field that is not UTF-8, or raw non-ASCII bytes in a URL-encoded body."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=400, detail=detail)


class _MultipartTextCheck:
    """Feeds a multipart body to a callback parser; remembers the first text part that is not UTF-8.

    Never raises: a body the parser cannot read is Starlette's to refuse (it parses the same bytes).
    """

    def __init__(self, boundary: bytes) -> None:
        self.problem: str | None = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._field = ""
        self._decoder: codecs.IncrementalDecoder | None = None
        self._offset = 0
        callbacks: Any = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self._parser: Any = None
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except Exception:  # noqa: BLE001 - e.g. a boundary over python-multipart's length limit: Starlette answers it
            logger.debug("multipart text check skipped: the parser refuses boundary %.60r", boundary)

    def feed(self, chunk: bytes) -> None:
        if self._parser is None or self.problem is not None or not chunk:
            return
        try:
            self._parser.write(chunk)
        except Exception:  # noqa: BLE001 - malformed multipart: Starlette's own parser answers it
            self._parser = None

    def _part_begin(self) -> None:
        self._disposition = b""
        self._decoder = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"filename" in options:
            return  # a file: its bytes are the image, not text
        self._field = options.get(b"name", b"").decode("utf-8", "replace")
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._offset = 0

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._decoder is None:
            return
        piece = data[start:end]
        try:
            self._decoder.decode(piece)
        except UnicodeDecodeError as err:
            self._fail(self._offset + err.start, piece[err.start:err.start + 1])
        self._offset += len(piece)

    def _part_end(self) -> None:
        if self._decoder is None:
            return
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            self._fail(None, b"")  # the part ends inside a multi-byte sequence
        self._decoder = None

    def _fail(self, offset: int | None, byte: bytes) -> None:
        if self.problem is None:
            where = (f"byte 0x{byte[0]:02x} at offset {offset}" if offset is not None and byte
                     else "it ends inside a character")
            self.problem = (f"form field {one_line(repr(self._field), 60)} is not UTF-8 text ({where}); send form "
                            "fields in UTF-8")
        self._decoder = None


class _UrlencodedCheck:
    """Remembers whether a URL-encoded body holds a raw byte outside ASCII."""

    def __init__(self) -> None:
        self.problem: str | None = None
        self._offset = 0

    def feed(self, chunk: bytes) -> None:
        if self.problem is None and not chunk.isascii():
            index = next(i for i, b in enumerate(chunk) if b >= 0x80)
            self.problem = (f"the application/x-www-form-urlencoded body holds the raw byte 0x{chunk[index]:02x} at "
                            f"offset {self._offset + index}; percent-encode UTF-8 text (curl --data-urlencode) or "
                            "send multipart/form-data")
        self._offset += len(chunk)


class Utf8FormMiddleware:
    """Answer 400 for a form whose text fields are not UTF-8 (see the module docstring).

    Only POST bodies of type ``multipart/form-data`` (with the default UTF-8 charset) and
    ``application/x-www-form-urlencoded`` are watched; everything else passes through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        check = self._checker(scope) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if check is None:
            await self.app(scope, receive, send)
            return

        async def checked_receive() -> Message:
            msg = await receive()
            if msg["type"] == "http.request":
                check.feed(msg.get("body", b""))
                if not msg.get("more_body", False) and check.problem is not None:
                    # Raised when the app reads the last chunk: the body is complete, the connection reusable.
                    raise FormTextError(check.problem)
            return msg

        await self.app(scope, checked_receive, send)

    @staticmethod
    def _checker(scope: Scope) -> _MultipartTextCheck | _UrlencodedCheck | None:
        content_type = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
        kind, params = parse_options_header(content_type)
        kind = kind.lower() if isinstance(kind, bytes) else str(kind).lower().encode()
        if kind == b"application/x-www-form-urlencoded":
            return _UrlencodedCheck()
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            return None
        check = _MultipartTextCheck(params[b"boundary"])
        charset = params.get(b"charset", b"utf-8")
        try:
            if codecs.lookup(charset.decode("latin-1")).name != "utf-8":
                return None  # another charset, declared by the client: Starlette decodes with it
        except LookupError:
            # Starlette would read every field of an unknown charset as Latin-1, UTF-8 ones included.
            check.problem = (f"unknown charset {one_line(repr(charset.decode('latin-1')), 40)} in the Content-Type; "
                             "send form fields in UTF-8 (no charset parameter)")
        return check
