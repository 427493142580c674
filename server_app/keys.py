"""The server key and session tokens: created, stored, hashed and compared in constant time.

The key opens sessions: given in the settings, or generated once and written to
`SPLIT_DIR/.splitkeras/server.key` with mode 0600. A session token is kept only as its
SHA-256 hash (that is what checkpoints persist). Both are compared with
`secrets.compare_digest`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from splitkeras.errors import RequestRefused

__all__ = ["ServerKey", "load_or_create_key", "new_token", "hash_token", "check_token"]


def load_or_create_key(path: Path) -> str:
    """The key stored at `path`; a new random one, written with mode 0600, if there is none."""
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


class ServerKey:
    """The key a device needs to open a session."""

    def __init__(self, value: str) -> None:
        self.value = value

    def matches(self, given: str | None) -> bool:
        return bool(given) and secrets.compare_digest(str(given).encode(), self.value.encode())

    def check(self, given: str | None) -> None:
        """Refuse (`unauthorized`) unless `given` is the key."""
        if not self.matches(given):
            raise RequestRefused("unauthorized",
                                 "Opening a session needs the server key as 'Authorization: Bearer "
                                 "<key>' (printed by `splitkeras serve`, stored in "
                                 "SPLIT_DIR/.splitkeras/server.key).")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_token(token: str | None, token_hash: str) -> None:
    """Refuse (`unauthorized`) unless `token` hashes to the session's `token_hash`."""
    if not token or not secrets.compare_digest(hash_token(token).encode(), token_hash.encode()):
        raise RequestRefused("unauthorized",
                             "This route needs the session's token as 'Authorization: Bearer <token>'.")
