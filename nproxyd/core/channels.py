"""Bounded, non-blocking message channels between actors.

A channel is a fast path only: what must not be lost is in PostgreSQL first. So a full or
closed channel never blocks the sender; the message is dropped and counted, and the receiver's
periodic sweep finds the work anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from nproxyd.core.messages import OutboxReady

T = TypeVar("T")


class Channel(Generic[T]):
    def __init__(self, sender: MemoryObjectSendStream[T]) -> None:
        self.sender = sender
        self.sent = 0
        self.dropped = 0
        # Called once per dropped message (the daemon counts drops in its metrics).
        self.on_drop: Callable[[], None] | None = None

    def offer(self, message: T) -> bool:
        """Send without waiting; returns False (and counts a drop) when it cannot."""
        try:
            self.sender.send_nowait(message)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            return False
        self.sent += 1
        return True

    @property
    def depth(self) -> int:
        """Messages waiting in the buffer."""
        return self.sender.statistics().current_buffer_used


Outbox = Channel[OutboxReady]
