"""``cloudio.session``: the consistency level in force, and counters of what cloudio did.

Consistency levels
------------------
``"session"`` (default)
    Read-your-writes for every write made through cloudio in this process
    (and, with :mod:`cloudio.dask`, on its cluster). No extra request when
    nothing was written.
``"strong"``
    Also sees writes made elsewhere: one metadata request per open compares
    the object's generation with the one the cache saw; fsspec listings and
    Zarr metadata come from the server (docs/consistency.md).
a number of seconds
    Bounded staleness: cached state older than that is revalidated. ``inf``
    is the ``"session"`` level; NaN and negative numbers are refused.

The level comes from the innermost session of the current context; in a
thread that entered none (a Dask or thread-pool worker), from the session
entered most recently in the process. Counters are added to every session
open at the time, so work done in worker threads is counted too.
"""

from __future__ import annotations

import contextvars
import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from cloudio import _config, _state
from cloudio._journal import journal
from cloudio._paths import normalize
from cloudio.errors import ConfigurationError

log = logging.getLogger(__name__)

Consistency = Literal["session", "strong"] | float | int


@dataclass
class Stats:
    """What cloudio did while a session was open (``session.stats``); ``as_dict()`` for logging.

    Attributes
    ----------
    opens
        Datasets opened for reading through :func:`cloudio.open`.
    uploads, bytes_uploaded
        Objects uploaded through cloudio, and their bytes.
    revalidations
        Metadata requests made by the ``"strong"`` and bounded-staleness levels.
    invalidations
        A :class:`collections.Counter` per cache: ``"gdal"``, ``"fsspec"``, ``"zarr"``.
    """

    uploads: int = 0
    bytes_uploaded: int = 0
    revalidations: int = 0  #: metadata requests made by the strong / bounded levels
    invalidations: Counter[str] = field(default_factory=Counter)  #: per cache: "gdal", "fsspec", "zarr"
    _opens: int = field(default=0, repr=False)
    _opens_from: int | None = field(default=None, repr=False)  #: the count when counting began; None once frozen

    @property
    def opens(self) -> int:
        """Datasets opened for reading through :func:`cloudio.open`.

        Read under the sessions' lock, which entering and leaving hold: read from another thread (a monitor
        logging ``as_dict()``) while the session was left, it met ``_opens_from`` None between its test and its
        use (TypeError), or counted the opens twice.
        """
        with _state.sessions_lock:
            return self._opens_now()

    def _opens_now(self) -> int:
        """:attr:`opens`, for a caller holding ``_state.sessions_lock``."""
        if self._opens_from is None:
            return self._opens
        return self._opens + _state.opens_total() - self._opens_from

    def _start(self) -> None:
        """Counting begins (the caller holds ``_state.sessions_lock``)."""
        self._opens_from = _state.opens_total()

    def _freeze(self) -> None:
        """Counting ends (the caller holds ``_state.sessions_lock``)."""
        self._opens, self._opens_from = self._opens_now(), None

    def as_dict(self) -> dict[str, object]:
        return {
            "opens": self.opens,
            "uploads": self.uploads,
            "bytes_uploaded": self.bytes_uploaded,
            "revalidations": self.revalidations,
            "invalidations": dict(self.invalidations),
        }


def _check_level(consistency: object) -> Consistency:
    """The level ``consistency`` names; ``inf`` seconds never revalidates, so it is ``"session"``.

    Anything else is a :class:`ConfigurationError`: compared with ``in``, an array raised NumPy's ValueError, and
    an integer past a float's range raised OverflowError from ``math.isnan``.
    """
    if isinstance(consistency, str) and consistency in ("session", "strong"):
        return consistency  # type: ignore[return-value]
    if isinstance(consistency, numbers.Real) and not isinstance(consistency, bool):
        try:
            seconds = float(consistency)
        except OverflowError:  # an int or Fraction past a float's range: as many seconds as infinity
            seconds = math.inf if consistency > 0 else -math.inf  # type: ignore[operator]
        if math.isnan(seconds) or consistency < 0:  # type: ignore[operator]
            raise ConfigurationError(
                f"consistency={consistency!r}: a staleness bound must be a number of seconds >= 0 "
                "(or 'session', 'strong')"
            )
        if math.isinf(seconds):
            return "session"
        if isinstance(consistency, int | float) and type(consistency) in (int, float):
            return consistency
        return seconds  # numpy scalars and other reals: a plain float, as from the environment
    raise ConfigurationError(
        f"consistency={consistency!r} is not a level; use 'session', 'strong' or a number of seconds >= 0"
    )


#: the session blocks entered and not yet left in this context (a thread, an asyncio task), innermost last,
#: each with the token that puts back the session in force before it
_entered: contextvars.ContextVar[tuple[tuple[session, contextvars.Token[session | None]], ...]] = (
    contextvars.ContextVar("cloudio_sessions_entered", default=()))


