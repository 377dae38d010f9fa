"""The images of a /predict request, read from the body as it streams in, with every limit checked on the way.

Why not FastAPI's `File(...)`: Starlette parses the whole multipart body (spooling files to disk, up to 1,000 of them)
before the endpoint sees a byte, and its size check can only read Content-Length, which a chunked body does not have.
Here python-multipart's push parser is fed chunk by chunk and the request is refused (413/400) the moment it goes
over: the body's total, one image's size, the number of images, the number and size of other fields. So a request
never holds more than its limits in memory, however it is sent.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import HTTPException, Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

FIELD = "files"          # the multipart field that carries images; any other field is read and ignored
MAX_FIELD_BYTES = 64 * 1024  # a non-image field (FastAPI clients sometimes add one) may not be larger than this


@dataclass(frozen=True)
class Limits:
    file_mb: float = 20         # one image file
    request_mb: float = 64      # the whole body, images and everything else
    files: int = 32             # images in one request
    fields: int = 16            # other parts (form fields) in one request
    read_timeout_s: float = 60  # the whole body must arrive within this (a client trickling bytes holds a slot)

    @property
    def file_bytes(self) -> int:
        return int(self.file_mb * 2**20)

    @property
    def request_bytes(self) -> int:
        return int(self.request_mb * 2**20)


class _Parts:
    """The parser's callbacks: collects the image parts, and the first limit broken (as an HTTPException)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.images: list[tuple[str, bytes]] = []
        self.fields = 0
        self.refused: HTTPException | None = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._buffer: bytearray | None = None
        self._is_image = False
        self._name = ""

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end}

    def refuse(self, status: int, detail: str) -> None:
        if self.refused is None:
            self.refused = HTTPException(status, detail)

    def part_begin(self) -> None:
        self._headers, self._buffer = {}, None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._is_image = options.get(b"name") == FIELD.encode()
        if self._is_image:
            if len(self.images) >= self.limits.files:
                self.refuse(413, f"more than {self.limits.files} files in one request; the limit is "
                                 f"{self.limits.files}")
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self._name = filename or f"file {len(self.images) + 1}"
        else:
            self.fields += 1
            if self.fields > self.limits.fields:
                self.refuse(413, f"more than {self.limits.fields} form fields in one request")
        self._buffer = bytearray()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.refused is not None or self._buffer is None:
            return
        self._buffer += data[start:end]
        if self._is_image and len(self._buffer) > self.limits.file_bytes:
            self.refuse(413, f"{self._name} is over the per-file limit of {self.limits.file_mb:g} MB")
        elif not self._is_image and len(self._buffer) > MAX_FIELD_BYTES:
            self.refuse(413, f"a form field is over {MAX_FIELD_BYTES // 1024} KB")

    def part_end(self) -> None:
        if self.refused is None and self._is_image and self._buffer is not None:
            self.images.append((self._name, bytes(self._buffer)))
        self._buffer = None


async def read_images(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each image in the request's multipart field "files", in order. HTTPException: 415 for a
    body that is not multipart/form-data, 400 for a malformed one or one without images, 413 for a limit broken
    (before the rest of the body is read), 408 when the body takes longer than limits.read_timeout_s."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data":
        raise HTTPException(415, f"send images as multipart/form-data in the field '{FIELD}' "
                                 f"(this request's Content-Type is {kind.decode('latin-1') or 'missing'})")
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart/form-data without a boundary")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.request_bytes:  # refused before a byte of it is read
        raise HTTPException(413, f"request of {int(length):,} bytes is over the limit of {limits.request_mb:g} MB")
    parts = _Parts(limits)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
    except (FormParserError, ValueError) as exc:
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    try:
        async with asyncio.timeout(limits.read_timeout_s):
            total = 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > limits.request_bytes:
                    raise HTTPException(413, f"request over the limit of {limits.request_mb:g} MB")
                parser.write(chunk)
                if parts.refused is not None:
                    raise parts.refused
            parser.finalize()
    except TimeoutError:
        raise HTTPException(408, f"the request's body did not arrive within {limits.read_timeout_s:g} s") from None
    except FormParserError as exc:
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    if parts.refused is not None:
        raise parts.refused
    if not parts.images:
        raise HTTPException(400, f"no image in the request: send one or more files as multipart field '{FIELD}'")
    return parts.images
