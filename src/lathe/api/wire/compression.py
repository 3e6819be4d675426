"""Request bodies sent compressed: the SDK zstd-compresses forward_backward when told to."""

from __future__ import annotations

import io

import zstandard
from fastapi import HTTPException


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo `Content-Encoding: zstd` (advertised to the SDK), capped against zstd bombs."""
    if encoding.lower() != "zstd":
        return body
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
        while chunk := reader.read(1 << 20):
            out += chunk
            if len(out) > limit:
                raise HTTPException(
                    413, f"decompressed body exceeds {limit} bytes (limit max_body_bytes)"
                )
    except zstandard.ZstdError as e:
        raise HTTPException(400, f"body is not valid zstd: {e}") from None
    return bytes(out)
