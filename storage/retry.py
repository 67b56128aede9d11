"""Retry by cause: transient failures are retried with backoff, permanent ones fail at once.

A week of GPU time hangs on getting this right. A connection reset while uploading a trained shard
must not throw the batch away (retry the upload), and a full disk or a missing bucket must not be
retried three times with a retrain each time (fail now, with the reason). Exceptions are classified
by type and errno, walking their cause chain, and by class *name* for the S3 stack (botocore,
aiobotocore, aiohttp), so nothing here imports those libraries.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from weightzoo.errors import WeightzooError, short

log = logging.getLogger(__name__)
T = TypeVar("T")

# Connection and timeout errors of botocore, aiobotocore, aiohttp, urllib3 and fsspec, by class name.
_TRANSIENT_CLASSES = {
    "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
    "ProxyConnectionError", "HTTPClientError", "ResponseStreamingError", "IncompleteReadError",
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
    "ClientPayloadError", "ServerTimeoutError", "FSTimeoutError", "ProtocolError", "NewConnectionError",
}
# Service-side throttling and 5xx, as S3 error codes or HTTP statuses in a message.
_TRANSIENT_MESSAGES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttl",
                       " 500", " 502", " 503", " 504", "Please reduce your request rate")
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN}
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOENT,
                     errno.EISDIR, errno.ENOTDIR}
_GPU_RUNTIME = ("CUDA error", "CUDA driver", "NCCL", "cuDNN", "CUBLAS_STATUS")


class LostWriteError(FileNotFoundError):
    """A file this writer had just written is gone (its temp file before the rename, or its shard before or
    right after its commit), e.g. removed by a ``gc`` racing the write. Writing again cures it: retried."""


def _lost_temp(exc: BaseException) -> bool:
    """A ``FileNotFoundError`` about one of weightzoo's own temp files (``_tmp/`` or ``.tmp-<hex>``)."""
    name = str(getattr(exc, "filename", None) or "")
    return isinstance(exc, FileNotFoundError) and ("/_tmp/" in name or ".tmp-" in name)


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes, outermost first (each once, should the chain loop)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def is_permanent(exc: BaseException) -> bool:
    """No retry can cure it: bad input, a refused mix, no space, read-only, access denied, no such bucket."""
    first = exc
    if isinstance(first, LostWriteError) or _lost_temp(first):
        return False
    if isinstance(first, WeightzooError | ValueError | KeyError | TypeError | PermissionError | FileNotFoundError):
        return True
    return isinstance(first, OSError) and first.errno in _PERMANENT_ERRNOS


def is_transient(exc: BaseException) -> bool:
    """A second attempt may succeed: a dropped connection, a timeout, throttling, a 5xx, a CUDA runtime
    error, a file this writer had just written gone missing (a racing gc)."""
    if is_permanent(exc):
        return False
    for e in chain(exc):
        if isinstance(e, LostWriteError) or _lost_temp(e):
            return True
        names = {c.__name__ for c in type(e).__mro__}
        if names & _TRANSIENT_CLASSES or isinstance(e, ConnectionError | TimeoutError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        text = f" {e}"
        if isinstance(e, OSError) and any(m in text for m in _TRANSIENT_MESSAGES):
            return True
        if isinstance(e, RuntimeError) and any(m in text for m in _GPU_RUNTIME) and "out of memory" not in text:
            return True
    return False


def describe(exc: BaseException) -> str:
    """One line for the ledger and the summary: the exception's class and first message line."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def with_retries(fn: Callable[[], T], what: str, attempts: int = 8, first_delay_s: float = 1.0,
                 max_delay_s: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn`` until it succeeds, retrying transient failures with exponential backoff.

    Defaults wait about 2.5 minutes in all, enough for a dropped connection or a storage blip;
    anything permanent, or transient past the last attempt, is raised as it is.
    """
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            log.warning("%s failed (%s); retry %d/%d in %.0f s", what, describe(exc), attempt, attempts - 1, delay)
            sleep(delay)
            delay = min(delay * 2, max_delay_s)
    raise AssertionError("unreachable")


# -- what a storage fault means to a person -------------------------------------------------------------

# The storage clients' own packages. A fault is a storage fault when one of these raised it: the builtin
# ConnectionRefusedError under an httpx error is the Prefect API's, and a BrokenPipeError is a closed stdout.
_STORAGE_CLIENTS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3", "fsspec", "gcsfs", "adlfs", "requests")
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError",
                "ServerTimeoutError", "ProxyConnectionError", "NewConnectionError"}
_REFUSED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "ExpiredToken",
            "InvalidToken", "does not exist in our records")


def from_storage_client(exc: BaseException) -> bool:
    """Whether a storage client (botocore, aiohttp, s3fs, fsspec, ...) raised ``exc`` itself."""
    return type(exc).__module__.split(".", 1)[0] in _STORAGE_CLIENTS


def storage_cause(exc: BaseException, remote: bool) -> str | None:
    """The likely cause of a fault a storage call raised, as advice; None when no storage client raised
    anything in its chain (then it is not a storage fault: a bug, the Prefect API, the terminal)."""
    causes = list(chain(exc))
    ours = [e for e in causes if from_storage_client(e)]
    names = {c.__name__ for e in ours for c in type(e).__mro__}
    text = " ".join(str(e) for e in causes)
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return "no credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
    unreachable = [e for e in ours if {c.__name__ for c in type(e).__mro__} & _UNREACHABLE]
    if unreachable:
        return ("the endpoint does not answer: check AWS_ENDPOINT_URL (or endpoint_url) and that the server "
                f"runs ({short(unreachable[0], 160)})")
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return "no such bucket: create it or fix the name"
    if not remote:
        return f"permission denied ({short(text, 120)})" if isinstance(exc, PermissionError) else None
    if not ours:  # s3fs raises builtin PermissionError/FileNotFoundError, but from a botocore error
        return None
    if any(isinstance(e, PermissionError) for e in causes) or any(word in text for word in _REFUSED):
        return f"the credentials were refused: check the access key, secret and region ({short(text, 120)})"
    return None
