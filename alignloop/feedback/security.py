"""Passwords, tokens, CSRF and login throttling: the small primitives the auth module builds on.

Passwords: Argon2id (argon2-cffi) with the settings' costs; a hash made with weaker costs is rehashed
at the next successful login. Session and API tokens are 256-bit random strings; only their SHA-256
is stored, so a leaked database logs no one in. CSRF tokens are an HMAC of the session (or, before
login, of a random cookie) under the app secret: a page can only get one from our own server.
Credentials the app must send elsewhere (a chat project's model API key) are stored sealed: Fernet
(AES-128-CBC + HMAC-SHA256, `cryptography`) under a key derived from the app secret with HKDF, so a
database file, backup or dump alone does not give them away.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from alignloop.feedback.settings import Settings

MIN_PASSWORD_LENGTH = 12
SEALED_PREFIX = "sealed:v1:"
"""What a sealed value starts with; a stored value without it is from before sealing (read as it is)."""


class Unsealable(ValueError):
    """A sealed value that this secret cannot open: the app secret changed since it was stored, or it was altered."""


def _fernet(secret: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"alignloop feedback: stored credentials v1").derive(secret.encode("utf-8"))
    return Fernet(base64.urlsafe_b64encode(key))


def seal(secret: str, plaintext: str) -> str:
    """`plaintext` encrypted and authenticated under the app secret, as text for the database."""
    return SEALED_PREFIX + _fernet(secret).encrypt(plaintext.encode("utf-8")).decode("ascii")


def is_sealed(stored: str) -> bool:
    return stored.startswith(SEALED_PREFIX)


def unseal(secret: str, stored: str) -> str:
    """The plaintext of a `seal`ed value (Unsealable if this secret cannot open it); an unsealed value, stored
    before sealing existed, is returned as it is."""
    if not is_sealed(stored):
        return stored
    try:
        return _fernet(secret).decrypt(stored[len(SEALED_PREFIX):].encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeError) as err:
        raise Unsealable("the stored value was sealed under another app secret, or altered") from err


def password_hasher(settings: Settings) -> PasswordHasher:
    """Argon2id with the configured costs (validated >= OWASP unless a test allowed weaker)."""
    return PasswordHasher(time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib,
                          parallelism=settings.argon2_parallelism, hash_len=32, salt_len=16, type=Type.ID)


def check_password_strength(password: str) -> None:
    """Refuse passwords too short to resist offline guessing (NIST 800-63B asks for 8; we ask 12)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"passwords need at least {MIN_PASSWORD_LENGTH} characters")


def verify_password(hasher: PasswordHasher, stored_hash: str, password: str) -> bool:
    """True when `password` matches; a malformed stored hash counts as a mismatch."""
    try:
        return hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


# A hash to verify against when the user name is unknown, so both cases take the same time.
def dummy_hash(hasher: PasswordHasher) -> str:
    return hasher.hash(secrets.token_urlsafe(16))


def new_token() -> str:
    """A 256-bit random URL-safe token (session cookie, API token)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the database stores for a token: its SHA-256 in hex (tokens are random, so no salt)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def csrf_token(secret: str, binding: str) -> str:
    """The CSRF token for a session (or pre-login cookie) `binding`."""
    return hmac.new(secret.encode("utf-8"), b"csrf:" + binding.encode("utf-8"), hashlib.sha256).hexdigest()


def csrf_valid(secret: str, binding: str, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(csrf_token(secret, binding), str(token))


class LoginThrottle:
    """Failed logins per key (user name, client address) in a sliding 60 s window, in this process.

    One process is what `alignloop app serve` runs; several workers would each count separately
    (a shared counter in the database is the next step if that is ever needed)."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit, self.window_s = limit, window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures[key]
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def blocked(self, *keys: str) -> bool:
        """True when any key already has `limit` failures in the window: refuse before checking."""
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(k, now)) >= self.limit for k in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)

    def reset(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)
