"""`create_app(settings)`: the FastAPI app, its error mapping, security headers and JSON logs.

Nothing happens at import time: the factory validates the settings (refusing a missing or weak secret),
builds the engine and keeps everything on `app.state.ctx`. It does not migrate: `alignloop app serve`
and `alignloop app migrate` do, so that a test or a second worker never changes the schema by accident.
FastAPI's own /docs and /openapi.json are off because they would be unauthenticated; admins read the
schema at /api/v1/openapi.json.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from alignloop import __version__
from alignloop.data import DataError
from alignloop.feedback import api, pages, security
from alignloop.feedback.auth import AppContext, LoginRequired
from alignloop.feedback.chat import ChatError, HostRefused
from alignloop.feedback.db import Database, UnstorableText
from alignloop.feedback.services import Conflict, Invalid, NotFound
from alignloop.feedback.settings import Settings

access_log = logging.getLogger("alignloop.feedback.access")
TEMPLATES = Path(__file__).resolve().parent / "templates"


def create_app(settings: Settings, *, database: Database | None = None,
               model_transport: httpx.BaseTransport | None = None) -> FastAPI:
    """The app for `settings` (SettingsError if unsafe); pass `database` to share an engine, and
    `model_transport` to answer the chat task's model requests in-process (tests)."""
    settings.validate()
    hasher = security.password_hasher(settings)
    ctx = AppContext(settings=settings, secret=settings.resolved_secret(),
                     database=database or Database(settings.database_url), hasher=hasher,
                     throttle=security.LoginThrottle(settings.login_failures_per_minute),
                     dummy_hash=security.dummy_hash(hasher), templates=Jinja2Templates(directory=str(TEMPLATES)),
                     model_transport=model_transport)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.database.dispose()

    app = FastAPI(title="alignloop feedback", version=__version__, openapi_url=None, docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.ctx = ctx
    app.include_router(pages.router)
    app.include_router(api.router)
    _add_error_handlers(app)
    app.middleware("http")(_headers_and_access_log)
    return app


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_response(request: Request, status: int, detail: str, **extra: Any) -> Response:
    """JSON for the API, a small HTML page for browsers."""
    if _is_api(request):
        return JSONResponse({"detail": detail, **extra}, status_code=status)
    ctx: AppContext = request.app.state.ctx
    nonce = getattr(request.state, "csp_nonce", "")
    return ctx.templates.TemplateResponse(request, "message.html", {"title": f"Error {status}", "message": detail,
                                                                    "me": None, "csrf": "", "nonce": nonce},
                                          status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    async def login_required(request: Request, _exc: Exception) -> Response:
        if _is_api(request) or request.method != "GET":
            response = error_response(request, 401, "authentication required")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return RedirectResponse("/login", status_code=303)

    async def data_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DataError)
        return error_response(request, 400, str(exc), code=exc.code, line=exc.line, field=exc.field)

    def simple(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
        async def handler(request: Request, exc: Exception) -> Response:
            return error_response(request, status, str(exc))
        return handler

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        response = error_response(request, exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(DataError, data_error)
    app.add_exception_handler(NotFound, simple(404))
    app.add_exception_handler(Conflict, simple(409))
    app.add_exception_handler(Invalid, simple(400))
    app.add_exception_handler(UnstorableText, simple(400))
    # The chat task's model server: refused by the allow-list is the setup's fault (400); down, slow or
    # answering nonsense is a bad gateway (502). Never a 500.
    app.add_exception_handler(HostRefused, simple(400))
    app.add_exception_handler(ChatError, simple(502))
    app.add_exception_handler(HTTPException, http_error)


def security_headers(nonce: str) -> dict[str, str]:
    """A strict CSP (our inline script and style carry the nonce), no framing, no sniffing, no caching."""
    return {
        "Content-Security-Policy": (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                                    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


async def _headers_and_access_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    request.state.csp_nonce = secrets.token_urlsafe(16)
    start = time.perf_counter()
    response = await call_next(request)
    for key, value in security_headers(request.state.csp_nonce).items():
        response.headers.setdefault(key, value)
    principal = getattr(request.state, "principal", None)
    access_log.info("%s %s %d", request.method, request.url.path, response.status_code, extra={
        "method": request.method, "path": request.url.path, "status": response.status_code,
        "ms": round(1000 * (time.perf_counter() - start), 1), "user": principal.username if principal else None,
        "client": request.client.host if request.client else None})
    return response


# ---------------------------------------------------------------------------------------------------------
# Structured logs

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every `extra=` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def log_config(json_logs: bool = True, level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict for the server (uvicorn's loggers included)."""
    formatter = {"()": f"{__name__}.JsonFormatter"} if json_logs else {
        "format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"default": formatter}, "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": level},
        # Our access log replaces uvicorn's (it adds the user and timing).
        "loggers": {"uvicorn": {"level": level}, "uvicorn.error": {"level": level},
                    "uvicorn.access": {"level": "WARNING", "propagate": False}},
    }

