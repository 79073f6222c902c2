"""Which failures of a remote read are worth retrying, and how long to wait before the next try.

Transient: connection drops and timeouts (aiohttp's errors, botocore's ``EndpointConnectionError``,
``ConnectionClosedError``, read timeouts, ``OSError``), HTTP 5xx and 429, and S3 throttling codes.
Permanent: a missing object, denied access, a range past the end, or bad data (any ``ShardError``).
"""

from __future__ import annotations

import asyncio
import random

from flexast.pipeline.errors import ShardError

THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
     "ServiceUnavailable", "503", "500", "TooManyRequests", "RequestLimitExceeded"}
)  # fmt: skip


class CutShort(Exception):
    """A response that ended before its range did (retried from the byte where it stopped)."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying can help: connection drops, timeouts, HTTP 5xx and 429, S3 throttling; not missing files,
    denied access, ranges past the end or bad data."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | ShardError):
        return False
    if isinstance(exc, CutShort | asyncio.TimeoutError):
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        code = str(response["Error"].get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in THROTTLE_CODES or status >= 500 or status == 429
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    try:
        import botocore.exceptions as bce

        if isinstance(exc, bce.ConnectionError | bce.HTTPClientError | bce.IncompleteReadError):
            return True  # EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ResponseStreamingError…
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:  # pragma: no cover - aiohttp comes with fsspec[http]
        pass
    return isinstance(exc, ConnectionError | TimeoutError | OSError | EOFError)


def backoff_delay(backoff_s: float, attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): ``backoff_s · 2^attempt`` with ±50 % jitter."""
    return backoff_s * 2**attempt * (0.5 + random.random())
