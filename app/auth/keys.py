"""API key secrets: generated once, stored only as a SHA-256 hash and a display prefix."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, date, datetime, time, timedelta

SECRET_PREFIX = "llmapi-"
DISPLAY_CHARS = len(SECRET_PREFIX) + 6
MAX_SECRET_CHARS = 200


def generate_secret() -> str:
    """A new key: the prefix + 32 random url-safe bytes."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def display_prefix(secret: str) -> str:
    """The first few characters, enough for a person to tell keys apart."""
    return secret[:DISPLAY_CHARS]


def same_hash(stored: str, secret: str) -> bool:
    """Constant-time comparison of a stored hash with a presented secret's hash."""
    return hmac.compare_digest(stored.encode(), hash_secret(secret).encode())


def utc(value: datetime | date | None, end_of_day: bool = False) -> datetime | None:
    """A datetime in UTC. A plain date is that day's start, or with `end_of_day` the next
    day's start (so `expires_at: 2026-12-31` is valid through the 31st). Naive means UTC."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        start = datetime.combine(value, time(), tzinfo=UTC)
        return start + timedelta(days=1) if end_of_day else start
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def now() -> datetime:
    return datetime.now(UTC)
