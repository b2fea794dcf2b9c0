"""The aiohttp application: ``/`` (the page), ``/api/chat`` (Kyutai's protocol), ``/health``,
``/metrics``; the engine's step task lives with the app and stops cleanly on shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources

from aiohttp import web

from moshax.serve.access import origin_ok, token_ok
from moshax.serve.engine import BatchedEngine
from moshax.serve.session import ChatSession

log = logging.getLogger("moshax.serve")

STATIC = resources.files("moshax.serve") / "static"
ENGINE = web.AppKey("engine", BatchedEngine)


async def _no_content():
    return web.Response(status=204)


def _report_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the step task failed: %r", task.exception(), exc_info=task.exception())


def build_app(engine: BatchedEngine, pieces, *, auth_token: str | None = None, allow_origins=frozenset(),
              max_message_bytes: int = 1 << 20, outbox_frames: int = 64, warmup: bool = True) -> web.Application:
    app = web.Application(client_max_size=max_message_bytes)
    app[ENGINE] = engine
    sockets: set[web.WebSocketResponse] = set()
    tasks: dict[str, asyncio.Task] = {}

    async def chat(request: web.Request) -> web.StreamResponse:
        if not token_ok(request, auth_token):
            raise web.HTTPUnauthorized(text="a valid token is required (?token=... or Authorization: Bearer ...)\n")
        if not origin_ok(request, allow_origins):
            raise web.HTTPForbidden(text=f"origin {request.headers.get('Origin')} is not allowed "
                                         f"(see --allow-origin)\n")
        ws = web.WebSocketResponse(max_msg_size=max_message_bytes, heartbeat=30.0)
        await ws.prepare(request)
        sockets.add(ws)
        try:
            await ChatSession(ws, engine, pieces, outbox_frames).run()
        finally:
            sockets.discard(ws)
        return ws

    async def health(_request):
        return web.json_response({"ok": not engine._stopping, "slots": engine.batch,
                                  "active_slots": engine.metrics.active})

    async def metrics(request):
        if not token_ok(request, auth_token):
            raise web.HTTPUnauthorized(text="a valid token is required\n")
        return web.Response(text=json.dumps(engine.metrics.snapshot(), indent=1) + "\n",
                            content_type="application/json")

    async def page(_request):
        return web.Response(text=(STATIC / "index.html").read_text(), content_type="text/html")

    async def asset(request):
        name = request.match_info["name"]
        if name not in ("app.js", "ogg.js"):
            raise web.HTTPNotFound()
        return web.Response(text=(STATIC / name).read_text(), content_type="text/javascript")

    async def start(_app):
        if warmup:
            await engine.warmup()
        tasks["step"] = asyncio.create_task(engine.run())
        tasks["step"].add_done_callback(_report_crash)

    async def stop(_app):
        engine.stop()  # the current step finishes; then every socket is closed
        if "step" in tasks:
            await tasks["step"]
        for ws in list(sockets):
            await ws.close(code=1001, message=b"server shutting down")
        engine.shutdown()

    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/favicon.ico", lambda _r: _no_content())
    app.router.add_get("/api/chat", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app
