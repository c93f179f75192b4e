"""Read a multipart upload while counting its bytes, so an oversized file is refused mid-stream.

FastAPI's `File()`/`Form()` parameters read the whole body before the route runs, which would put the upload
ahead of admission. The routes instead take a ticket first and then call `read_upload`, which parses the body
with python-multipart as it arrives and keeps the audio in memory (it is at most `max_bytes`; the decoder needs
the bytes anyway). A `Content-Length` over the limit is refused before a byte of the body is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import ClientGone, UploadInvalid, UploadTooLarge

__all__ = ["FORM_OVERHEAD_BYTES", "Upload", "check_content_length", "read_upload"]

# python-multipart logs a warning for every malformed body it parses: one log line per bad request, which any
# client can trigger at will. The request is answered with 400 and counted (liteasr_requests_rejected_total).
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)

FORM_OVERHEAD_BYTES = 64 * 1024  # room for the other form fields and the part headers
MAX_FIELD_BYTES = 16 * 1024
MAX_PART_HEADER_BYTES = 16 * 1024  # all the header lines of one part together
MAX_PARTS = 64
# python-multipart's own limits on part headers (per line, per part): its messages, said for a client.
_PARSER_LIMIT_MESSAGES = {
    "Maximum header size exceeded": "a form part has a header line that is too long",
    "Maximum header count exceeded": "a form part has too many header lines",
}


@dataclass
class Upload:
    """The form fields (every value of a repeated field, e.g. `timestamp_granularities[]`) and the audio part."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    audio: bytes = b""
    filename: str | None = None
    has_file: bool = False

    def first(self) -> dict[str, str]:
        """One value per field (the first), as the form models read them."""
        return {name: values[0] for name, values in self.fields.items() if values}


def check_content_length(request: Request, max_bytes: int) -> None:
    """413 at once when the declared body size already exceeds the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + FORM_OVERHEAD_BYTES:
        raise UploadTooLarge(_too_large_message(max_bytes, int(declared)))


def _too_large_message(max_bytes: int, size: int | None = None) -> str:
    limit = f"{max_bytes / 2**20:g} MiB"
    stated = f" ({size / 2**20:.1f} MiB)" if size is not None else ""
    return f"the upload{stated} is larger than the limit of {limit} (LITEASR_MAX_UPLOAD_MB)"


async def read_upload(request: Request, *, max_bytes: int, file_field: str = "file") -> Upload:
    """Parse a multipart/form-data body; the part named `file_field` is the audio."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise UploadInvalid(
            "expected a multipart/form-data body with the audio in a `file` part",
            status=415,
            code="unsupported_media_type",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadInvalid("the multipart/form-data body has no boundary")
    check_content_length(request, max_bytes)

    collector = _PartCollector(file_field, max_bytes)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes + FORM_OVERHEAD_BYTES:
                raise UploadTooLarge(_too_large_message(max_bytes))
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect:
        raise ClientGone("the client closed the connection during the upload") from None
    except MultipartParseError as error:
        message = _PARSER_LIMIT_MESSAGES.get(str(error), "the multipart/form-data body is malformed")
        raise UploadInvalid(message) from None
    if not collector.complete:
        # Without this, a body cut short would hand on a half-received (often empty) file part.
        raise UploadInvalid("the multipart/form-data body ends before its closing boundary")
    upload = collector.upload
    if not upload.has_file:
        raise UploadInvalid(f"the form has no `{file_field}` part with the audio", code="missing_file")
    return upload


class _PartCollector:
    """python-multipart callbacks that gather small fields and the one audio part, enforcing the limits."""

    def __init__(self, file_field: str, max_bytes: int) -> None:
        self.file_field = file_field
        self.max_bytes = max_bytes
        self.upload = Upload()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._ignored = False
        self._data = bytearray()
        self._file = bytearray()
        self._parts = 0
        self._header_bytes = 0
        self.complete = False  # the closing boundary was seen

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise UploadInvalid(f"the form has more than {MAX_PARTS} parts")
        self._disposition, self._name, self._is_file, self._ignored = b"", "", False, False
        self._data = bytearray()
        self._header_bytes = 0

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise UploadInvalid(
                f"the headers of a form part are longer than {MAX_PART_HEADER_BYTES // 1024} KiB"
            )

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise UploadInvalid("a form part has no name in its Content-Disposition header")
        self._name = options[b"name"].decode("utf-8", "replace")
        self._is_file = self._name == self.file_field
        self._ignored = not self._is_file and b"filename" in options  # another file: skipped, still counted
        if self._is_file:
            if self.upload.has_file:
                raise UploadInvalid(f"the form has more than one `{self.file_field}` part")
            self.upload.has_file = True
            filename = options.get(b"filename")
            self.upload.filename = filename.decode("utf-8", "replace") if filename else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self._file += data[start:end]
            if len(self._file) > self.max_bytes:
                raise UploadTooLarge(_too_large_message(self.max_bytes))
        elif not self._ignored:
            self._data += data[start:end]
            if len(self._data) > MAX_FIELD_BYTES:
                raise UploadInvalid(f"form field `{self._name}` is longer than {MAX_FIELD_BYTES // 1024} KiB")

    def on_end(self) -> None:
        self.complete = True

    def on_part_end(self) -> None:
        if self._is_file:
            self.upload.audio = bytes(self._file)
            self._file = bytearray()
        elif not self._ignored:
            self.upload.fields.setdefault(self._name, []).append(self._data.decode("utf-8", "replace"))
