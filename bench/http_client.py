"""A lean asyncio HTTP/1.1 client for the serving benchmarks' load.

The load clients run on the same 2 cores as the server, so their CPU is taken from it: httpx spent
~0.2 s of CPU reading 16 streams of 256 events, ~4x this client's, and the streams row measured
the clients as much as the server. This client keeps one connection per client (keep-alive), reads
Content-Length and chunked bodies, and keeps only what the benchmark needs (the status, the JSON of
a plain response, the tail of a stream for its usage chunk, the time of its first text event).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

TAIL_BYTES = 4096  # what a stream keeps: its last events, with the usage chunk and [DONE]


@dataclass
class Reply:
    status: int
    body: bytes  # whole for a Content-Length body; the last TAIL_BYTES of a chunked one
    event_stream: bool  # Content-Type text/event-stream
    first_s: float | None  # seconds from sending to the first chunk holding `first_marker`

    def json(self) -> dict:
        if self.status != 200:
            raise RuntimeError(f"HTTP {self.status}: {self.body[:500]!r}")
        return json.loads(self.body)

    def usage(self) -> dict:
        """The usage of a completion: a plain response's, or a stream's usage chunk."""
        if not self.event_stream:
            return self.json()["usage"]
        if self.status != 200 or b"data: [DONE]" not in self.body:
            raise RuntimeError(f"HTTP {self.status}, stream did not end with [DONE]: {self.body[-500:]!r}")
        last = self.body[self.body.rindex(b"data: {"):].split(b"\n\n")[0][6:]
        return json.loads(last)["usage"]


class Connection:
    """One keep-alive connection to host:port, opened again after a reply that closes it."""

    def __init__(self, host: str, port: int, timeout: float = 600.0):
        self.host, self.port, self.timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict, first_marker: bytes | None = None) -> Reply:
        """POST `body` as JSON; TimeoutError after `timeout` seconds (the connection is closed)."""
        try:
            return await asyncio.wait_for(self._post(path, body, first_marker), self.timeout)
        except BaseException:
            await self.close()  # a reply cut short leaves the connection unusable
            raise

    async def _post(self, path: str, body: dict, first_marker: bytes | None) -> Reply:
        payload = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        t0 = time.perf_counter()
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(head + payload)
        status_line, *header_lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        first = None
        if "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                chunk = (await reader.readexactly(size + 2))[:-2]
                data = (data + chunk)[-TAIL_BYTES:]
                # the marker may straddle two chunks: look in the new bytes and the few before them
                if first is None and first_marker and first_marker in data[-len(chunk) - len(first_marker):]:
                    first = time.perf_counter() - t0
            await reader.readuntil(b"\r\n")  # no trailers: the empty line that ends the body
        else:  # delimited by the end of the connection
            data = await reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        event_stream = headers.get("content-type", "").startswith("text/event-stream")
        return Reply(status, data, event_stream, first)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None
