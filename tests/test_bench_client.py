"""The serving benchmarks' lean HTTP/1.1 load client against a real uvicorn server: plain and
chunked (SSE) bodies, keep-alive, time to the first event, errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bench.http_client import TAIL_BYTES, Connection, Reply
from ft_ray.cluster import free_port

EVENTS = 300  # more than TAIL_BYTES of events: the client keeps only the tail


async def plain(request: Request):
    body = await request.json()
    request.app.state.clients.append(request.client.port)
    return JSONResponse({"usage": {"completion_tokens": body["n"]}, "echo": body})


async def sse(request: Request):
    body = await request.json()
    request.app.state.clients.append(request.client.port)

    async def events():
        await asyncio.sleep(0.2)  # the first event comes late: time to first token measures it
        for i in range(body["n"]):
            yield f'data: {{"id": "x", "choices": [{{"text": "t{i}"}}]}}\n\n'
        yield f'data: {{"id": "x", "choices": [], "usage": {{"completion_tokens": {body["n"]}}}}}\n\n'
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def split(request: Request):
    """The first event's marker split over two chunks, after a delay."""
    async def events():
        yield 'data: {"id": "x", "choices": [{"te'
        await asyncio.sleep(0.2)
        yield 'xt": "a"}]}\n\n'
        yield 'data: {"id": "x", "choices": [], "usage": {"completion_tokens": 1}}\n\ndata: [DONE]\n\n'

    return StreamingResponse(events(), media_type="text/event-stream")


async def slow(request: Request):
    await asyncio.sleep(1.5)
    return JSONResponse({"usage": {"completion_tokens": 0}})


async def refuse(request: Request):
    return JSONResponse({"error": {"message": "no"}}, status_code=400)


@pytest.fixture(scope="module")
def server():
    app = Starlette(routes=[Route("/plain", plain, methods=["POST"]), Route("/sse", sse, methods=["POST"]),
                            Route("/refuse", refuse, methods=["POST"]), Route("/split", split, methods=["POST"]),
                            Route("/slow", slow, methods=["POST"])])
    app.state.clients = []
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield app, port
    srv.should_exit = True
    thread.join(10)


def test_plain_and_streamed_replies_on_one_kept_alive_connection(server):
    app, port = server
    app.state.clients.clear()

    async def main():
        conn = Connection("127.0.0.1", port)
        try:
            t0 = time.perf_counter()
            stream = await conn.post("/sse", {"n": EVENTS}, first_marker=b'"text"')
            wall = time.perf_counter() - t0
            reply = await conn.post("/plain", {"n": 7, "text": "é"})
        finally:
            await conn.close()
        return stream, wall, reply

    stream, wall, reply = asyncio.run(main())
    assert reply.status == 200 and reply.json() == {"usage": {"completion_tokens": 7}, "echo": {"n": 7, "text": "é"}}
    assert reply.usage() == {"completion_tokens": 7} and reply.first_s is None
    assert stream.status == 200 and stream.usage() == {"completion_tokens": EVENTS}
    assert len(stream.body) == TAIL_BYTES and stream.body.endswith(b"data: [DONE]\n\n")
    assert stream.first_s is not None and 0.2 <= stream.first_s <= wall
    clients = app.state.clients
    assert len(clients) == 2 and clients[0] == clients[1]  # the same client port: one connection


def test_an_error_status_is_raised_with_its_body(server):
    _, port = server

    async def main():
        conn = Connection("127.0.0.1", port)
        try:
            return await conn.post("/refuse", {})
        finally:
            await conn.close()

    reply = asyncio.run(main())
    assert reply.status == 400
    with pytest.raises(RuntimeError, match=r"HTTP 400: .*no"):
        reply.usage()


def test_a_stream_tail_is_read_as_a_stream_whatever_byte_it_starts_with():
    """The tail is cut at any byte: one that starts inside an event, at a '{', is still a stream."""
    tail = (b'{"text": "t9"}]}\n\ndata: {"id": "x", "choices": [], "usage": {"completion_tokens": 9}}\n\n'
            b"data: [DONE]\n\n")
    assert Reply(200, tail, True, None).usage() == {"completion_tokens": 9}
    with pytest.raises(RuntimeError, match=r"did not end with \[DONE\]"):
        Reply(200, tail[:-16], True, None).usage()


def test_a_marker_split_over_two_chunks_is_timed_when_it_completes(server):
    _, port = server

    async def main():
        conn = Connection("127.0.0.1", port)
        try:
            return await conn.post("/split", {}, first_marker=b'"text"')
        finally:
            await conn.close()

    reply = asyncio.run(main())
    assert reply.usage() == {"completion_tokens": 1} and reply.first_s is not None and reply.first_s >= 0.2


def test_a_reply_that_does_not_come_times_out_and_closes_the_connection(server):
    _, port = server

    async def main():
        conn = Connection("127.0.0.1", port, timeout=0.3)
        with pytest.raises(TimeoutError):
            await conn.post("/slow", {})
        assert conn._writer is None
        return await conn.post("/refuse", {})  # a new connection serves the next request

    assert asyncio.run(main()).status == 400
