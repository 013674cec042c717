"""Read a multipart/form-data request body into memory, never onto disk, within a byte limit.

Starlette's form parser spools file parts above 1 MiB to a temporary file; an X-ray upload must
not touch the disk (it may be a DICOM carrying a patient's name). This parser streams the body
through python-multipart's low-level parser into ``bytes`` objects and stops at the first byte
over the limit, so a client announcing or sending too much is refused before it costs memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small fields around the file


class UploadError(ValueError):
    """A request the client must change; carries the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytearray = field(default_factory=bytearray)


@dataclass
class Form:
    parts: list[Part]

    def file(self, name: str) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)

    def files(self, name: str) -> list[Part]:
        """Every part named ``name``, in the order sent."""
        return [p for p in self.parts if p.name == name]

    def text(self, name: str) -> str | None:
        part = self.file(name)
        return None if part is None else bytes(part.data).decode("utf-8", errors="replace").strip()


async def read_multipart(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    *,
    max_bytes: int,
) -> Form:
    """Parse the body of a multipart request; :class:`UploadError` (413/400/415) for what the client must fix.

    A client that hangs up before the body is complete raises what ``body`` raises then (Starlette's
    ``ClientDisconnect``), unchanged: the server ends that request quietly."""
    mime, params = parse_options_header(content_type or "")
    if mime != b"multipart/form-data":
        raise UploadError(415, "send the image as multipart/form-data with the file in a field named 'file'")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "the multipart Content-Type header has no boundary")
    limit = max_bytes + MULTIPART_OVERHEAD
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError as exc:
            raise UploadError(400, f"Content-Length is not a number: {content_length!r}") from exc
        if declared > limit:
            raise UploadError(413, _too_large(max_bytes))

    parts: list[Part] = []
    headers: dict[bytes, bytes] = {}
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise UploadError(400, "a multipart part has no name in its Content-Disposition header")
        filename = options.get(b"filename")
        ctype = headers.get(b"content-type")
        parts.append(Part(
            name=name.decode("utf-8", errors="replace"),
            filename=None if filename is None else filename.decode("utf-8", errors="replace"),
            content_type=None if ctype is None else ctype.decode("latin-1"),
        ))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1].data
        part.extend(data[start:end])
        if len(part) > max_bytes:
            raise UploadError(413, _too_large(max_bytes))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
    })
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > limit:
                raise UploadError(413, _too_large(max_bytes))
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(400, f"malformed multipart body ({exc})") from exc
    return Form(parts)


def _too_large(max_bytes: int) -> str:
    return f"the upload is larger than this server accepts ({max_bytes / 2**20:.1f} MiB); send a smaller image"
