"""A lease per batch, so that two builds of one dataset train each batch about once, not twice.

``ledger/leases/<batch>.json`` holds a holder and an expiry. A batch takes its lease before training and
renews it while it trains (a background thread); another build skips a batch leased by a live holder and
takes over an expired one (its holder was killed), or at once one whose holder was a process on this host
that is gone (its pid no longer runs, or now belongs to a process started later). Leases save GPU time only: exactly-once visibility
stays the ledger's job, so a lost race costs one duplicate training, never a duplicate row.

A lease records its TTL. One whose expiry lies further ahead than its TTL allows (plus ``SKEW_SLACK_S``) was
written by a host whose clock is wrong, or by hand: it is *skewed*, treated as stale (taken over at once, not
waited out for years) and named by ``weightzoo status`` (``lease_problems``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from weightzoo.storage.fs import check_id, join, write_bytes
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.procs import process_gone, process_start

LEASES = "ledger/leases"
# A batch's lease outlives a killed holder by at most this long (renewed every third of it while training);
# gc keeps temp files younger than this whatever its grace period.
DEFAULT_TTL_S = 120.0
# How far a holder's clock may run ahead of ours before its lease counts as skewed: NTP keeps hosts within
# milliseconds; a minute leaves room for a host that has just booted.
SKEW_SLACK_S = 60.0
# The TTL assumed for a lease written before leases recorded theirs (an hour: far above any TTL in use).
UNRECORDED_TTL_S = 3600.0
log = logging.getLogger(__name__)


def lease_states(ledger: Ledger) -> dict[str, LeaseState | None]:
    """Every lease file's batch and its state (None: torn or foreign), from one listing of ``ledger/leases/``."""
    path = join(ledger.root, LEASES)
    ledger.fs.invalidate_cache(path)
    try:
        names = [p for p in ledger.fs.ls(path, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return {}
    blobs = ledger.fs.cat(names, on_error="omit") if names else {}  # a lease released meanwhile: omitted
    out: dict[str, LeaseState | None] = {}
    for name, blob in blobs.items():
        try:
            state: LeaseState | None = LeaseState.parse(blob)
        except (ValueError, KeyError, TypeError):  # torn: its writer rewrites it within a renewal
            state = None
        out[name.rsplit("/", 1)[-1].removesuffix(".json")] = state
    return out


def lease_problems(ledger: Ledger) -> list[str]:
    """One line per lease that is not what it claims (a skewed expiry), for ``weightzoo status``."""
    return [f"lease of batch {batch}: {why}" for batch, state in sorted(lease_states(ledger).items())
            if state is not None and (why := state.skew()) is not None]


def leased_batches(ledger: Ledger) -> set[str]:
    """Batches whose lease a live holder has now (unexpired, not skewed), from one listing of ``ledger/leases/``;
    a torn lease counts as held (its writer rewrites it within a renewal)."""
    return {batch for batch, state in lease_states(ledger).items() if state is None or state.live()}


def new_holder() -> str:
    """A holder name unique to this attempt, readable in a listing: host, process, token."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class LeaseState:
    holder: str
    expires: float  # epoch seconds
    host: str | None = None  # where the holder runs, its pid and that process's start time (older leases: None)
    pid: int | None = None
    started: int | None = None
    ttl_s: float | None = None  # the TTL it was written with (older leases: None)

    @classmethod
    def parse(cls, blob: bytes) -> LeaseState:
        d = json.loads(blob)
        pid, started, ttl = d.get("pid"), d.get("started"), d.get("ttl_s")
        return cls(str(d["holder"]), float(d["expires"]), d.get("host"),
                   int(pid) if pid is not None else None, int(started) if started is not None else None,
                   float(ttl) if ttl is not None else None)

    def skew(self, now: float | None = None) -> str | None:
        """Why this lease's expiry cannot be trusted (it lies further ahead than its TTL allows), or None."""
        now = time.time() if now is None else now
        ttl = self.ttl_s if self.ttl_s is not None else UNRECORDED_TTL_S
        ahead = self.expires - now
        if ahead <= ttl + SKEW_SLACK_S:
            return None
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(min(self.expires, 253402300799)))
        return (f"held by {self.holder}, expires {when}, {_duration(ahead)} from now, further ahead than its "
                f"TTL ({ttl:g} s{'' if self.ttl_s is not None else ', assumed'}) allows: the clock of "
                f"{self.host or 'its host'} is wrong, or the lease was written by hand; treated as stale "
                "(a build takes it over)")

    def holder_dead(self) -> bool:
        """The holder was a process on this host that is gone: its lease need not be waited out."""
        return self.host == socket.gethostname() and self.pid is not None and process_gone(self.pid, self.started)

    def live(self) -> bool:
        """Held: unexpired, its expiry believable (not skewed), its holder not known dead."""
        now = time.time()
        return self.expires > now and self.skew(now) is None and not self.holder_dead()


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


class Lease:
    """One batch's lease file. ``acquire`` returns False while another live holder has it."""

    def __init__(self, ledger: Ledger, batch: str, ttl_s: float, owner: str | None = None) -> None:
        self.ledger, self.batch, self.ttl_s, self.owner = ledger, check_id(batch), ttl_s, owner
        self.holder = f"{owner}|{new_holder()}" if owner else new_holder()
        self.path = join(ledger.root, LEASES, f"{batch}.json")

    def read(self) -> LeaseState | None:
        try:
            return LeaseState.parse(self.ledger.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # a torn or foreign file: treat as expired, it gets rewritten
            return None

    def _write(self) -> None:
        body = {"holder": self.holder, "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s, "batch": self.batch,
                "host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid())}
        write_bytes(self.ledger.fs, self.path, json.dumps(body).encode(), durable=False)

    def _ours(self, state: LeaseState) -> bool:
        """This attempt's lease, or one of the same owner's (a build re-running its own crashed batch)."""
        return state.holder == self.holder or bool(self.owner) and state.holder.startswith(f"{self.owner}|")

    def acquire(self, settle_s: float = 0.2) -> bool:
        """Take the lease unless a live other holder has it; after writing, wait ``settle_s`` and read it
        back, so of two builds taking it at once, the one whose write landed last keeps it."""
        state = self.read()
        if state is not None and not self._ours(state) and state.live():
            return False
        if state is not None and (why := state.skew()) is not None:
            log.warning("lease of batch %s: %s", self.batch, why)
        self._write()
        time.sleep(settle_s)
        state = self.read()
        return state is not None and state.holder == self.holder

    def renew(self) -> None:
        self._write()

    def release(self) -> None:
        state = self.read()
        if state is not None and state.holder == self.holder:
            with contextlib.suppress(FileNotFoundError):
                self.ledger.fs.rm_file(self.path)

    def held_by_other(self) -> bool:
        state = self.read()
        return state is not None and state.holder != self.holder and state.live()


@contextlib.contextmanager
def hold(ledger: Ledger, batch: str, ttl_s: float, owner: str | None = None) -> Iterator[Lease | None]:
    """Hold ``batch``'s lease for the block, renewed every ttl/3 s; yields None if another holder has it.
    ``owner`` (a build's run id) lets a build take over the lease of its own earlier, crashed attempt."""
    lease = Lease(ledger, batch, ttl_s, owner)
    if not lease.acquire():
        yield None
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                lease.renew()
            except Exception as exc:  # a blip: the next renewal may work; expiry is ttl away
                log.warning("lease %s: renewal failed: %s", batch, exc)

    thread = threading.Thread(target=renew, name=f"lease-{batch}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):  # an expired lease is as good as a released one
            lease.release()