class session:
    """Set the consistency level for the block and count what cloudio does in it.

    Parameters
    ----------
    consistency
        ``"session"`` (default), ``"strong"``, or a staleness bound in seconds.
        ``CLOUDIO_CONSISTENCY`` gives the default when no session is open.

    Examples
    --------
    >>> with cloudio.session("strong") as s:           # doctest: +SKIP
    ...     with cloudio.open("gs://b/a.tif") as ds:
    ...         ds.read()
    >>> s.stats.revalidations                           # doctest: +SKIP
    1
    """

    def __init__(self, consistency: Consistency = "session") -> None:
        self.consistency: Consistency = _check_level(consistency)
        self.stats = Stats()

    def __enter__(self) -> session:
        # one token per block entered and not yet left, in this context (a thread, an asyncio task): the same
        # object may be entered again inside its block, and in several threads or tasks at once
        token = _state.current_session.set(self)
        _entered.set((*_entered.get(), (self, token)))
        with _state.sessions_lock:
            if self not in _state.open_sessions:
                self.stats._start()
            _state.open_sessions.append(self)
            _state.open_blocks.append(token)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        entered = _entered.get()
        mine = [i for i, (s, _) in enumerate(entered) if s is self]
        block = entered[mine[-1]][1] if mine else None
        with _state.sessions_lock:
            # this block's own entry (the last of the object's when left in another context): worker threads take
            # the level of the newest entry, and taking off the object's first one, an outer block's, left this
            # block's level in force for them after it was left
            at = [i for i, (s, b) in enumerate(zip(_state.open_sessions, _state.open_blocks, strict=False))
                  if s is self and (block is None or b is block)]
            if at:
                del _state.open_sessions[at[-1]], _state.open_blocks[at[-1]]
                if self not in _state.open_sessions:  # its outermost block
                    self.stats._freeze()
        if mine:
            token = entered[mine[-1]][1]
            _entered.set(entered[:mine[-1]] + entered[mine[-1] + 1:])
            try:
                _state.current_session.reset(token)
            except ValueError:  # exited in another context than entered (or after cloudio._state.reset())
                _state.current_session.set(None)

    def __repr__(self) -> str:
        return f"cloudio.session(consistency={self.consistency!r}, stats={self.stats.as_dict()})"


#: counters over the whole process life, whatever session was open
process_stats = Stats(_opens_from=0)
#: the level :func:`reading_the_server` puts in force (never entered, so never registered)
_STRONG = session("strong")


def current_level() -> Consistency:
    """:func:`current_consistency` for the open fast path: no environment lookup when none can matter.

    The lookup of an unset variable costs a KeyError inside ``os.environ``,
    about 1 us, a fifth of cloudio's whole per-open budget.
    """
    s = _state.current_session.get()
    if s is not None:
        return s.consistency
    if not _state.open_sessions and _config.env_raw(b"CLOUDIO_CONSISTENCY") is None:
        return "session"
    return current_consistency()


def current_consistency() -> Consistency:
    """The level in force here (see the module docstring)."""
    s = _state.current_session.get()
    if s is not None:
        return s.consistency
    with _state.sessions_lock:
        if _state.open_sessions:
            return _state.open_sessions[-1].consistency
    raw = _config.env(_config.CONSISTENCY_ENV)
    if raw is not None:
        try:
            value: object = float(raw)
        except ValueError:
            value = raw
        try:
            return _check_level(value)
        except ConfigurationError as e:
            raise ConfigurationError(f"{_config.CONSISTENCY_ENV}={raw!r}: {e}") from None
    return "session"


@contextmanager
def reading_the_server() -> Iterator[None]:
    """The ``"strong"`` level in this context (and the tasks it starts), whatever the user chose.

    For cloudio's own read-modify-writes (a guarded consolidation): what they
    read must be the server's state, not a listing this process cached. Only
    the context is changed, no session is registered: other threads keep
    their level, and counters still go to the user's sessions.
    """
    token = _state.current_session.set(_STRONG)
    try:
        yield
    finally:
        _state.current_session.reset(token)


def count(name: str, n: int = 1, *, cache: str | None = None) -> None:
    """Add ``n`` to counter ``name`` (or to ``invalidations[cache]``) of every open session."""
    if name == "opens":
        for _ in range(n):
            next(_state.opens)
        return
    with _state.sessions_lock:
        if name == "invalidations":
            key = cache or "?"
            process_stats.invalidations[key] += n
            for s in dict.fromkeys(_state.open_sessions):  # once each, however often entered
                s.stats.invalidations[key] += n
        else:
            setattr(process_stats, name, getattr(process_stats, name) + n)
            for s in dict.fromkeys(_state.open_sessions):
                setattr(s.stats, name, getattr(s.stats, name) + n)


def invalidate(url_or_prefix: str | os.PathLike[str]) -> None:
    """Tell cloudio that someone else wrote at ``url_or_prefix`` (object or prefix).

    Every cache cloudio manages forgets what it holds for that object and
    everything below it; the next read fetches afresh.

    Raises
    ------
    InvalidURLError
        When ``url_or_prefix`` is not a GCS URL or local path.
    """
    key = normalize(url_or_prefix)
    journal().record(key, "invalidate", prefix=True)
