"""One exception hierarchy, rooted at :class:`CloudioError`.

Each subclass also derives from the builtin a caller already catches
(``FileNotFoundError``, ``ValueError``, ...), the way zarr and rasterio mix
their errors with builtins, so ``except FileNotFoundError`` keeps working.
Messages name the URL and the next step; they never carry credentials.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "BucketNotFoundError",
    "CloudioError",
    "ConfigurationError",
    "ConflictError",
    "EmulatorError",
    "IncompleteWriteError",
    "IntegrityError",
    "InvalidURLError",
    "LocalFileNotFoundError",
    "LoopNotRunningError",
    "NotARasterError",
    "ObjectNotFoundError",
    "ReadError",
    "StaleDatasetError",
    "TransientError",
    "UnsafeChunkingError",
    "UploadError",
]


class CloudioError(Exception):
    """Root of every error cloudio raises."""


class InvalidURLError(CloudioError, ValueError):
    """A URL cloudio cannot map to one object or prefix."""


class ObjectNotFoundError(CloudioError, FileNotFoundError):
    """The object (or prefix) does not exist on the server."""


class BucketNotFoundError(ObjectNotFoundError):
    """The bucket itself does not exist."""


class LocalFileNotFoundError(CloudioError, FileNotFoundError):
    """A local file given to upload (``fs.put``) is not there, or is not a regular file; nothing was sent."""


class IntegrityError(CloudioError, OSError):
    """What the server stored differs from what was sent (size or CRC32C)."""


class UploadError(CloudioError, OSError):
    """An upload failed after its retries; nothing was journaled."""


class EmulatorError(CloudioError, RuntimeError):
    """The GCS emulator could not be started or reached."""


class LoopNotRunningError(CloudioError, RuntimeError):
    """A synchronous call found the event loop it runs its requests on closed, or, while the interpreter shuts
    down, run by no thread: it would never end (a RuntimeError, as zarr's and fsspec's "Loop is not running")."""


class UnsafeChunkingError(CloudioError, ValueError):
    """Dask chunks would make several tasks write one Zarr shard."""


class ConfigurationError(CloudioError, ValueError):
    """An option or environment variable has a value cloudio cannot use."""


#: what a refused guarded write did, unless an earlier try changed the object
_NOTHING_DONE = "Nothing was uploaded or journaled."


class ConflictError(CloudioError, FileExistsError):
    """A guarded write (``if_generation_match=``) lost a race: the object is not at the generation required.

    Nothing was uploaded or journaled (``outcome`` says otherwise when an earlier
    try changed the object). ``FileExistsError`` is what gcsfs raises for the same
    412 answer, so callers of plain gcsfs keep catching it.
    """

    def __init__(self, url: str, expected: int, actual: int, *, next_step: str = "",
                 outcome: str = _NOTHING_DONE) -> None:
        self.url = url
        #: what became of the object before the refusal (an earlier try's corrupt copy deleted, or nothing)
        self.outcome = outcome
        #: the generation the write required (0: that no object exists)
        self.expected = expected
        #: the generation the server holds (0: no object)
        self.actual = actual
        want = "no object there (generation 0)" if expected == 0 else f"generation {expected}"
        held = "no object (generation 0)" if actual == 0 else f"generation {actual}"
        step = next_step or ("Read the object again, decide whether your write still applies, and write "
                             f"again with if_generation_match={actual}.")
        super().__init__(f"{url}: not written: the write required {want} but the server holds {held} "
                         f"(another writer changed it). {outcome} {step}")

    def __reduce__(self) -> tuple[object, ...]:  # a Dask worker's error pickles back whole
        return (_conflict, (self.url, self.expected, self.actual, str(self), self.outcome))


def _conflict(url: str, expected: int, actual: int, message: str,
              outcome: str = _NOTHING_DONE) -> ConflictError:
    err = ConflictError(url, expected, actual, outcome=outcome)
    err.args = (message,)
    return err


class AlreadyExistsError(CloudioError, FileExistsError, ValueError):
    """A write asked not to replace what is stored (``save_array(..., overwrite=False)``, ``to_zarr(...,
    mode="w-")``) found something there; nothing was written.

    Both a ``FileExistsError`` (what xarray raises) and a ``ValueError`` (what
    zarr raises), so callers of the plain libraries keep catching it.
    """


class TransientError(CloudioError, ConnectionError):
    """The server or network failed past cloudio's retries and time limit (503, 429, reset, timeout).

    Nothing is known to be wrong with the request: the operation can be retried.
    """


class IncompleteWriteError(CloudioError, OSError):
    """A multi-object write (a Zarr array or dataset) was started and never committed.

    Reading it would mix old and new objects; rewrite it, or delete it.
    """


class NotARasterError(CloudioError, OSError):
    """The object exists but GDAL does not recognise it as a raster it can update."""


class ReadError(CloudioError, OSError):
    """An object that exists could not be read: GDAL's read failed (not a raster, truncated) even after
    a retry, or the server refused it (403)."""


class StaleDatasetError(ReadError):
    """The object changed while a dataset of it was open (a write through cloudio, or another writer's change
    cloudio learnt of), into another layout.

    Reading on would mix the dataset's old header with the new bytes; reopen it.
    """
