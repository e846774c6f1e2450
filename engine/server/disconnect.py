"""Starlette notices a disconnect only while it streams a body; a non-streamed completion would
otherwise keep generating (and holding KV blocks) for nobody."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import Request
from fastapi.responses import Response


async def unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Cancelling the handler closes its streams, which aborts its sequences."""

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return task.result()
