"""Who may call, and for which model: API keys (HTTP header or gRPC metadata) and the requested model name.

Keys come from the application's ``api_key`` list, an environment variable (comma-separated) and a file (one key
per line, e.g. a Kubernetes Secret mounted as a volume; re-read when it changes, so a rotated Secret takes effect
without a restart). A presented key is compared with every configured key in constant time: both sides are hashed
to SHA-256 first (so the comparison time does not depend on either length) and every key is compared, without an
early exit, so the timing says neither whether nor which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from cluster.config.serving import AppArgs
from cluster.errors import AppArgsError, AuthenticationError, ModelNotFoundError

log = logging.getLogger("mixserve")

FILE_CHECK_INTERVAL_S = 1.0


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def keys_from_env(value: str | None) -> list[str]:
    """``a, b,c`` -> ``["a", "b", "c"]``; empty items are dropped."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


def keys_from_file(path: Path) -> list[str]:
    """One key per line; blank lines and lines starting with ``#`` are skipped, surrounding whitespace (the
    trailing newline of a Secret) is not part of a key."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


class ApiKeys:
    """The keys a request may present. No key configured: every request is allowed."""

    def __init__(self, keys: Iterable[str] = (), *, env: str | None = None, file: str | None = None) -> None:
        self._fixed = list(keys) + keys_from_env(os.environ.get(env) if env else None)
        self._file = Path(file) if file else None
        self._file_keys: list[str] = []
        self._file_mtime: float | None = None
        self._checked = 0.0
        if self._file is not None:
            try:
                self._reload_file()
            except OSError as e:
                raise AppArgsError(f"api_key_file: cannot read {str(self._file)!r}: {e.strerror or e}") from None
        self._digests = self._all_digests()

    @classmethod
    def from_args(cls, args: AppArgs) -> ApiKeys:
        """From the application's ``api_key``, ``api_key_env`` and ``api_key_file``."""
        s = args.serving
        return cls(s.api_key, env=s.api_key_env, file=s.api_key_file)

    def _all_digests(self) -> list[bytes]:
        return [_digest(k) for k in dict.fromkeys(self._fixed + self._file_keys)]

    def _reload_file(self) -> None:
        assert self._file is not None
        mtime = self._file.stat().st_mtime
        if mtime != self._file_mtime:
            self._file_keys = keys_from_file(self._file)
            self._file_mtime = mtime

    def _refresh(self) -> None:
        """Re-read the key file when it changed (checked at most once a second); a file that went missing or
        unreadable keeps the keys last read, with a warning."""
        now = time.monotonic()
        if self._file is None or now - self._checked < FILE_CHECK_INTERVAL_S:
            return
        self._checked = now
        before = self._file_mtime
        try:
            self._reload_file()
        except OSError as e:
            log.warning("api_key_file %s: %s; keeping the keys read before", self._file, e)
            return
        if self._file_mtime != before:
            self._digests = self._all_digests()
            log.info("api_key_file %s changed: %d keys", self._file, len(self._file_keys))

    @property
    def enabled(self) -> bool:
        self._refresh()
        return bool(self._digests)

    def __len__(self) -> int:
        self._refresh()
        return len(self._digests)

    def check(self, authorization: str | None) -> None:
        """``authorization`` must be ``Bearer <key>`` with one of the keys, exactly (no padding)."""
        self._refresh()
        digests = self._digests
        if not digests:
            return
        if not authorization:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        presented = _digest(key)
        matched = 0
        for d in digests:  # every key, no early exit
            matched |= hmac.compare_digest(presented, d)
        if scheme.lower() != "bearer" or not matched:
            raise AuthenticationError("invalid API key")


def check_model(served: Sequence[str], model: str | None) -> None:
    """The request may name any served model name (aliases included) or none at all."""
    if model not in (None, "") and model not in served:
        raise ModelNotFoundError(f"the model {model!r} does not exist; this server serves {served[0]!r}")
