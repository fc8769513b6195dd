"""Blobs: how file content is cut, named and stored.

* Cutting: files below :data:`CHUNK_MIN` are one blob; larger ones are cut by FastCDC
  (content-defined, average about :data:`CHUNK_AVG` + :data:`CHUNK_MIN`), so an edit in one
  region, or bytes inserted into the middle, changes only the blobs around it.
* Naming: a blob's name is the BLAKE3 hash (256 bits, hex) of its plain content.
* Storing: zstd level 3, kept only when it saves at least 1/32; so a stored length below the
  plain size means "compressed" and equal means "raw".  Random data costs a few ms per GB.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import BinaryIO

import blake3
import pyfastcdc
import zstandard

CHUNK_MIN = 128 << 10
CHUNK_AVG = 512 << 10
CHUNK_MAX = 2 << 20
COMPRESS_LEVEL = 3
MIN_COMPRESS = 64
PROBE_FROM = 64 << 10
SAMPLE = 4 << 10
WINDOW = 16 << 20

Buffer = bytes | bytearray | memoryview

_local = threading.local()
_chunker = pyfastcdc.FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)


def digest(data: Buffer) -> str:
    return blake3.blake3(data).hexdigest()


def _compressor() -> zstandard.ZstdCompressor:
    comp: zstandard.ZstdCompressor | None = getattr(_local, "comp", None)
    if comp is None:
        comp = _local.comp = zstandard.ZstdCompressor(level=COMPRESS_LEVEL)
    return comp


def _sampler() -> zstandard.ZstdCompressor:
    comp: zstandard.ZstdCompressor | None = getattr(_local, "sampler", None)
    if comp is None:
        comp = _local.sampler = zstandard.ZstdCompressor(level=1)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


def _sample(data: Buffer) -> bool:
    """Whether three 4 KiB probes (start, middle, end) compress by at least 1/32."""
    view = memoryview(data)
    size = len(view)
    probe = b"".join(view[i:i + SAMPLE] for i in (0, size // 2, size - SAMPLE))
    return len(_sampler().compress(probe)) < len(probe) - len(probe) // 32


def pack_form(data: Buffer) -> Buffer:
    """What to store for ``data``: its zstd frame if that saves 1/32 or more, else itself.

    Large blobs are probed first, so incompressible data costs microseconds, not a full pass.
    """
    size = len(data)
    if size < MIN_COMPRESS or (size >= PROBE_FROM and not _sample(data)):
        return data
    packed = _compressor().compress(data)
    return packed if len(packed) < size - size // 32 else data


def unpack(stored: Buffer, size: int, expected: str) -> bytes:
    """Plain content of a stored blob; ``ValueError`` unless it hashes to ``expected``."""
    data = decompress(stored, size) if len(stored) < size else bytes(stored)
    if len(data) != size or digest(data) != expected:
        raise ValueError("content does not match its hash")
    return data


def compress(data: Buffer) -> bytes:
    """zstd frame of ``data``, for manifests and the local cache."""
    return _compressor().compress(data)


def decompress(data: Buffer, limit: int) -> bytes:
    """The content of one zstd frame, never more than ``limit`` bytes; ``ValueError`` if the
    frame declares or holds more, or is not a frame.

    (python-zstandard allocates what a frame's header declares, ignoring
    ``max_output_size``: a 100-byte forged frame could ask for gigabytes.  So the declared
    size is checked first.)
    """
    try:
        declared = zstandard.frame_content_size(data)
        if declared > limit:
            raise ValueError(f"the frame declares {declared} bytes, more than {limit}")
        out = _decompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise ValueError(f"cannot decompress: {exc}") from None
    if len(out) > limit:
        raise ValueError(f"it decompresses to more than {limit} bytes")
    return out


def cut(stream: BinaryIO, size: int) -> Iterator[Buffer]:
    """The content of an open file as blobs (each valid only until the next is yielded).

    Reads :data:`WINDOW` bytes at a time and cuts them in one call; the last, possibly
    unfinished chunk of a window is carried over to the next.
    """
    if size < CHUNK_MIN:
        data = stream.read()  # to the end, even if the file grew meanwhile
        if data:
            yield data
        return
    carry = b""
    while True:
        block = stream.read(WINDOW)
        buf = carry + block if carry else block
        if not buf:
            return
        view = memoryview(buf)
        last: tuple[int, int] | None = None
        for chunk in _chunker.cut_buf(view):
            if last is not None:
                yield view[last[0]:last[0] + last[1]]
            last = (chunk.offset, chunk.length)
        assert last is not None  # noqa: S101 -- a non-empty buffer has a chunk
        tail = view[last[0]:last[0] + last[1]]
        if not block:
            yield tail
            return
        carry = bytes(tail)
