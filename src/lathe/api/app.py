"""The FastAPI application: wires settings, store, futures and engine to the routers."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lathe import __version__
from lathe.api.body_limit import BodyLimitMiddleware
from lathe.api.deps import get_caller
from lathe.api.futures import REPLICA_BEAT_S, FutureRegistry
from lathe.api.inference import errors
from lathe.api.inference.chat_template import TemplateError
from lathe.api.routers import (
    anthropic_compat,
    auth,
    checkpoints,
    console,
    custom_losses,
    files,
    futures,
    keys,
    openai_compat,
    runs,
    sampling,
    service,
    sessions,
    training,
    usage,
)
from lathe.api.session_work import end_session
from lathe.api.state import AppState
from lathe.client.base import EngineClient
from lathe.settings import Settings
from lathe.store import checkpoint_files
from lathe.store.catalog import read_info
from lathe.store.db import Store, utcnow
from lathe.store.keys import KeyStore, server_secret
from lathe.store.tinker_paths import PathError

log = logging.getLogger(__name__)

# Authenticated with an API key; `auth` and `files` authenticate themselves.
ROUTERS = (
    service,
    sessions,
    training,
    custom_losses,
    sampling,
    futures,
    checkpoints,
    runs,
    usage,
    keys,
)


def build_state(settings: Settings, engine: EngineClient) -> AppState:
    """Open the store; the app's lifespan starts the engine behind `engine`."""
    store = Store.open(settings.db_path, settings.database_url)
    # a shared engine service sweeps at its own start: it may be writing a checkpoint now
    if not settings.shared_engine and (
        swept := checkpoint_files.sweep_unfinished(settings.checkpoint_dir)
    ):
        log.warning("removed %d checkpoint folder(s) left half-written by a crash", swept)
    catalog = {name: read_info(name, path) for name, path in settings.models.items()}
    keys = KeyStore(store, server_secret(settings.data_dir))
    registry = FutureRegistry(store)
    registry.beat()
    return AppState(settings, store, catalog, registry, engine, keys)


async def reap_expired(state: AppState) -> None:
    """Delete checkpoints whose TTL has passed (they are unlisted the moment it passes)."""
    while True:
        await asyncio.sleep(state.settings.reap_seconds)
        try:
            for row in await asyncio.to_thread(state.store.expired_checkpoints):
                await asyncio.to_thread(state.store.remove_checkpoint, row, "ttl")
        except Exception:  # never let a bad row stop the reaper
            log.exception("reaping expired checkpoints failed")


async def beat(state: AppState) -> None:
    """Tell the other API replicas on this database that this one still holds its futures."""
    while True:
        await asyncio.sleep(REPLICA_BEAT_S)
        try:
            await asyncio.to_thread(state.futures.beat)
        except Exception:  # a database hiccup: the next beat tries again
            log.exception("recording this replica's heartbeat failed")


async def expire_sessions(state: AppState) -> None:
    """End sessions whose heartbeats stopped; their models and samplers are unloaded."""
    while True:
        await asyncio.sleep(
            min(state.settings.reap_seconds, state.settings.session_timeout_seconds)
        )
        try:
            cutoff = utcnow() - dt.timedelta(seconds=state.settings.session_timeout_seconds)
            for session_id in await asyncio.to_thread(state.store.stale_sessions, cutoff):
                log.info("session %s expired (no heartbeat)", session_id)
                await asyncio.to_thread(
                    end_session, state, session_id, "expired", "its heartbeats stopped"
                )
        except Exception:
            log.exception("expiring sessions failed")


def create_app(settings: Settings, engine: EngineClient) -> FastAPI:
    """The app, talking to the engine through `engine` (client/choice.py makes the usual one)."""
    state = build_state(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.futures.bind_loop(asyncio.get_running_loop())
        await asyncio.to_thread(state.engine.start, state.futures.complete)
        tasks = [asyncio.create_task(task(state)) for task in (reap_expired, expire_sessions, beat)]
        yield
        for t in tasks:
            t.cancel()
        state.engine.stop()
        state.store.forget_replica(state.futures.replica_id)

    app = FastAPI(title="lathe", version=__version__, lifespan=lifespan)
    app.state.lathe = state
    for module in ROUTERS:  # every call is authenticated (resource routes use the caller too)
        app.include_router(module.router, prefix="/api/v1", dependencies=[Depends(get_caller)])
    app.include_router(auth.router, prefix="/api/v1")  # takes the raw key itself
    app.include_router(files.router, prefix="/api/v1")  # signed URLs, no key
    for prefix in ("/oai/api/v1", "/v1"):  # OpenAI-compatible inference (takes its own key)
        app.include_router(openai_compat.router, prefix=prefix)
    for prefix in ("/anthropic/api/v1", "/anthropic/v1"):  # and Anthropic-compatible
        app.include_router(anthropic_compat.router, prefix=prefix)
    app.include_router(console.router)  # the web console's page (it sends the key itself)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    add_error_handlers(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON with a `detail` (the SDK treats a body-less 400 as a lost connection);
    under the OpenAI- and Anthropic-compatible paths, in that provider's error shape."""

    def error(request: Request, status: int, message: str, headers=None) -> JSONResponse:  # noqa: ANN001
        if provider := errors.provider_of(request.url.path):
            return errors.error_response(provider, status, message, headers)
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(request, exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(PathError)
    async def path_error(request: Request, exc: PathError) -> JSONResponse:
        return error(request, 400, str(exc))

    @app.exception_handler(TemplateError)  # messages the model's chat template refuses
    async def template_error(request: Request, exc: TemplateError) -> JSONResponse:
        return error(request, 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()
        )
        return error(request, 400, f"invalid request: {problems}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(request, 500, f"internal error: {exc}")
