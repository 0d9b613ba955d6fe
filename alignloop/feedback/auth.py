"""Who is asking and whether they may: sessions, API tokens, the one role dependency, CSRF, login.

Every route declares `Depends(require(...roles))` (or `require_login_form` for the login form itself).
`require` authenticates (bearer API token first, else the session cookie), checks the role, and for a
write made with a cookie checks the CSRF token (form field `csrf_token` or header `X-CSRF-Token`) and
the Origin (or Referer) header: browsers attach cookies to cross-site requests, bearer tokens they do
not. Unauthenticated page views redirect to /login; everything else gets 401. Roles are checked here
and nowhere else; which rows a user may see is the services' job (membership, own labels).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import sqlalchemy as sa
from argon2 import PasswordHasher
from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from alignloop.feedback import security
from alignloop.feedback.db import ROLES, ApiToken, AuthSession, Database, User, utcnow
from alignloop.feedback.settings import Settings

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_COOKIE = "alignloop_login"


@dataclass
class AppContext:
    """What handlers need, built once by create_app and kept on `app.state.ctx`."""

    settings: Settings
    secret: str
    database: Database
    hasher: PasswordHasher
    throttle: security.LoginThrottle
    dummy_hash: str
    templates: Jinja2Templates
    model_transport: httpx.BaseTransport | None = None
    """How the chat task reaches model servers: None for the network; tests put a mock transport here."""

    @property
    def session_cookie(self) -> str:
        # The __Host- prefix makes browsers refuse the cookie unless Secure, Path=/ and host-only.
        return "__Host-alignloop_session" if self.settings.cookie_secure else "alignloop_session"


@dataclass(frozen=True)
class Principal:
    """An authenticated user for one request; `session_hash` is None for API-token requests."""

    user_id: int
    username: str
    role: str
    session_hash: str | None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class LoginRequired(Exception):
    """No valid session or token: pages redirect to /login, the API answers 401."""


def app_context(request: Request) -> AppContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


def authenticate(request: Request) -> Principal | None:
    """The user behind a bearer token or session cookie, or None (never raises for bad credentials)."""
    ctx = app_context(request)
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    cookie = request.cookies.get(ctx.session_cookie)
    now = utcnow()
    with ctx.database.read() as db:
        if scheme.lower() == "bearer" and bearer:
            row = db.execute(
                sa.select(User).join(ApiToken, ApiToken.user_id == User.id)
                .where(ApiToken.token_hash == security.token_hash(bearer.strip()), ApiToken.revoked_at.is_(None))
            ).scalar_one_or_none()
            return Principal(row.id, row.username, row.role, None) if row is not None and row.active else None
        if cookie:
            digest = security.token_hash(cookie)
            row = db.execute(
                sa.select(User).join(AuthSession, AuthSession.user_id == User.id)
                .where(AuthSession.token_hash == digest, AuthSession.expires_at > now)
            ).scalar_one_or_none()
            return Principal(row.id, row.username, row.role, digest) if row is not None and row.active else None
    return None


def _request_origin(request: Request) -> str | None:
    """The Origin header, else the origin of the Referer, else None."""
    origin = request.headers.get("origin")
    if origin is None and (referer := request.headers.get("referer")):
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "null"
    return origin


def origin_allowed(request: Request, settings: Settings) -> bool:
    """A write's Origin must be ours; with neither Origin nor Referer the CSRF token alone decides."""
    origin = _request_origin(request)
    if origin is None:
        return True
    allowed = settings.allowed_origins or (f"{request.url.scheme}://{request.headers.get('host', '')}",)
    return origin in allowed


async def _submitted_csrf(request: Request) -> str | None:
    header = request.headers.get("x-csrf-token")
    if header:
        return header
    if request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get("csrf_token")
        return value if isinstance(value, str) else None
    return None


