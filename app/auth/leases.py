"""Reservation leases: the tokens a server process holds reserved die with the process.

`api_keys.reserved_tokens` is what running requests hold (prompt + max_tokens), so that
concurrent requests cannot overrun a token quota. A process that dies mid-request never
settles its requests. So each process holds its reservations under a lease of its own, one
`reservations` row per (lease, key) summing what it holds for that key, and renews the lease
while it lives. A lease that expired (its process died, or stalled for longer than the lease)
is freed by whichever process sees it first, at its start or on a renewal: its rows are
deleted and their tokens subtracted from the keys, which touches no other process's share.

Every change is a delta inside one transaction, taking locks in one order (leases, then
reservations, then api_keys), so two processes freeing the same lease, or a request settling
while its lease is freed, neither count twice nor deadlock, on SQLite and Postgres alike.
Lease times come from each process's clock: replicas' clocks must agree to well within the
lease's length (`LEASE_SECONDS`, renewed every quarter of it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, case, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from app.auth.keys import now
from app.auth.models import ApiKey, Lease, Reservation

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0  # a process silent this long is taken for dead
RENEW_EVERY = 0.25  # of the lease: three renewals may fail before the lease runs out

_RELEASE = (
    update(Reservation)
    .where(Reservation.lease_id == bindparam("lease"), Reservation.key_id == bindparam("key"))
    .values(tokens=Reservation.tokens - bindparam("amount")))
_UNRESERVE = (  # never below 0: reservations made before leases existed were reset to 0
    update(ApiKey).where(ApiKey.id == bindparam("key_id"))
    .values(reserved_tokens=case(
        (ApiKey.reserved_tokens > bindparam("tokens"),
         ApiKey.reserved_tokens - bindparam("tokens")), else_=0))
    .execution_options(synchronize_session=False))
_RENEW = update(Lease).where(Lease.id == bindparam("lease")).values(
    expires_at=bindparam("until"))


def _hold_statement(dialect: str) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE adding to the (lease, key) row (both dialects)."""
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = dialect_insert(Reservation)
    return statement.on_conflict_do_update(
        index_elements=["lease_id", "key_id"],
        set_={"tokens": Reservation.tokens + statement.excluded.tokens})


def release(connection: Connection, lease: str, key_id: int, tokens: int) -> int:
    """Take `tokens` off (lease, key); the tokens to take off the key too: 0 when the lease
    was freed meanwhile (its tokens were given back with it)."""
    result = connection.execute(_RELEASE, {"lease": lease, "key": key_id, "amount": tokens})
    return tokens if result.rowcount == 1 else 0


class LeaseKeeper:
    """This process's lease (`id`), renewed by a thread once `open`, and the freeing of
    leases that expired."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.id = uuid.uuid4().hex  # until `open`: a lease without a row, i.e. not kept
        self.seconds = LEASE_SECONDS
        self.hold_statement = _hold_statement(engine.dialect.name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, connection: Connection, key_id: int, tokens: int) -> str:
        """Add `tokens` to this lease's row for the key (in the caller's transaction, before
        it updates api_keys: the lock order); the lease they are held under."""
        lease = self.id
        connection.execute(self.hold_statement, {"lease_id": lease, "key_id": key_id,
                                                 "tokens": tokens})
        return lease

    def open(self, seconds: float = LEASE_SECONDS) -> int:
        """Start this process's lease, free the leases that expired and keep renewing (a
        daemon thread); the tokens given back."""
        self.seconds = seconds
        self._start_new()
        freed = self.reconcile()
        self._thread = threading.Thread(target=self._keep, name="llm-api-lease", daemon=True)
        self._thread.start()
        return freed

    def close(self) -> None:
        """Stop renewing and give back what this process still holds (nothing after a
        graceful stop; a request cut short by the shutdown never settles)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self.free(self.id, None)
        except Exception as exc:  # noqa: BLE001 - the lease then expires and is freed later
            log.warning("could not release this process's reservations at shutdown (%s); "
                        "they are freed when its lease expires", type(exc).__name__)

    def renew(self) -> None:
        """Push the lease's expiry on; start a new lease if this one was taken for dead."""
        with self.engine.begin() as connection:
            result = connection.execute(_RENEW, {"lease": self.id, "until": self._expiry()})
        if result.rowcount == 0:
            log.warning("this process's reservation lease was freed by another process (it "
                        "was not renewed for %.0f s); continuing under a new lease",
                        self.seconds)
            self._start_new()

    def reconcile(self) -> int:
        """Free the leases that expired, and reservations under a lease that no longer
        exists; the tokens given back."""
        moment = now()
        with self.engine.connect() as connection:
            expired = connection.scalars(select(Lease.id).where(Lease.expires_at < moment))
            orphans = connection.scalars(select(Reservation.lease_id).distinct().where(
                Reservation.lease_id.not_in(select(Lease.id))))
            dead = set(expired) | set(orphans)
        freed = sum(self.free(lease, moment) for lease in dead)
        if freed:
            log.warning("gave back %d tokens reserved by %d server process(es) that stopped "
                        "without settling their requests", freed, len(dead))
        return freed

    def free(self, lease: str, expired_before: datetime | None) -> int:
        """Delete `lease` (if it expired before `expired_before`; None: whatever its expiry)
        and give its reservations back to their keys; the tokens given back."""
        with self.engine.begin() as connection:
            drop = delete(Lease).where(Lease.id == lease)
            if expired_before is not None:
                drop = drop.where(Lease.expires_at < expired_before)
            connection.execute(drop)
            if connection.scalar(select(Lease.id).where(Lease.id == lease)) is not None:
                return 0  # renewed meanwhile: its process lives
            rows = connection.execute(delete(Reservation).where(Reservation.lease_id == lease)
                                      .returning(Reservation.key_id, Reservation.tokens)).all()
            for key_id, tokens in rows:
                if tokens:
                    connection.execute(_UNRESERVE, {"key_id": key_id, "tokens": tokens})
        return sum(tokens for _, tokens in rows)

    def _expiry(self) -> datetime:
        return now() + timedelta(seconds=self.seconds)

    def _start_new(self) -> None:
        lease, moment = uuid.uuid4().hex, now()
        with self.engine.begin() as connection:
            connection.execute(insert(Lease), {
                "id": lease, "owner": f"{socket.gethostname()}:{os.getpid()}"[:200],
                "started_at": moment, "expires_at": self._expiry()})
        self.id = lease

    def _keep(self) -> None:
        while not self._stop.wait(self.seconds * RENEW_EVERY):
            try:
                self.renew()
                self.reconcile()
            except Exception as exc:  # noqa: BLE001 - e.g. the database is down: next turn
                log.warning("could not renew the reservation lease: %s", type(exc).__name__)
