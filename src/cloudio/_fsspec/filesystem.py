"""The fsspec face's writers: tracked filesystems whose writes are journaled and verified.

:func:`filesystem` hands out a *tracked* filesystem, a subclass of gcsfs's
``GCSFileSystem`` (or of fsspec's ``LocalFileSystem`` for local paths) whose
writes are recorded in the write journal once they have succeeded. The
override points are the async primitives every public write method of gcsfs
ends in (``pipe``/``put``/``cp``/``mv``/``rm`` run through ``_pipe_file``,
``_put_file``, ``_cp_file``, ``_mv_file``, ``_rm_file``, ``_rm_files``), plus
the final chunk of a ``GCSFile`` opened for writing. Listings every
instance keeps fresh are :mod:`cloudio._fsspec.consumer`'s business.

The tracked filesystem also verifies bytes and names its failures: every
upload (``pipe``, ``put``, ``open("wb")``) is compared with the CRC32C and
size the server stored (a mismatch deletes the object, journals the delete
and raises :class:`~cloudio.IntegrityError`); a whole-object ``cat`` is
checked against the ``x-goog-hash`` CRC32C the server sends. Network trouble
that outlasts gcsfs's retries, or the time limit (``CLOUDIO_HTTP_TIMEOUT``,
see :mod:`cloudio._gcs.client`), raises :class:`~cloudio.TransientError`;
a refusal (403, 400, 409...) :class:`~cloudio.UploadError` or
:class:`~cloudio.ReadError`; a missing object :class:`~cloudio.ObjectNotFoundError`
naming its ``gs://`` URL (a ``FileNotFoundError``, as fsspec's contract says).
A whole-object ``get`` is checked against the object's CRC32C too. A file
opened for reading reads the generation it opened: overwritten while open,
it raises :class:`~cloudio.StaleDatasetError`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import io
import json
import logging
import mimetypes
import os
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import fsspec
from fsspec.asyn import sync, sync_wrapper
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from cloudio._config import (
    emulator_endpoint,
    gcsfs_options,
    prepare_gcsfs_import,
    require_credentials,
)
from cloudio._fsspec.consumer import guard_listings, track
from cloudio._gcs import checksums
from cloudio._gcs.client import (
    Arrivals,
    bounded_while_arriving,
    bucket_missing,
    gcsfs_call_limit,
    http_options,
    is_http_error,
    is_refusal,
    is_transient,
    read_refused,
    transient_error,
    while_arriving,
)
from cloudio._gcs.transfer import (
    _check_stored,
    _Mismatch,
    _outcome_unknown,
    checked_guard,
    last_writer_wins,
    put_verified,
    source_size,
)
from cloudio._journal import Kind, journal
from cloudio._paths import check_key, is_gcs, normalize, parse_gcs
from cloudio._session import count, current_level
from cloudio._threads import resolving_at_exit, sync_to_the_end
from cloudio.errors import (
    AlreadyExistsError,
    CloudioError,
    ConflictError,
    IntegrityError,
    InvalidURLError,
    ObjectNotFoundError,
    ReadError,
    StaleDatasetError,
    TransientError,
    UploadError,
)

__all__ = ["TrackedLocalFileSystem", "filesystem"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# recording writes
# --------------------------------------------------------------------------------------------

#: URLs recorded inside the current compound operation (mv), to know what its parts covered
_recorded: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("cloudio_fsspec_recorded", default=None)
#: the object a write is about, for errors of requests whose URL does not name it (multipart uploads)
_writing: contextvars.ContextVar[str | None] = contextvars.ContextVar("cloudio_fsspec_writing", default=None)
#: inside a write through gcsfs's own upload: the object resource its last upload request was answered with
#: (gcsfs returns it for a small pipe only), so the check pins the generation this write stored
_answered: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar("cloudio_fsspec_answered",
                                                                                         default=None)
#: one entry per try of the last request sent inside a delete or an upload (gcsfs retries inside its ``_request``;
#: :meth:`_call` empties it as each request starts)
_attempts: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("cloudio_fsspec_attempts", default=None)
#: inside a plain pipe: the generation each of its upload requests needs (``ifGenerationMatch``), see
#: :meth:`GCSFileSystem._pipe_file`
_replacing: contextvars.ContextVar[int | None] = contextvars.ContextVar("cloudio_fsspec_replacing", default=None)
#: inside a merge: the ``gs://`` URLs of the target and of the sources its compose request reads (see
#: :meth:`_JournalingGCSMixin._request`)
_composing: contextvars.ContextVar[tuple[str, list[str]] | None] = contextvars.ContextVar("cloudio_fsspec_composing",
                                                                                          default=None)


#: inside a tracked filesystem's :meth:`~_JournalingGCSMixin._call`: the answers its requests got so far
_receiving: contextvars.ContextVar[_Received | None] = contextvars.ContextVar("cloudio_fsspec_receiving",
                                                                             default=None)

#: inside a put through gcsfs's own upload: the local file it reads, and the sum of what it read of it (see
#: :meth:`_JournalingGCSMixin._put_file_gcsfs`)
_reading: contextvars.ContextVar[_ReadSum | None] = contextvars.ContextVar("cloudio_fsspec_reading", default=None)


class _Received:
    """The successful answers (2xx) one call's requests got so far, each body's bytes counted by aiohttp as they
    arrive, and the bytes its requests sent: how :meth:`_JournalingGCSMixin._call` tells a long answer still
    arriving, or a long upload still going out, from a server gone silent (or no longer reading)."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []  # aiohttp's StreamReader of each answer
        self.sent = 0  # the most bytes of its body one try of the request handed to the connection (_piece_sent)

    def progress(self) -> int:
        """Grows with every answer, every byte of its body that arrived, and every piece of a body sent."""
        return self.sent + len(self.bodies) + sum(int(body.total_bytes) for body in self.bodies)


async def _answer_heard(session: Any, context: Any, params: Any) -> None:
    """aiohttp's ``on_request_end`` (an answer's head arrived), in the task that sent the request: a successful
    answer to a request of a tracked call is watched for its body's bytes (:class:`_Received`)."""
    received = _receiving.get()
    response = params.response
    if received is not None and response.status < 300:
        received.bodies.append(response.content)


async def _piece_sent(session: Any, context: Any, params: Any) -> None:
    """aiohttp's ``on_request_chunk_sent`` (a piece of a request body is handed to the connection, the pieces
    before it taken by the kernel), in a task of the request: the call's progress (:class:`_Received`) once this
    try (``context``: one per try) has sent more than any try before it. Why not every piece: gcsfs sends the
    body again with each retry of a request never answered, which would put off giving it up for good."""
    received = _receiving.get()
    if received is not None:
        context.cloudio_sent = getattr(context, "cloudio_sent", 0) + len(params.chunk)
        received.sent = max(received.sent, context.cloudio_sent)


@functools.cache
def _answers_traced() -> Any:
    """The aiohttp trace that tells :func:`_answer_heard` of every answer and :func:`_piece_sent` of every piece
    of a body sent (one for every session)."""
    import aiohttp

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(_answer_heard)
    trace.on_request_chunk_sent.append(_piece_sent)
    trace.freeze()
    return trace


#: the pieces an upload's body goes out in (aiohttp's write buffer limit: past it, it waits for the kernel)
_PIECE = 64 << 10


@functools.cache
def _pieces_payload() -> type:
    """aiohttp's payload of bytes, handed to the connection a piece at a time (see :func:`_in_pieces`)."""
    from aiohttp.abc import AbstractStreamWriter
    from aiohttp.payload import BytesPayload

    class Pieces(BytesPayload):
        async def write(self, writer: AbstractStreamWriter) -> None:
            await self.write_with_length(writer, None)

        async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
            view = memoryview(self._value).cast("B")
            if content_length is not None:
                view = view[:content_length]
            for start in range(0, len(view), _PIECE):  # each write waits until the kernel took enough before
                await writer.write(view[start:start + _PIECE])

    return Pieces


