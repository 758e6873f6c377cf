"""Failures of the stores themselves, as opposed to answers from them.

``STORE_UNAVAILABLE`` lists the exceptions that mean a database or Redis cannot be reached (down,
restarting, pool exhausted, timed out). Callers fail closed on them: the API answers 503 with
``Retry-After`` and charges nothing; a settlement that meets one leaves its reservation standing.

The database limits (``store.db.DatabaseTimeouts``) all land here: PostgreSQL's ``QueryCanceled``
(statement timeout), ``LockNotAvailable`` (lock timeout), psycopg's ``ConnectionTimeout`` and the
``OperationalError`` of a round trip given up on are psycopg operational errors, which SQLAlchemy
raises as its own ``OperationalError``; a pool with no free connection in time raises ``TimeoutError``.
"""

from __future__ import annotations

from redis import exceptions as redis_exc
from sqlalchemy import exc as sa_exc

STORE_UNAVAILABLE: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    redis_exc.BusyLoadingError,
)
