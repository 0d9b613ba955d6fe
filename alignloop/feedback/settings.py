"""Settings of the feedback app, read from `ALIGNLOOP_APP_*` environment variables.

A plain frozen dataclass: the app gets one `Settings` object through `create_app(settings)` and reads
nothing from the environment itself, so tests build their own. `validate()` refuses what would be
unsafe to serve (RELIABILITY.md W4): a missing or short secret, a secret file other users can read,
password hashing weaker than OWASP's Argon2id minimum, a malformed model-host allow-list. Tests may lower the Argon2 cost only by passing
`allow_weak_hashing=True`, which no environment variable sets.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from alignloop.feedback.chat import parse_model_hosts

ENV_PREFIX = "ALIGNLOOP_APP_"
MIN_SECRET_LENGTH = 32
# OWASP Password Storage Cheat Sheet, Argon2id minimum: m=19 MiB, t=2, p=1.
OWASP_MEMORY_KIB, OWASP_TIME_COST, OWASP_PARALLELISM = 19456, 2, 1


class SettingsError(ValueError):
    """The settings are missing something or unsafe; the message names the variable to fix."""


@dataclass(frozen=True)
class Settings:
    """Everything the app needs to run; every field has an `ALIGNLOOP_APP_<NAME>` variable."""

    database_url: str = "sqlite:///alignloop-feedback.db"
    """SQLAlchemy URL: `sqlite:///path.db` (WAL, synchronous=FULL) or `postgresql+psycopg://user@host/db`."""
    secret_key: str = field(default="", repr=False)
    """At least 32 characters; signs CSRF tokens. Or give `secret_key_file`. Never has a default."""
    secret_key_file: str = ""
    """A file holding the secret (mode 0600 or stricter); used when `secret_key` is empty."""
    allowed_origins: tuple[str, ...] = ()
    """Origins (`https://labels.example.org`) whose writes are accepted; empty: the request's own host."""
    cookie_secure: bool = True
    """Send the session cookie over HTTPS only; set false only for plain-HTTP development."""
    cookie_samesite: str = "lax"
    """SameSite attribute of the session cookie: "lax" or "strict"."""
    session_hours: float = 12.0
    """How long a login lasts."""
    login_failures_per_minute: int = 10
    """Failed logins allowed per user name and per client address in 60 s; the next one gets 429."""
    assignment_ttl_minutes: float = 60.0
    """An unanswered assignment stops counting towards an item's overlap after this long."""
    max_upload_bytes: int = 20_000_000
    """Largest accepted item upload."""
    argon2_memory_kib: int = 65536
    """Argon2id memory cost (KiB); at least 19456 (OWASP)."""
    argon2_time_cost: int = 3
    """Argon2id iterations; at least 2 (OWASP)."""
    argon2_parallelism: int = 4
    """Argon2id lanes; at least 1."""
    allow_weak_hashing: bool = False
    """Tests only (no environment variable): accept Argon2 costs below the OWASP minimum."""
    log_json: bool = True
    """Write logs as one JSON object per line."""
    model_hosts: tuple[str, ...] = ()
    """Chat: non-public model servers the app may call (host names, IP addresses, CIDR networks; see
    `chat.parse_model_hosts`). Empty: public addresses only, so a model on loopback must be listed."""

    def resolved_secret(self) -> str:
        """The secret from `secret_key` or `secret_key_file`; SettingsError if missing or too weak."""
        secret = self.secret_key
        if not secret and self.secret_key_file:
            path = Path(self.secret_key_file)
            if not path.is_file():
                raise SettingsError(f"{ENV_PREFIX}SECRET_KEY_FILE: {path} is not a file")
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise SettingsError(f"{ENV_PREFIX}SECRET_KEY_FILE: {path} is readable by others; chmod 600 it")
            secret = path.read_text(encoding="utf-8").strip()
        if not secret:
            raise SettingsError(f"no secret: set {ENV_PREFIX}SECRET_KEY or {ENV_PREFIX}SECRET_KEY_FILE "
                                f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))')")
        if len(secret) < MIN_SECRET_LENGTH or len(set(secret)) < 10:
            raise SettingsError(f"{ENV_PREFIX}SECRET_KEY is too weak: use at least {MIN_SECRET_LENGTH} random characters")
        return secret

    def validate(self, *, require_secret: bool = True) -> None:
        """Raise SettingsError for anything unsafe or malformed (the server refuses to start). Commands
        that only touch the database (`alignloop app user add`) pass require_secret=False."""
        if require_secret:
            self.resolved_secret()
        if self.cookie_samesite not in ("lax", "strict"):
            raise SettingsError(f"{ENV_PREFIX}COOKIE_SAMESITE must be 'lax' or 'strict', got {self.cookie_samesite!r}")
        weak = (self.argon2_memory_kib < OWASP_MEMORY_KIB or self.argon2_time_cost < OWASP_TIME_COST
                or self.argon2_parallelism < OWASP_PARALLELISM)
        if weak and not self.allow_weak_hashing:
            raise SettingsError(f"Argon2id costs below OWASP's minimum (m={OWASP_MEMORY_KIB} KiB, t={OWASP_TIME_COST}, "
                                f"p={OWASP_PARALLELISM})")
        if self.login_failures_per_minute < 1 or self.session_hours <= 0:
            raise SettingsError("login_failures_per_minute must be >= 1 and session_hours > 0")
        try:
            parse_model_hosts(",".join(self.model_hosts))
        except ValueError as err:
            raise SettingsError(str(err)) from None
        for origin in self.allowed_origins:
            if not origin.startswith(("http://", "https://")) or origin.rstrip("/") != origin:
                raise SettingsError(f"{ENV_PREFIX}ALLOWED_ORIGINS: {origin!r} is not scheme://host[:port]")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Defaults overridden by `ALIGNLOOP_APP_<FIELD>` variables (booleans: 1/0, true/false;
        ALLOWED_ORIGINS and MODEL_HOSTS: comma-separated). Not validated: call `validate()` before serving."""
        env = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or f.name == "allow_weak_hashing":
                continue
            values[f.name] = _parse(f.name, raw, f.type)
        return cls(**values)  # type: ignore[arg-type]


def _parse(name: str, raw: str, kind: object) -> object:
    """One environment value as the field's type; SettingsError names the variable."""
    kind = str(kind)
    try:
        if kind == "bool":
            if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.strip().lower() in ("1", "true", "yes")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}: cannot read {raw!r} as {kind}") from None
