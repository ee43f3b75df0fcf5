"""Bounded reading of an HTTP answer's body: a provider's answer is a few kilobytes, and one
that is not must not take the daemon's memory (aiohttp also inflates compressed bodies)."""

from __future__ import annotations

import aiohttp

MAX_ANSWER_BYTES = 1024 * 1024
_CHUNK_BYTES = 64 * 1024


async def read_bounded(
    response: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES
) -> bytes | None:
    """The body of ``response``; None, without reading on, once it is longer than ``limit``
    bytes (aiohttp then closes the connection instead of reusing it)."""
    if (response.content_length or 0) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