async def check_csrf(request: Request, binding: str) -> None:
    """403 unless the request carries our CSRF token for `binding` and comes from an allowed origin."""
    ctx = app_context(request)
    if not origin_allowed(request, ctx.settings):
        logger.warning("cross-origin write refused", extra={"path": request.url.path, "origin": _request_origin(request)})
        raise HTTPException(403, "cross-origin request refused")
    if not security.csrf_valid(ctx.secret, binding, await _submitted_csrf(request)):
        logger.warning("write without a valid CSRF token refused", extra={"path": request.url.path})
        raise HTTPException(403, "missing or invalid CSRF token")


def require(*roles: str) -> Callable[[Request], Awaitable[Principal]]:
    """The dependency every route uses: authenticated, one of `roles`, CSRF-checked for cookie writes."""
    unknown = set(roles) - set(ROLES)
    if not roles or unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}")

    async def dependency(request: Request) -> Principal:
        principal = await run_in_threadpool(authenticate, request)  # a database read: off the event loop
        if principal is None:
            raise LoginRequired()
        if principal.role not in roles:
            raise HTTPException(403, "your role may not do this")
        if request.method not in SAFE_METHODS and principal.session_hash is not None:
            await check_csrf(request, principal.session_hash)
        request.state.principal = principal
        return principal

    return dependency


async def require_login_form(request: Request) -> None:
    """The login form's own CSRF check, bound to the pre-login cookie that GET /login set."""
    await check_csrf(request, "login:" + request.cookies.get(LOGIN_COOKIE, ""))


# ---------------------------------------------------------------------------------------------------------
# Users, logins, tokens


def create_user(db: Session, hasher: PasswordHasher, username: str, password: str, role: str) -> User:
    """A new user; ValueError for a taken or malformed name, a weak password or an unknown role."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    if not username or len(username) > 64 or not username.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError("user names are 1-64 letters, digits, '.', '-' or '_'")
    security.check_password_strength(password)
    if db.execute(sa.select(User.id).where(User.username == username)).first() is not None:
        raise ValueError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hasher.hash(password), role=role)
    db.add(user)
    db.flush()
    logger.info("user created", extra={"user": username, "role": role})
    return user


def login(ctx: AppContext, username: str, password: str) -> str | None:
    """A new session token for valid credentials, else None; upgrades a hash made with older costs."""
    with ctx.database.write() as db:
        user = db.execute(sa.select(User).where(User.username == username)).scalar_one_or_none()
        # Verify against a dummy hash for unknown users so timing does not reveal which names exist.
        ok = security.verify_password(ctx.hasher, user.password_hash if user else ctx.dummy_hash, password)
        if user is None or not ok or not user.active:
            return None
        if ctx.hasher.check_needs_rehash(user.password_hash):
            user.password_hash = ctx.hasher.hash(password)
        token = security.new_token()
        expires = utcnow() + dt.timedelta(hours=ctx.settings.session_hours)
        db.add(AuthSession(token_hash=security.token_hash(token), user_id=user.id, expires_at=expires))
        db.execute(sa.delete(AuthSession).where(AuthSession.user_id == user.id, AuthSession.expires_at <= utcnow()))
    logger.info("login", extra={"user": username})
    return token


def logout(ctx: AppContext, principal: Principal) -> None:
    if principal.session_hash is not None:
        with ctx.database.write() as db:
            db.execute(sa.delete(AuthSession).where(AuthSession.token_hash == principal.session_hash))


def create_api_token(db: Session, username: str, name: str) -> str:
    """A new API token for an admin (shown once; only its hash is kept)."""
    user = db.execute(sa.select(User).where(User.username == username)).scalar_one_or_none()
    if user is None or user.role != "admin":
        raise ValueError(f"API tokens are for admins; {username!r} is not one")
    token = security.new_token()
    db.add(ApiToken(user_id=user.id, name=name[:100] or "token", token_hash=security.token_hash(token)))
    logger.info("API token created", extra={"user": username, "token_name": name})
    return token