def _in_pieces(data: Any) -> Any:
    """An upload's body (gcsfs sends bytes) as a payload aiohttp sends a piece at a time, each handed on once the
    kernel took the ones before (:func:`_piece_sent` hears each): the bytes of a long upload count as progress
    while they go out. aiohttp hands raw bytes to the connection whole, heard once, and then waits for them all."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        if view.nbytes > _PIECE and view.c_contiguous:
            return _pieces_payload()(data)
    return data


def _record(url: str, kind: Kind, *, generation: Any = None, size: Any = None, prefix: bool = False) -> None:
    journal().record(url, kind, generation=_int_or_none(generation), size=_int_or_none(size), prefix=prefix)
    acc = _recorded.get()
    if acc is not None:
        acc.append(url)


def _uploaded(url: str, generation: Any, size: int) -> None:
    """An upload through gcsfs's own paths, verified: journaled, and counted in the sessions' stats (as
    :func:`~cloudio._gcs.transfer.put_verified` counts its own)."""
    _record(url, "write", generation=generation, size=size)
    count("uploads")
    count("bytes_uploaded", size)


@contextmanager
def _collect() -> Iterator[list[str]]:
    """Collect the URLs recorded inside the block (and pass them on to an outer collector)."""
    outer = _recorded.get()
    acc: list[str] = []
    token = _recorded.set(acc)
    try:
        yield acc
    finally:
        _recorded.reset(token)
        if outer is not None:
            outer.extend(acc)


@contextmanager
def _unsure(*urls: str, prefix: bool = False) -> Iterator[None]:
    """Journal an ``"invalidate"`` of ``urls`` (as prefixes: a bucket) when the block fails in a way that
    may have changed them (an answer lost, a cancel): the journal must not say less than the server may hold."""
    try:
        yield
    except BaseException as e:
        if _outcome_unknown(e) or not isinstance(e, Exception):
            for url in urls:
                _record(url, "invalidate", prefix=prefix)
        raise


@contextmanager
def _named_missing(url: str) -> Iterator[None]:
    """gcsfs's (or fsspec's) ``FileNotFoundError``, which names an HTTP path or a bare key, as
    :class:`~cloudio.ObjectNotFoundError` naming ``url`` (still a ``FileNotFoundError``). The one text of a
    missing object on the fsspec face: a revalidated ``info`` (:mod:`cloudio._fsspec.consumer`) raises it too."""
    try:
        yield
    except FileNotFoundError as e:
        if isinstance(e, CloudioError):
            raise
        raise ObjectNotFoundError(f"{url}: no such object. Check the URL; cloudio.filesystem().ls lists what its "
                                  "folder holds.") from e


def _refused(url: str, method: str, exc: Exception) -> CloudioError:
    """THE error for a request the server refused (403, 400, 409...): ReadError for a read, else UploadError."""
    if method.upper() in ("GET", "HEAD"):
        return read_refused(url, exc)
    # a 403 keeps gcsfs's "Forbidden" prefix: its _get_object falls back to a listing on it
    forbidden = "Forbidden: " if str(exc).startswith("Forbidden") else ""
    return UploadError(f"{forbidden}{url}: the server refused the {method} request ({type(exc).__name__}: {exc}); "
                       "the object was not changed. Check that your credentials may write the bucket, then write "
                       "again.")


def _object_resource(out: Any) -> dict[str, Any] | None:
    """The object resource in what gcsfs's ``_call`` returned for an upload request (JSON, or headers and
    body), None for an answer without one (a resumable upload's 308 between chunks)."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], bytes | str) and out[1][:1] in (b"{", "{"):
        try:
            out = json.loads(out[1])
        except ValueError:
            return None
    return out if isinstance(out, dict) and "generation" in out else None


def _as_bytes(data: Any) -> bytes | bytearray | memoryview:
    """What ``pipe`` sends of ``data``: bytes and bytearrays as they are; any other buffer (an ndarray, a
    strided view) as its bytes in C order, what ``arr.tobytes()`` gives, copied only when not contiguous.
    Why: gcsfs adds the value to its multipart head, which an ndarray turns into numpy's addition, and a
    strided memoryview refuses."""
    if isinstance(data, (bytes, bytearray)):
        return data
    view = memoryview(data)
    return view.cast("B") if view.c_contiguous and view.nbytes else view.tobytes()  # (no cast of a 0 in shape)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class _ReadSum:
    """The size and CRC32C of the bytes gcsfs's ``_put_file`` read of the local file ``lpath``, summed as it read
    them: what it sent, whatever the file holds before or after.

    gcsfs opens the file itself (``open(lpath, "rb")`` in ``gcsfs.core``); :func:`_gcsfs_open`, which stands
    for ``open`` there, hands it a :class:`_SummedReads` while this sum is :data:`_reading`. When the reads
    were not all seen, from the file's start on and in order (another gcsfs version reading otherwise, a zonal
    bucket's upload, a failure before the read), :meth:`sent` sums the file as it is now, as was done before.
    """

    def __init__(self, lpath: str, url: str) -> None:
        self.lpath = lpath
        self.url = url
        self.running = checksums.Running()
        self.size = 0  # bytes summed, from the start of the file
        self.whole = False  # closed where the summed bytes end, every read seen

    def opened(self, f: Any) -> _SummedReads:
        self.running, self.size, self.whole = checksums.Running(), 0, False  # (opened again: read again)
        return _SummedReads(f, self)

    def read(self, at: int, data: bytes) -> None:
        if at == self.size and self.size >= 0:
            self.running.update(data)
            self.size += len(data)
        elif data:
            self.size = -1  # not in order from the start: not a sum of what was sent

    def closed(self, at: int) -> None:
        self.whole = self.size >= 0 and at == self.size

    def sent(self) -> tuple[int, str]:
        """The size and CRC32C of what gcsfs read of the file (when not all seen: of the file now)."""
        if self.whole:
            return self.size, self.running.text()
        return source_size(self.lpath, self.url), checksums.of_file(self.lpath)


class _SummedReads:
    """The local file gcsfs uploads, each ``read`` summed into a :class:`_ReadSum`; the rest is the file's."""

    def __init__(self, f: Any, summed: _ReadSum) -> None:
        self._f = f
        self._summed = summed

    def read(self, size: int | None = -1) -> bytes:
        at = self._f.tell()
        data: bytes = self._f.read(size)
        self._summed.read(at, data)
        return data

    def close(self) -> None:
        if not self._f.closed:
            self._summed.closed(self._f.tell())
        self._f.close()

    def __enter__(self) -> _SummedReads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _gcsfs_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    """``open`` for ``gcsfs.core``: the builtin, except for the file a tracked put has gcsfs read
    (:data:`_reading`), whose reads are summed (:class:`_ReadSum`)."""
    f = open(file, mode, *args, **kwargs)  # noqa: SIM115  # gcsfs closes it (its ``with``)
    summed = _reading.get()
    if summed is None or mode != "rb" or file != summed.lpath:
        return f
    return summed.opened(f)


def _sum_gcsfs_reads() -> None:
    """Make :func:`_gcsfs_open` the ``open`` of ``gcsfs.core`` (its module's name shadows the builtin)."""
    import gcsfs.core

    if getattr(gcsfs.core, "open", None) is not _gcsfs_open:
        gcsfs.core.open = _gcsfs_open


class _Crc32cChecker(checksums.Running):
    """gcsfs's consistency-checker interface, fed every byte a ``GCSFile`` uploads.

    gcsfs's own ``"crc32c"`` checker needs crcmod; this one uses :mod:`cloudio._gcs.checksums`
    and only keeps the object resource the final response carried, so the
    comparison (and the delete of a corrupt object) happens in one place,
    :meth:`_JournalingGCSMixin._verify_stored`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.meta: dict[str, Any] | None = None

    def validate_json_response(self, gcs_object: dict[str, Any]) -> None:
        self.meta = gcs_object

    def validate_headers(self, headers: Any) -> None:
        pass

    def validate_http_response(self, r: Any) -> None:
        pass


_OBJECT_IN_URL = re.compile(r"/b/([^/?]+)(?:/o/([^?]+?)(?:/compose)?(?:\?|$)|/o\?(?:.*&)?name=([^&]+))?")


def _request_url(fs: Any, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The ``gs://`` URL a gcsfs request is about (its HTTP URL when none can be told); a listing's is its
    prefix (a keyword of gcsfs's ``_call``, not in the path); a compose request's, the object it makes."""
    http = fs._format_path(path, args)
    m = _OBJECT_IN_URL.search(http)
    if m is None:
        return str(http.split("?", 1)[0])
    key = m.group(2) or m.group(3) or (kwargs.get("prefix") if http.rstrip("/").endswith("/o") else None) or ""
    return f"gs://{unquote(m.group(1))}/{unquote(key)}"


class _KeptAnswers:
    """A write-mode file's filesystem while it sends its last chunk: every request passes through, and the
    object resource the last upload request was answered with is kept.

    Why: gcsfs reads the answer to an empty last chunk (``touch``, a file whose size is a multiple of the
    block size) only when it carries a ``Range`` header, which GCS's final answer does not: without it the
    check would know no generation, and read (and delete) whatever object is there then, another writer's.
    """

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self.resource: dict[str, Any] | None = None

    def call(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        out = self.fs.call(method, path, *args, **kwargs)
        if method in ("POST", "PUT"):
            self.resource = _object_resource(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)


class _ViewsOfACopy(io.BytesIO):
    """A write-mode file's buffer whose ``getbuffer()`` views a bytes copy, never the BytesIO itself.

    gcsfs's ``_upload_chunk`` sends memoryviews of the buffer. When a request failed, its frames kept them, in
    aiohttp's response/exception reference cycles and in the error the user holds: the buffer stayed exported,
    and when the garbage collector freed such a cycle it could free the BytesIO before its views, which crashed
    Python 3.12 (a segmentation fault in whichever thread collected next). A view of an immutable copy is freed
    in any order.
    """

    @classmethod
    def of(cls, buffer: io.BytesIO) -> _ViewsOfACopy:
        out = cls(buffer.getvalue())
        out.seek(buffer.tell())
        return out

    def getbuffer(self) -> memoryview:
        return memoryview(self.getvalue())


class _JournalingGCSFileMixin:
    """Mixed into gcsfs's file class for write modes: journal once the upload is final.

    gcsfs finishes every write-mode file (``close``, a transaction's ``commit``,
    even a close deferred to its background thread) in ``_upload_chunk(final=True)``,
    so that is where a completed object is recorded. An exception inside a
    ``with fs.open(url, "wb")`` block uploads nothing (fsspec would commit the
    partial bytes): cloudio never leaves a partial object behind.
    """

    @property
    def buffer(self) -> io.BytesIO | None:
        return self._cloudio_buffer

    @buffer.setter
    def buffer(self, value: io.BytesIO | None) -> None:
        """Every buffer fsspec and gcsfs assign is held as a :class:`_ViewsOfACopy`."""
        if value is not None and not isinstance(value, _ViewsOfACopy):
            value = _ViewsOfACopy.of(value)
        self._cloudio_buffer = value

    def _upload_chunk(self, final: bool = False) -> Any:
        if not (final and self.autocommit):  # type: ignore[attr-defined]  # an unfinished upload stores nothing
            return super()._upload_chunk(final=final)  # type: ignore[misc]
        url = _gcs_url(self.fs, self.path)  # type: ignore[attr-defined]
        checker: _Crc32cChecker = self.checker  # type: ignore[attr-defined]
        answers = _KeptAnswers(self.gcsfs)  # type: ignore[has-type]
        with _unsure(url):  # the final chunk's answer lost: the object may be stored
            try:
                self.gcsfs = answers
                done = super()._upload_chunk(final=final)  # type: ignore[misc]
            except FileNotFoundError as e:
                if isinstance(e, CloudioError):
                    raise
                # gcsfs sent the last chunk again after its answer was lost, and found the session ended: the
                # object is stored, or the session expired
                _record(url, "invalidate")
                raise TransientError(
                    f"{url}: the upload's last answer was lost and its session has ended: the object holds what "
                    "was sent, or what it held before. Read it to know, or write it again."
                ) from e
            except Exception as e:
                if _outcome_unknown(e):  # a try of the last chunk given up may still reach the server
                    self._cancel_session(url)
                raise
            except BaseException:  # Ctrl-C: the last chunk's request has ended (see call), its bytes maybe on
                self._cancel_session(url)  # their way: the object is stored now, or never (then journaled)
                raise
            finally:
                self.gcsfs = answers.fs
            if done is False:
                return done
            # the final answer's object resource (gcsfs drops it for an empty last chunk: a touch, a size a
            # multiple of the block size); or the generation gcsfs read from it, so the check reads that
            # object and never a later writer's
            meta = answers.resource or checker.meta or {"generation": self.generation}  # type: ignore[attr-defined]
            try:
                generation = sync(self.fs.loop, self.fs._verify_stored, url,  # type: ignore[attr-defined]
                                  meta, self.offset, checker.text())  # type: ignore[attr-defined]
            except IntegrityError:
                self.closed = True  # type: ignore[attr-defined]  # nothing left to send: no retry from __del__
                raise
            _uploaded(url, generation, self.offset)  # type: ignore[attr-defined]
        return done

    def _cancel_session(self, url: str) -> None:
        """Cancel the upload's resumable session, whose last chunk's outcome is unknown: a try of that chunk
        given up and still on its way then finds the session gone, instead of finishing it over a later
        write. (If a try stored the object, the session is finished, and nothing changes.)"""
        location = self.location  # type: ignore[attr-defined]
        if location is None:
            return
        try:
            self.fs.call("DELETE", location.replace("&ifGenerationMatch=0", ""))  # type: ignore[attr-defined]
        except Exception as e:  # gone or unreachable: the session expires on its own (a week on GCS)
            log.warning("%s: could not cancel the upload's session (%s); a try of its last chunk still on its "
                        "way could finish it later", url, e)

    def _initiate_upload(self) -> Any:
        with self._bucket_named():
            return super()._initiate_upload()  # type: ignore[misc]

    def _simple_upload(self) -> Any:
        with self._bucket_named():
            return super()._simple_upload()  # type: ignore[misc]

    @contextmanager
    def _bucket_named(self) -> Iterator[None]:
        """An upload's start answered 404: the bucket is missing (no object need exist)."""
        try:
            yield
        except FileNotFoundError as e:
            if isinstance(e, CloudioError):
                raise
            raise bucket_missing(parse_gcs(_gcs_url(self.fs, self.path))) from e  # type: ignore[attr-defined]

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and "r" not in self.mode and not self.closed:  # type: ignore[attr-defined]
            try:
                self.discard()  # type: ignore[attr-defined]  # cancels a started resumable upload
            except Exception:
                log.warning("could not cancel the upload of %s", self.path, exc_info=True)  # type: ignore[attr-defined]
            finally:
                self.closed = True  # type: ignore[attr-defined]
                self._cloudio_discarded = True
            return None
        super().__exit__(exc_type, exc, tb)  # type: ignore[misc]  # fsspec's returns None: exceptions propagate
        return None

    def commit(self) -> None:
        """A transaction's commit; nothing for a file whose ``with`` block raised (it was discarded, and the
        transaction's other files still go up)."""
        if getattr(self, "_cloudio_discarded", False):
            return
        super().commit()  # type: ignore[misc]


@functools.cache
def _journaling_file_class(cls: type) -> type:
    """``cls`` with :class:`_JournalingGCSFileMixin` in front (one subclass per file class)."""
    return type(f"Journaling{cls.__name__}", (_JournalingGCSFileMixin, cls), {"__module__": __name__})


class _PinnedGCSFileMixin:
    """Mixed into gcsfs's file class for reading: every range comes from the generation opened.

    gcsfs reads ranges of whatever object is live, so an overwrite while the file is
    open would mix old and new bytes, or cut the read short at the new size. Here a
    range of a generation that is gone raises :class:`~cloudio.StaleDatasetError`,
    whether some of it was read or none: a file opened at the ``"session"`` level on
    a listing another writer has made out of date would otherwise read the new
    object cut at the old size. The change is journaled, so the next open reads the
    new version whole.
    """

    def _pinned(self) -> Any:
        return self.generation or self.details.get("generation")  # type: ignore[attr-defined]

    @contextmanager
    def _at_generation(self) -> Iterator[None]:
        """Around a read of the generation opened: that generation gone raises StaleDatasetError."""
        try:
            yield
        except FileNotFoundError as e:
            url = _gcs_url(self.fs, self.path)  # type: ignore[attr-defined]
            # not a generation the path named: the size and generation opened are out of date everywhere here
            if not self.generation:  # type: ignore[attr-defined]
                _record(url, "invalidate")
            raise StaleDatasetError(
                f"{url} changed on the server after it was opened for reading (generation {self._pinned()} is "
                f"gone: {type(e).__name__}: {e}); reading on would mix two versions. Open it again."
            ) from e

    def _fetch_range(self, start: Any = None, end: Any = None) -> Any:
        from gcsfs.utils import is_empty_range

        generation = self._pinned()
        if generation is not None and not is_empty_range(start, end, self.size):  # type: ignore[attr-defined]
            with self._at_generation():
                return self.fs.cat_file(  # type: ignore[attr-defined]
                    self.path, start=start, end=end, generation=generation,  # type: ignore[attr-defined]
                    concurrency=self.concurrency,  # type: ignore[attr-defined]
                    cache_type=self.cache_type, cache_source=self.cache_source)  # type: ignore[attr-defined]
        return super()._fetch_range(start, end)  # type: ignore[misc]

    async def _async_fetch_range(self, start_offset: int, total_size: int, split_factor: int = 1) -> Any:
        generation = self._pinned()
        if generation is not None:
            with self._at_generation():
                return await self.fs._cat_file_concurrent(  # type: ignore[attr-defined]
                    self.path, start=start_offset, end=start_offset + total_size,  # type: ignore[attr-defined]
                    concurrency=split_factor, generation=generation,
                    cache_type=self.cache_type, cache_source=self.cache_source)  # type: ignore[attr-defined]
        return await super()._async_fetch_range(start_offset, total_size, split_factor)  # type: ignore[misc]


@functools.cache
def _pinned_file_class(cls: type) -> type:
    """``cls`` with :class:`_PinnedGCSFileMixin` in front (one subclass per file class)."""
    return type(f"Pinned{cls.__name__}", (_PinnedGCSFileMixin, cls), {"__module__": __name__})


def _pin_reads(f: Any) -> None:
    """Give the read-mode file ``f`` the pinning mixin, and its cache (built with ``f``'s bound fetchers) too."""
    file_class: type = type(f)  # a plain class, hashable for the cache
    f.__class__ = _pinned_file_class(file_class)
    cache = getattr(f, "cache", None)
    prefetcher = getattr(cache, "_prefetcher", None)
    holders: tuple[Any, ...] = (cache, getattr(cache, "_fallback", None), getattr(prefetcher, "producer", None))
    for holder in holders:
        fetcher: Any = getattr(holder, "fetcher", None)
        if getattr(fetcher, "__self__", None) is f:
            holder.fetcher = getattr(f, fetcher.__name__)


def _gcs_url(fs: Any, path: str) -> str:
    bucket, key, _generation = fs.split_path(path)
    return parse_gcs(f"gs://{bucket}/{key}").url


class _TextWrites:
    """``open(path, "w")`` (text) whose ``with`` block raised writes nothing, as in binary mode ``"wb"``.

    Why: fsspec wraps the binary file in an ``io.TextIOWrapper``, whose exit
    closes (and so commits) the file without telling it about the exception.
    """

    def open(self, path: Any, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "b" in mode or "w" not in mode:  # appends write in place: what was written is kept, as in binary
            return super().open(path, mode, *args, **kwargs)  # type: ignore[misc]
        text = {k: kwargs.pop(k) for k in ("encoding", "errors", "newline") if k in kwargs}
        return _StagedText(super().open(path, mode.replace("t", "") + "b", *args, **kwargs), **text)  # type: ignore[misc]


class _StagedText(io.TextIOWrapper):
    """A text file over a binary one that drops what was written when its ``with`` block raises."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            return super().__exit__(exc_type, exc, tb)
        binary: Any = self.buffer
        binary.__exit__(exc_type, exc, tb)  # the binary file's own: nothing is committed
        return None


class _JournalingGCSMixin(_TextWrites):
    """Mixed in front of a gcsfs filesystem class: every successful write is journaled.

    Each override calls gcsfs first and records only when it returned, so a
    failed write journals nothing, unless its outcome is unknown (an answer
    lost, a cancel): that journals an ``"invalidate"``. Sync methods (``pipe``,
    ``put``, ``rm``...) run these same coroutines through fsspec's ``sync``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        track(self)
        guard_listings(self)

    def _cloudio_url(self, path: str) -> str:
        return _gcs_url(self, path)

    def _cloudio_urls(self, paths: str | list[str]) -> str:
        """The ``gs://`` URL of one path, or those of a list, for a message."""
        return self._cloudio_url(paths) if isinstance(paths, str) else ", ".join(map(self._cloudio_url, paths))

    def split_path(self, path: str) -> tuple[str, str, str | None]:
        """gcsfs's split, refusing keys GDAL would read as another object (``a//b``, ``./``)."""
        bucket, key, generation = super().split_path(path)  # type: ignore[misc]
        check_key(key, path if "://" in path else f"gs://{path}")
        return bucket, key, generation

    async def _set_session(self) -> Any:
        """gcsfs's session, traced so that :meth:`_call` sees the bytes of its answers arrive, and of its
        uploads go out."""
        session = await super()._set_session()  # type: ignore[misc]
        traces = getattr(session, "trace_configs", None)
        if isinstance(traces, list) and _answers_traced() not in traces:
            traces.append(_answers_traced())
        return session

    async def _call(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        """gcsfs's one request primitive, retries included, given up once no byte of an answer has arrived, and
        no byte of an upload went out, for the call limit (:func:`~cloudio._gcs.client.gcsfs_call_limit`),
        however long it takes while bytes keep moving (:func:`~cloudio._gcs.client.while_arriving`, an upload's
        body sent in pieces: :func:`_in_pieces`); transient failures become TransientError,
        refusals UploadError or ReadError (404 and 412 stay FileNotFoundError and FileExistsError: callers rely
        on them)."""
        from gcsfs.retry import HttpError

        resolving_at_exit(asyncio.get_running_loop())  # (fsspec's sync methods come here by fsspec's own sync)

        limit = gcsfs_call_limit(self.requests_timeout)  # type: ignore[attr-defined]
        received = _Received()
        receiving = _receiving.set(received)
        tally = _attempts.get()
        if tally is not None:  # the tries of this request only (gcsfs retries inside)
            tally.clear()
        replacing = _replacing.get()  # gcsfs's simple_upload and initiate_upload name their query as keywords
        if replacing is not None and method == "POST" and kwargs.get("uploadType") in ("multipart", "resumable"):
            kwargs.setdefault("ifGenerationMatch", str(replacing))
        if "data" in kwargs:  # (reusable: each of gcsfs's retries sends it again from its start)
            kwargs["data"] = _in_pieces(kwargs["data"])
        try:
            call = super()._call(method, path, *args, **kwargs)  # type: ignore[misc]
            out = await (call if limit is None else while_arriving(call, limit, received.progress))
            answered = _answered.get()
            if answered is not None and method in ("POST", "PUT"):
                answered[:] = [r for r in [_object_resource(out)] if r is not None]
            return out
        except (CloudioError, FileNotFoundError, FileExistsError):
            raise
        except Exception as e:
            transient = is_transient(e)
            if not transient and not isinstance(e, (HttpError, OSError, ValueError, RuntimeError)):
                raise  # not the server's answer (a bug, a bad argument)
            url = _request_url(self, path, args, kwargs)
            if url.endswith("/") and _writing.get() is not None:
                url = str(_writing.get())
            if transient:
                raise transient_error(url, f"{method} request", e) from e
            if isinstance(e, RuntimeError) and "Session is closed" in str(e):  # not the server's answer
                kind = ReadError if method.upper() in ("GET", "HEAD") else UploadError
                raise kind(f"{url}: the {method} request was not sent: this process's connections to GCS were "
                           "closed as it exits (a daemon thread still working?); nothing was changed by it.") from e
            raise _refused(url, method, e) from e
        finally:
            _receiving.reset(receiving)

    def _get_headers(self, *args: Any, **kwargs: Any) -> Any:
        """gcsfs's headers, built once per attempt of a request: attempts are counted inside :meth:`_rm_file`."""
        tally = _attempts.get()
        if tally is not None:
            tally.append(1)
        return super()._get_headers(*args, **kwargs)  # type: ignore[misc]

    def call(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        """:meth:`_call` from a thread of its own: GCSFile uploads its chunks through it (and gcsfs bound it to
        its own ``_call``). A Ctrl-C cancels the request, and it has ended, before KeyboardInterrupt is raised
        (:func:`~cloudio._threads.sync_to_the_end`): fsspec's ``sync`` left it running, and a ``close()``
        interrupted while its last chunk was on its way journaled before that chunk stored the object."""
        return sync_to_the_end(self.loop, self._call, method, path, *args, **kwargs)  # type: ignore[attr-defined]

    async def _verify_stored(self, url: str, meta: dict[str, Any], size: int, crc: str) -> int | None:
        """Compare the stored object with what was sent (the upload response serves when it has a
        CRC32C); on a mismatch the object is deleted (journaled) and IntegrityError raised."""
        path = parse_gcs(url, require_key=True)
        try:
            return await _check_stored(self, path, meta, size, crc)
        except _Mismatch as e:
            _record(url, "delete")
            raise IntegrityError(
                f"{url}: what the server stored differs from what was sent ({e}). The corrupt object was "
                "deleted, so nothing is stored there now (the delete is journaled; a previous object there "
                "is gone too). Check the network path to GCS (a proxy rewriting bodies?) and write again."
            ) from e

    async def _landed(self, url: str, size: int, crc: str, error: FileNotFoundError) -> int | None:
        """After an upload answered 404 (``error``): the generation stored when the object holds what was sent
        (a retry found the upload's session ended once its last part was stored, its answer lost); otherwise
        :class:`~cloudio.BucketNotFoundError` when the bucket is missing, else UploadError (journaled as
        an invalidation: the server may hold something this process did not see go up)."""
        path = parse_gcs(url, require_key=True)
        meta = await self._stored(url)
        if _int_or_none(meta.get("size")) == size and meta.get("crc32c") == crc:
            log.info("%s: the upload's last answer was lost, and the object holds what was sent", url)
            return _int_or_none(meta.get("generation"))
        if not meta:
            try:
                await self._call("GET", "b/{}", path.bucket, json_out=True)
            except FileNotFoundError:
                raise bucket_missing(path) from error
        _record(url, "invalidate")
        raise UploadError(f"{url}: the upload's session ended before its last answer arrived, and the object does "
                          "not hold what was sent; this write is not stored. Write again.") from error

    async def _guarded_put(self, url: str, source: Any, guard: Any) -> dict[str, Any]:
        """A write with ``if_generation_match=``: :func:`put_verified`'s precondition; ConflictError if it fails."""
        up = await put_verified(self, url, source, record=False, if_generation_match=checked_guard(url, guard))
        _record(url, "write", generation=up.generation, size=up.size)
        return {"name": parse_gcs(url).key, "generation": str(up.generation), "size": str(up.size),
                "crc32c": up.crc32c}

    async def _pipe_file(self, path: str, data: Any, *args: Any, **kwargs: Any) -> Any:
        """gcsfs's upload, verified and journaled; the last writer wins, guarded against a late copy
        (:func:`~cloudio._gcs.transfer.last_writer_wins`) unless ``mode="create"`` or ``if_generation_match=``
        say what the write needs."""
        url = self._cloudio_url(path)
        token = _writing.set(url)
        try:
            data = _as_bytes(data)
            if "if_generation_match" in kwargs:
                return await self._guarded_put(url, data, kwargs.pop("if_generation_match"))
            sent = (len(data), checksums.of(data))
            return await self._gcsfs_upload(url, sent[0], lambda: sent, kwargs.get("mode"),
                                            functools.partial(super()._pipe_file, path, data, *args, **kwargs))  # type: ignore[misc]
        finally:
            _writing.reset(token)

    async def _gcsfs_upload(self, url: str, size: int, sent: Callable[[], tuple[int, str]], mode: str | None,
                            upload: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """gcsfs's own upload (``upload()``) of about ``size`` bytes, verified against its answer and journaled
        with the size and CRC32C ``sent()`` gives once a try was made (what that try sent). Unless
        ``mode="create"`` (gcsfs then needs no object there itself), the last writer wins, guarded against a
        late copy (:func:`~cloudio._gcs.transfer.last_writer_wins`): the generation replaced goes with each
        of its upload requests (see :meth:`_call`)."""
        if mode == "create":
            return await self._gcsfs_upload_once(url, sent, None, upload)
        return await last_writer_wins(self, parse_gcs(url), size,
                                      lambda replacing: self._gcsfs_upload_once(url, sent, replacing, upload))

    async def _gcsfs_upload_once(self, url: str, sent: Callable[[], tuple[int, str]], replacing: int | None,
                                 upload: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """One try of :meth:`_gcsfs_upload`, each request needing generation ``replacing`` (None: as gcsfs
        sends); ConflictError when another writer's object is there instead (AlreadyExistsError for
        ``mode="create"``), unless gcsfs's retry found what its own earlier try stored."""
        with await journal().changing_async(url), _unsure(url):  # GDAL reads of it wait until it is recorded
            tried: list[int] = []  # one entry per try of the last request (gcsfs retries inside)
            sending, counting = _replacing.set(replacing), _attempts.set(tried)
            try:
                out, meta = await self._answered_by(upload())
            except FileExistsError as e:  # 412: mode="create" found an object, or one not at `replacing`
                if isinstance(e, CloudioError):
                    raise
                size, crc = sent()
                # an earlier try whose answer was lost stored it; refused at the first try, it is another
                # writer's, however alike (its content type or metadata may differ)
                retried = len(tried) > 1
                held = await self._stored(url) if retried or replacing is not None else {}
                if retried and _int_or_none(held.get("size")) == size and held.get("crc32c") == crc:
                    log.info("%s: a retry's precondition failed on what an earlier try stored", url)
                    _uploaded(url, _int_or_none(held.get("generation")), size)
                    return None
                if replacing is None:
                    raise AlreadyExistsError(f"{url}: not written: mode='create' writes only where no object "
                                             "exists, and one does. Nothing was uploaded. Delete it first, or "
                                             "write without mode='create'.") from e
                raise ConflictError(url, replacing, int(held.get("generation") or 0)) from e
            except FileNotFoundError as e:  # a missing bucket, or a resumable upload's retry after its end
                if isinstance(e, CloudioError):
                    raise
                size, crc = sent()
                _uploaded(url, await self._landed(url, size, crc, e), size)
                return None
            finally:
                _attempts.reset(counting)
                _replacing.reset(sending)
            size, crc = sent()
            generation = await self._verify_stored(url, meta, size, crc)
            _uploaded(url, generation, size)
            return out

    async def _stored(self, url: str) -> dict[str, Any]:
        """The object resource stored at ``url`` now; empty when there is none."""
        path = parse_gcs(url, require_key=True)
        try:
            return await self._call("GET", "b/{}/o/{}", path.bucket, path.key, json_out=True)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return {}

    @staticmethod
    async def _answered_by(upload: Coroutine[Any, Any, Any]) -> tuple[Any, dict[str, Any]]:
        """What gcsfs's ``upload`` returns, and the object resource its last upload request was answered
        with (generation, size, crc32c; empty when none was seen): verifying the write then needs no
        request, and never reads (or deletes) what another writer stored after it."""
        answered: list[dict[str, Any]] = []
        token = _answered.set(answered)
        try:
            out = await upload
        finally:
            _answered.reset(token)
        return out, answered[0] if answered else {}

    async def _put_file(self, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> Any:
        if os.path.isdir(lpath):  # gcsfs skips directories
            return await super()._put_file(lpath, rpath, *args, **kwargs)  # type: ignore[misc]
        url = self._cloudio_url(rpath)
        token = _writing.set(url)
        try:
            if "if_generation_match" in kwargs:
                return await self._guarded_put(url, lpath, kwargs.pop("if_generation_match"))
            # consistency=: put_verified always checks the CRC32C; metadata=, mode=...: only gcsfs's upload has them
            if args or set(kwargs) - {"content_type", "callback", "consistency", "chunksize"}:
                return await self._put_file_gcsfs(url, lpath, rpath, *args, **kwargs)
            content_type = kwargs.get("content_type") or mimetypes.guess_type(lpath)[0] or "application/octet-stream"
            with await journal().changing_async(url):  # GDAL reads of it wait until the write is recorded
                # verified against the upload's own answer (not a later metadata request that could see
                # another writer's object); journaled as invalidated there if that answer was lost
                up = await last_writer_wins(self, parse_gcs(url), source_size(lpath, url), lambda g: put_verified(
                    self, url, lpath, content_type=content_type, record=False, attempts=1, expected_generation=g,
                    plain=True))
                _record(url, "write", generation=up.generation, size=up.size)
            callback = kwargs.get("callback")
            if callback is not None:
                callback.set_size(up.size)
                callback.absolute_update(up.size)
        finally:
            _writing.reset(token)
        return None

    async def _put_file_gcsfs(self, url: str, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> Any:
        """gcsfs's own upload, for the options :func:`put_verified` lacks (see :meth:`_gcsfs_upload`), checked
        against the bytes gcsfs read of ``lpath`` as it read them (:class:`_ReadSum`): a file another process
        changed after a sum made beforehand went up as gcsfs read it, and that sum, compared with what the
        server stored, called it corrupted on the way (and deleted it)."""
        put = super()._put_file  # type: ignore[misc]
        reads: list[_ReadSum] = []

        async def upload() -> Any:
            reads.append(_ReadSum(lpath, url))  # each try reads the file anew
            token = _reading.set(reads[-1])
            try:
                return await put(lpath, rpath, *args, **kwargs)
            finally:
                _reading.reset(token)

        return await self._gcsfs_upload(url, source_size(lpath, url), lambda: reads[-1].sent(),
                                        kwargs.get("mode"), upload)

    async def _cat_file(self, path: str, start: Any = None, end: Any = None, **kwargs: Any) -> Any:
        """A whole object is checked against the CRC32C of the server's ``x-goog-hash``.

        Every level reads the server here; the level in force is still looked up, so that a bad
        ``CLOUDIO_CONSISTENCY`` is named as by every other read.
        """
        current_level()
        with _named_missing(self._cloudio_url(path)):
            if start is not None or end is not None:
                return await self._cat_range(path, start, end, kwargs)
            # one GET, whatever the concurrency asked: one generation, checked whole (gcsfs's concurrent read
            # sizes the object from info, which a listing another writer made out of date cut short)
            u = self.url(path, generation=kwargs.get("generation"))  # type: ignore[attr-defined]
            headers, data = await self._call("GET", u)
        want = checksums.of_header(headers)
        if want is not None and checksums.of(data) != want:
            raise IntegrityError(
                f"{self._cloudio_url(path)}: the {len(data)} bytes received do not match the CRC32C the "
                f"server sent ({want}); they were corrupted on the way. Check the network path to GCS and "
                "read again."
            )
        return data

    async def _cat_range(self, path: str, start: Any, end: Any, kwargs: dict[str, Any]) -> Any:
        """A range of the object; one counted from its end is placed by the size the server holds now, read
        from that generation (fsspec places it by ``info``, which a listing held may give out of date: the
        new object's bytes at the old one's offsets)."""
        if not ((start is not None and start < 0) or (end is not None and end < 0)):
            if end is None:  # gcsfs's concurrent read would size it from info
                kwargs.pop("concurrency", None)
            try:
                return await super()._cat_file(path, start=start, end=end, **kwargs)  # type: ignore[misc]
            except Exception as e:
                if 416 in (getattr(e, "code", None), getattr(e.__cause__, "code", None)):  # starts at or past
                    return b""  # the end: empty, as a slice is
                raise
        bucket, key, generation = self.split_path(path)  # type: ignore[attr-defined]
        generation = kwargs.get("generation") or generation
        params = {"generation": generation} if generation else {}
        meta = await self._call("GET", "b/{}/o/{}", bucket, key, json_out=True, **params)
        size = int(meta["size"])
        first = 0 if start is None else max(size + start, 0) if start < 0 else start
        stop = size if end is None else max(size + end, 0) if end < 0 else min(end, size)
        if first >= stop:
            return b""
        kwargs["generation"] = meta["generation"]
        try:
            return await super()._cat_file(path, start=first, end=stop, **kwargs)  # type: ignore[misc]
        except FileNotFoundError as e:
            raise StaleDatasetError(f"{self._cloudio_url(path)} was replaced while it was read (generation "
                                    f"{meta['generation']} is gone); read it again.") from e

    async def _get_file(self, rpath: str, lpath: str, *args: Any, **kwargs: Any) -> Any:
        """gcsfs's download, given up when no byte has arrived for as long as :meth:`_call` may take in
        all (its request bypasses ``_call``, and gcsfs retries a hung one dozens of times: minutes); one
        whose bytes keep arriving is not (a large object's ranges, which gcsfs reads through ``_call``, each
        have that call's limit). Transient failures become TransientError.
        What arrived is checked against the object's CRC32C (:meth:`_check_download`)."""
        url = self._cloudio_url(rpath)
        with _named_missing(url):
            out = await self._download(rpath, lpath, *args, **kwargs)
        if isinstance(lpath, str) and os.path.isfile(lpath) and "headers" not in kwargs:
            await self._check_download(url, lpath)
        return out

    async def _check_download(self, url: str, lpath: str) -> None:
        """Compare the file downloaded with the CRC32C the server holds for the object (one metadata request);
        on a mismatch the file is removed and IntegrityError raised."""
        path = parse_gcs(url, require_key=True)
        meta = await self._call("GET", "b/{}/o/{}", path.bucket, path.key, json_out=True)
        want = meta.get("crc32c")
        if want is None or meta.get("contentEncoding") == "gzip" or checksums.of_file(lpath) == want:
            return  # (a gzip-encoded object arrives decompressed: its CRC32C is of the stored, compressed bytes)
        size = os.path.getsize(lpath)
        os.remove(lpath)
        raise IntegrityError(f"{url}: the {size} bytes received do not match the object's CRC32C ({want}): "
                             "corrupted on the way, or the object was replaced while it was read. The local file "
                             "was removed; read again.")

    async def _download(self, rpath: str, lpath: str, *args: Any, **kwargs: Any) -> Any:
        if args:  # gcsfs's one positional argument after the paths
            kwargs["callback"], args = args[0], args[1:]
        arrivals = Arrivals(kwargs.pop("callback", None))
        try:
            get = super()._get_file(rpath, lpath, *args, callback=arrivals, **kwargs)  # type: ignore[misc]
            return await bounded_while_arriving(self, get, arrivals.progress)
        except (CloudioError, FileNotFoundError):
            raise
        except Exception as e:
            if is_refusal(e):  # (a local failure, a full disk, stays as it is)
                raise _refused(self._cloudio_url(rpath), "GET", e) from e
            if not is_transient(e):
                raise
            raise transient_error(self._cloudio_url(rpath), "download", e) from e

    async def _cp_file(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> Any:
        url = self._cloudio_url(path2)
        with await journal().changing_async(url), _unsure(url):
            try:
                out = await super()._cp_file(path1, path2, *args, **kwargs)  # type: ignore[misc]
            except FileNotFoundError as e:  # the source, or the target's bucket (one request tells which)
                if isinstance(e, CloudioError):
                    raise
                if await self._exists(path1):  # type: ignore[attr-defined]
                    raise bucket_missing(parse_gcs(url)) from e
                with _named_missing(self._cloudio_url(path1)):
                    raise
            _record(url, "write")
        return out

    async def _merge(self, path: str, paths: Any, *args: Any, **kwargs: Any) -> Any:
        """gcsfs's compose, journaled; a source that does not exist raises ObjectNotFoundError naming it (see
        :meth:`_request`). Sources in another bucket than the target's raise InvalidURLError before any request:
        GCS composes within one bucket, and gcsfs sends each source's key alone, so the target bucket's objects
        of those keys were composed instead. So do no sources (an empty object was composed), a target or source
        naming a bucket (sent as an object of no name); one source may be given as a string (gcsfs took it
        letter by letter)."""
        url = self._cloudio_url(path)
        paths = [paths] if isinstance(paths, str) else list(paths)
        bucket = self.split_path(path)[0]  # type: ignore[attr-defined]
        if not paths:
            raise InvalidURLError(f"{url}: not merged: no sources given; nothing was sent or written. Name the "
                                  "objects to merge, in order: fs.merge(target, [first, second, ...]).")
        for named in [path, *paths]:
            if not self.split_path(named)[1]:  # type: ignore[attr-defined]
                raise InvalidURLError(
                    f"{url}: not merged: {self._cloudio_url(named)} names a bucket, and a merge reads and makes "
                    "objects; nothing was sent or written. Name each object as bucket/key.")
        elsewhere = [b for b in dict.fromkeys(self.split_path(p)[0] for p in paths) if b != bucket]  # type: ignore[attr-defined]
        if elsewhere:
            held = ", ".join(f"gs://{b}" for b in elsewhere)
            raise InvalidURLError(
                f"{url}: not merged: sources are in {held}, and GCS merges (composes) objects of the target's own "
                f"bucket gs://{bucket} only; nothing was sent or written. Copy the sources into gs://{bucket} "
                "first (cloudio.filesystem().copy), then merge the copies.")
        # what gcsfs composes: each source's key, in the target's bucket
        sources = [_gcs_url(self, f"{bucket}/{self.split_path(p)[1]}") for p in paths]  # type: ignore[attr-defined]
        token = _composing.set((url, sources))
        try:
            # GDAL reads of it in flight end first, waited for off the event loop; later ones wait for the record
            with await journal().changing_async(url), _unsure(url):
                out = await super()._merge(path, paths, *args, **kwargs)  # type: ignore[misc]
                _record(url, "write")
        finally:
            _composing.reset(token)
        return out

    async def _request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        """gcsfs's request; a merge's compose request is tried once alone first, and when the server answers
        it 404 (GCS, for a missing source) or 5xx (fake-gcs-server answers a missing source 500) the sources
        are checked (:meth:`_missing_source`) before gcsfs's retries: a missing one is named at once, where
        gcsfs retried a 500 until the time limit and then raised TransientError."""
        composing = _composing.get()
        if composing is None or method != "POST" or not path.endswith("/compose"):
            return await super()._request(method, path, *args, **kwargs)  # type: ignore[misc]
        once = getattr(super()._request, "__wrapped__", None)  # type: ignore[misc]  # gcsfs's, without retries
        if once is None:  # (another gcsfs): checked once its retries are over
            try:
                return await super()._request(method, path, *args, **kwargs)  # type: ignore[misc]
            except Exception as e:
                await self._missing_source(*composing, e)
                raise
        try:
            return await once(self, method, path, *args, **kwargs)
        except Exception as e:
            await self._missing_source(*composing, e)
            if isinstance(e, FileNotFoundError) or not is_transient(e):
                raise
        return await super()._request(method, path, *args, **kwargs)  # type: ignore[misc]

    async def _missing_source(self, url: str, sources: list[str], error: Exception) -> None:
        """After the compose request of ``url`` failed with ``error``: when the server answered it 404 or 5xx,
        raise ObjectNotFoundError naming the first source that does not exist (BucketNotFoundError when the
        bucket is missing), from ``error``. One metadata request per source up to that one (and one for the
        bucket when the first is missing); nothing when every source is there or a check itself fails."""
        code = 404 if isinstance(error, FileNotFoundError) else getattr(error, "code", None)
        if not (code == 404 or (is_http_error(error) and isinstance(code, int) and 500 <= code < 600)):
            return
        for i, source in enumerate(dict.fromkeys(sources)):
            try:
                held = await self._stored(source)
            except CloudioError as e:
                log.info("%s: could not check the merge's source %s (%s)", url, source, e)
                return
            if held:
                continue
            path = parse_gcs(source, require_key=True)
            if i == 0:  # none found yet: the bucket may be missing
                try:
                    await self._call("GET", "b/{}", path.bucket, json_out=True)
                except FileNotFoundError:
                    raise bucket_missing(path) from error
                except CloudioError:
                    pass
            raise ObjectNotFoundError(f"{url}: not merged: its source {source} does not exist; nothing was "
                                      "written. Check the source URLs; cloudio.filesystem().ls lists what a "
                                      "folder holds.") from error

    async def _setxattrs(self, path: str, *args: Any, **kwargs: Any) -> Any:
        url = self._cloudio_url(path)
        with await journal().changing_async(url), _named_missing(url), _unsure(url):  # (as _merge)
            out = await super()._setxattrs(path, *args, **kwargs)  # type: ignore[misc]
            _record(url, "write")  # metadata held in cached listings changed
        return out

    def _same(self, path1: str, path2: str) -> bool:
        """Whether two paths name one object (``gs://b/k`` and ``b/k``)."""
        return bool(self._cloudio_url(path1) == self._cloudio_url(path2))

    async def _mv_file(self, path1: str, path2: str, **kwargs: Any) -> Any:
        if self._same(path1, path2):  # moved onto itself: gcsfs would copy it and delete the source, the object
            return None
        # gcsfs moves with one moveTo request, or falls back to copy + delete
        # (which record themselves); record what the parts did not.
        u1, u2 = self._cloudio_url(path1), self._cloudio_url(path2)
        with _collect() as acc, _unsure(u1, u2):
            out = await super()._mv_file(path1, path2, **kwargs)  # type: ignore[misc]
        if u2 not in acc:
            _record(u2, "write")
        if u1 not in acc:
            _record(u1, "delete")
        return out

    async def _rm_file(self, path: str, **kwargs: Any) -> Any:
        if not self.split_path(path)[1]:  # type: ignore[attr-defined]  # a bucket goes through _rmdir
            return await super()._rm_file(path, **kwargs)  # type: ignore[misc]
        url = self._cloudio_url(path)
        attempts: list[int] = []
        token = _attempts.set(attempts)
        try:
            with _named_missing(url), await journal().changing_async(url), _unsure(url):
                try:
                    out = await super()._rm_file(path, **kwargs)  # type: ignore[misc]
                except FileNotFoundError:
                    if len(attempts) > 1:  # gcsfs retries transient failures only: the first DELETE may have
                        _record(url, "delete")  # landed and its answer been lost; either way nothing is there
                    raise
                _record(url, "delete")
        finally:
            _attempts.reset(token)
        return out

    async def _rm(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        with _named_missing(self._cloudio_urls(path)):
            return await super()._rm(path, *args, **kwargs)  # type: ignore[misc]

    async def _rm_files(self, paths: list[str], *args: Any, **kwargs: Any) -> Any:
        out = await super()._rm_files(paths, *args, **kwargs)  # type: ignore[misc]
        for p in out or ():  # batch deletes: a path for each success, an exception otherwise
            if isinstance(p, str):
                _record(self._cloudio_url(p), "delete")
        return out

    async def _rmdir(self, path: str, *args: Any, **kwargs: Any) -> Any:
        url = self._cloudio_url(path)
        try:
            with _unsure(url, prefix=True):
                out = await super()._rmdir(path, *args, **kwargs)  # type: ignore[misc]
        except FileNotFoundError:  # gone either way (gcsfs's retry of a delete that landed, its answer lost)
            _record(url, "delete", prefix=True)
            raise
        _record(url, "delete", prefix=True)  # a bucket (or an HNS folder)
        return out

    async def _mkdir(self, path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            out = await super()._mkdir(path, *args, **kwargs)  # type: ignore[misc]
        finally:  # a failure too: a lost answer, then gcsfs's retry refused (409), made the bucket all the same
            # a new bucket (or HNS folder): only listings of its parent can be stale
            _record(self._cloudio_url(path), "invalidate", prefix=True)
        return out

    async def _info(self, path: str, generation: Any = None, **kwargs: Any) -> Any:
        """gcsfs's, except that an object named like a folder (``d`` beside ``d/x``) is the object: from a
        cached listing gcsfs returned whichever entry came first (the folder, size 0: the object read
        empty), where uncached it prefers the object too."""
        with _named_missing(self._cloudio_url(path)):
            out = await super()._info(path, generation=generation, **kwargs)  # type: ignore[misc]
        if out.get("type") == "directory":
            name = self._strip_protocol(path).rstrip("/")  # type: ignore[attr-defined]
            for o in self._ls_from_cache(self._parent(name)) or ():  # type: ignore[attr-defined]
                if o.get("type") == "file" and o["name"] == name and (not generation
                                                                      or o.get("generation") == generation):
                    return o
        return out

    async def _expand_path(self, path: Any, recursive: bool = False, maxdepth: Any = None,
                           assume_literal: bool = False) -> Any:
        """fsspec's, except that a path holding ``[``, ``*`` or ``?`` that names a stored object or folder
        means that one: fsspec reads it as a glob (``rm("d/a[1].tif")`` deleted ``d/a1.tif`` and kept
        the object named). One existence check per such path; a pattern that names nothing stored globs."""
        from glob import has_magic

        if assume_literal or isinstance(path, str):  # a str comes back here as a list
            with _named_missing(self._cloudio_urls(path)):
                return await super()._expand_path(path, recursive, maxdepth, assume_literal)  # type: ignore[misc]
        paths = [self._strip_protocol(p) for p in path]  # type: ignore[attr-defined]
        stored = [p for p in paths if has_magic(p) and await self._exists(p)]  # type: ignore[attr-defined]
        if not stored:
            with _named_missing(self._cloudio_urls(paths)):
                return await super()._expand_path(paths, recursive, maxdepth)  # type: ignore[misc]
        out = set(await super()._expand_path(stored, recursive, maxdepth, assume_literal=True))  # type: ignore[misc]
        rest = [p for p in paths if p not in stored]
        if rest:
            try:
                out |= set(await super()._expand_path(rest, recursive, maxdepth))  # type: ignore[misc]
            except FileNotFoundError:  # fsspec raises for nothing at all; the stored ones are something
                pass
        return sorted(out)

    async def _stored_pairs(self, path1: Any, path2: Any, recursive: bool, maxdepth: Any,
                            dest_is_dir: Callable[[str], Awaitable[bool]]) -> tuple[list[str], list[str]] | None:
        """For ``copy``/``get`` of one path holding ``[``, ``*`` or ``?`` that names something stored
        (:meth:`_expand_path`): the sources and targets fsspec would pair for a path without them. fsspec
        decides from the characters alone that the path was a pattern, and copies its one "match" into
        ``path2`` as a folder. None for any other call (fsspec's own pairing)."""
        from glob import has_magic

        from fsspec.implementations.local import trailing_sep
        from fsspec.utils import other_paths

        if not (isinstance(path1, str) and isinstance(path2, str) and has_magic(path1)):
            return None
        if not await self._exists(path1):  # type: ignore[attr-defined]
            return None
        sources = await self._expand_path([path1], recursive, maxdepth, assume_literal=True)  # checked just above
        if not recursive or maxdepth is not None:  # as fsspec: a non-recursive copy copies no folders
            sources = [p for p in sources if not (trailing_sep(p) or await self._isdir(p))]  # type: ignore[attr-defined]
        exists = not trailing_sep(path1) and (trailing_sep(path2) or await dest_is_dir(path2))
        return sources, other_paths(sources, path2, exists=exists, flatten=False)

    async def _copy(self, path1: Any, path2: Any, recursive: bool = False, on_error: Any = None,
                    maxdepth: Any = None, batch_size: Any = None, **kwargs: Any) -> Any:
        pairs = await self._stored_pairs(path1, path2, recursive, maxdepth, self._isdir)  # type: ignore[attr-defined]
        if pairs is not None:
            if not pairs[0]:
                return None
            path1, path2 = pairs
        return await super()._copy(path1, path2, recursive=recursive, on_error=on_error,  # type: ignore[misc]
                                   maxdepth=maxdepth, batch_size=batch_size, **kwargs)

    async def _mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: Any = None,
                  **kwargs: Any) -> Any:
        if isinstance(path1, str) and isinstance(path2, str) and self._same(path1, path2):
            return None  # one object spelled two ways: gcsfs compares the strings, then copies it onto itself
        pairs = await self._stored_pairs(path1, path2, recursive, maxdepth, self._isdir)  # type: ignore[attr-defined]
        if pairs is not None:
            if not pairs[0]:
                return None
            path1, path2 = pairs
        return await super()._mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)  # type: ignore[misc]

    async def _get(self, rpath: Any, lpath: Any, recursive: bool = False, maxdepth: Any = None,
                   **kwargs: Any) -> Any:
        from fsspec.implementations.local import LocalFileSystem, make_path_posix

        async def local_dir(p: str) -> bool:
            return bool(LocalFileSystem().isdir(p))

        local = make_path_posix(lpath) if isinstance(lpath, str) else lpath
        pairs = await self._stored_pairs(rpath, local, recursive, maxdepth, local_dir)
        if pairs is not None:
            if not pairs[0]:
                return None
            for target in pairs[1]:
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            rpath, lpath = pairs
        return await super()._get(rpath, lpath, recursive=recursive, maxdepth=maxdepth,  # type: ignore[misc]
                                  **kwargs)

    # gcsfs binds these sync methods to its own coroutines in its class body
    # (``mv_file = sync_wrapper(_mv_file)``), which would bypass the overrides above;
    # fsspec derives the others (pipe_file, put_file, cp_file, rm_file...) per instance.
    rm = sync_wrapper(_rm)
    mv_file = sync_wrapper(_mv_file)
    mv = sync_wrapper(_mv)
    merge = sync_wrapper(_merge)
    setxattrs = sync_wrapper(_setxattrs)
    rmdir = sync_wrapper(_rmdir)
    mkdir = sync_wrapper(_mkdir)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        from gcsfs.core import GCSFile

        f = super()._open(path, mode, *args, **kwargs)  # type: ignore[misc]
        details = getattr(f, "_details", None)
        if "r" in mode and details is not None and details.get("type") == "directory":
            # gcsfs took the name for the folder of the same name (answered from that folder's cached listing,
            # which its _get_object also searches): an object of that name is what a read means (one GET, only
            # when a folder's name is opened for reading)
            bucket, key, _ = self.split_path(f.path)  # type: ignore[attr-defined]
            try:
                res = sync(self.loop, self._call, "GET", "b/{}/o/{}", bucket, key, json_out=True)  # type: ignore[attr-defined]
                obj = self._process_object(bucket, res)  # type: ignore[attr-defined]
            except FileNotFoundError:
                obj = None
            if obj is not None and obj.get("type") == "file":
                f = super()._open(path, mode, *args, **{**kwargs, "size": int(obj["size"])})  # type: ignore[misc]
                f._details = obj
        if "r" in mode and type(f) is GCSFile:  # (zonal files read through gRPC, by generation)
            _pin_reads(f)
        if "r" not in mode:
            # gcsfs picks the file class (GCSFile, or ZonalFile for zonal buckets);
            # give that class the journaling mixin rather than re-implement the choice
            file_class: type = type(f)  # a plain class, hashable for the cache (gcsfs is untyped: f is Any)
            f.__class__ = _journaling_file_class(file_class)
            f.buffer = f.__dict__.pop("buffer")  # held as a _ViewsOfACopy from now on
            f.checker = _Crc32cChecker()
        return f


class _JournalingHNSMixin(_JournalingGCSMixin):
    """Extra for gcsfs's extended filesystem: HNS folder renames move a prefix in one call."""

    async def _mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: Any = None,
                  **kwargs: Any) -> Any:
        with _collect() as acc:
            out = await super()._mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)
        if not acc and isinstance(path1, str) and isinstance(path2, str) and path1 != path2:
            from glob import has_magic

            bucket = self.split_path(path1)[0]  # type: ignore[attr-defined]
            if not has_magic(path1) and await self._is_bucket_hns_enabled(bucket):  # type: ignore[attr-defined]
                # a folder rename moved a whole prefix and recorded nothing per object
                _record(self._cloudio_url(path1), "delete", prefix=True)
                _record(self._cloudio_url(path2), "write", prefix=True)
        return out

    mv = sync_wrapper(_mv)


_gcs_classes: dict[str, type] = {}


def _tracked_gcs_class(name: str) -> type:
    """Build ``TrackedGCSFileSystem`` / ``TrackedExtendedGCSFileSystem`` on first use.

    Built lazily because gcsfs must not be imported before
    :func:`cloudio._config.prepare_gcsfs_import`, and published as module
    attributes (see ``__getattr__``) so instances pickle by reference to Dask
    workers, which rebuild the class the same way.
    """
    cls = _gcs_classes.get(name)
    if cls is not None:
        return cls
    prepare_gcsfs_import()
    import gcsfs.core

    _sum_gcsfs_reads()
    if name == "TrackedGCSFileSystem":
        base: type = gcsfs.core.GCSFileSystem
        mixin: type = _JournalingGCSMixin
    else:
        from gcsfs.extended_gcsfs import ExtendedGcsFileSystem

        base, mixin = ExtendedGcsFileSystem, _JournalingHNSMixin
    doc = f"A gcsfs ``{base.__name__}`` whose writes are recorded in cloudio's write journal."
    cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, "__doc__": doc})
    return _gcs_classes.setdefault(name, cls)


def __getattr__(name: str) -> Any:
    if name in ("TrackedGCSFileSystem", "TrackedExtendedGCSFileSystem"):
        return _tracked_gcs_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# local paths
# --------------------------------------------------------------------------------------------


class _JournalingLocalFile(LocalFileOpener):  # type: ignore[misc]  # fsspec ships no type information
    """A local file opened for writing, journaled when it is complete.

    Mode ``"w"`` writes to a temporary file that is moved in place at close (the
    move is the commit), so an exception inside the ``with`` block leaves the
    target untouched and journals nothing. ``"a"`` and ``"x"`` write in place
    and are journaled at a clean close.
    """

    def __init__(self, path: str, mode: str, autocommit: bool = True, **kwargs: Any) -> None:
        self._cloudio_autocommit = autocommit
        self._cloudio_staged = "w" in mode
        super().__init__(path, mode, autocommit=autocommit and not self._cloudio_staged, **kwargs)

    def close(self) -> None:
        if self.f is None or self.f.closed:
            return
        super().close()
        if not self._cloudio_staged:
            _record(normalize(self.path), "write", size=os.path.getsize(self.path))
        elif self._cloudio_autocommit:
            self.commit()

    def discard(self) -> None:
        if not getattr(self, "_cloudio_discarded", False):  # a transaction's end discards it again
            super().discard()

    def commit(self) -> None:
        """Move the staged file in place: onto the file a symlink names (the link kept), with the mode the
        file it replaces had (as writing in place keeps it); nothing for a file whose ``with`` block raised."""
        if getattr(self, "_cloudio_discarded", False):
            return
        me: Any = self  # fsspec's LocalFileOpener, untyped
        link: str = me.path
        target = os.path.realpath(link)
        kept = os.stat(target).st_mode & 0o7777 if os.path.isfile(target) else None
        me.path = target
        try:
            super().commit()
        finally:
            me.path = link
        if kept is not None:
            os.chmod(target, kept)
        for url in dict.fromkeys((normalize(link), normalize(target))):
            _record(url, "write", size=os.path.getsize(target))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._incontext = False
        if exc_type is not None and self._cloudio_staged and not self.f.closed:
            self.f.close()
            self.discard()  # in a transaction too: its end commits the other files, not this one
            self._cloudio_discarded = True
            return None
        self.close()
        return None


class TrackedLocalFileSystem(_TextWrites, LocalFileSystem):  # type: ignore[misc]  # fsspec ships no type information
    """fsspec's local filesystem whose writes are recorded in cloudio's write journal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        track(self)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        if "r" in mode:
            return super()._open(path, mode, block_size=block_size, **kwargs)
        path = self._strip_protocol(path)
        if self.auto_mkdir:
            self.makedirs(self._parent(path), exist_ok=True)
        return _JournalingLocalFile(path, mode, fs=self, **kwargs)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:  # put_file is cp_file here
        super().cp_file(path1, path2, **kwargs)
        _record(normalize(self._strip_protocol(path2)), "write", prefix=self.isdir(path2))

    def mv(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> None:
        super().mv(path1, path2, *args, **kwargs)
        for p in _as_list(path1):
            _record(normalize(self._strip_protocol(p)), "delete", prefix=True)
        for p in _as_list(path2):  # a file, a tree, or the directory the sources went into
            _record(normalize(self._strip_protocol(p)), "write", prefix=True)

    def rm_file(self, path: str) -> None:
        super().rm_file(path)
        _record(normalize(self._strip_protocol(path)), "delete")

    def rm(self, path: Any, recursive: bool = False, maxdepth: Any = None) -> None:
        for p in _as_list(path):  # one at a time, each journaled once gone: a later one failing keeps the record
            super().rm(p, recursive=recursive, maxdepth=maxdepth)
            _record(normalize(self._strip_protocol(p)), "delete", prefix=recursive)

    def rmdir(self, path: str) -> None:
        super().rmdir(path)
        _record(normalize(self._strip_protocol(path)), "delete", prefix=True)

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        super().touch(path, truncate=truncate, **kwargs)
        _record(normalize(self._strip_protocol(path)), "write")


def _as_list(p: Any) -> list[str]:
    return list(p) if isinstance(p, (list, tuple)) else [p]


# --------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------


def filesystem(url: str | os.PathLike[str] = "gs://", **storage_options: Any) -> fsspec.AbstractFileSystem:
    """A tracked fsspec filesystem for ``url``: its writes are recorded in cloudio's journal.

    Every write through it (``pipe``, ``put``, ``open(..., "wb")``, ``cp``,
    ``mv``, ``rm``, ``touch``) is journaled once it succeeded, so GDAL, Zarr
    and every other fsspec instance of the process read it at once. The
    filesystem is a real subclass of gcsfs's ``GCSFileSystem`` (fsspec's
    ``LocalFileSystem`` for local paths), cached by fsspec like any other.

    Parameters
    ----------
    url
        ``gs://bucket[/key]`` (any spelling cloudio accepts) or a local path;
        only its scheme matters, one filesystem serves every bucket.
    **storage_options
        Passed to the filesystem (``asynchronous=True``, ``token=``...); they
        win over the emulator options cloudio derives from
        ``STORAGE_EMULATOR_HOST``.

    Raises
    ------
    InvalidURLError
        For a malformed GCS URL or an unsupported scheme.

    Examples
    --------
    >>> fs = cloudio.filesystem("gs://bucket")          # doctest: +SKIP
    >>> fs.pipe("gs://bucket/d/a.bin", b"x" * 100)      # doctest: +SKIP
    """
    if not is_gcs(url):
        normalize(url)  # raises InvalidURLError for s3:// and friends
        return TrackedLocalFileSystem(**storage_options)
    if os.fspath(url) not in ("gs://", "gcs://"):
        parse_gcs(os.fspath(url))  # validate now: a clear error rather than a 404 later
    prepare_gcsfs_import()
    import gcsfs
    import gcsfs.core

    name = "TrackedGCSFileSystem"
    if emulator_endpoint() is None and gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        name = "TrackedExtendedGCSFileSystem"  # keep gcsfs's zonal/HNS support on real GCS
    if "token" not in storage_options:
        require_credentials(os.fspath(url))  # fail now, not after minutes of retries against Google
    return _tracked_gcs_class(name)(**{**gcsfs_options(), **http_options(), **storage_options})
