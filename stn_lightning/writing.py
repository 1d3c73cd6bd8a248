"""Files that appear whole or not at all, and write failures as one line naming the file and the reason.

Every file the package writes (checkpoints, pictures, the attention GIF, predictions, exports) goes through
:class:`AtomicFile`: the bytes go to a temporary file in the target's folder (``.<name>.<random>.tmp<suffix>``),
are flushed to disk, and the temporary file is renamed over the target only when it is complete, so a kill, a full
disk or a size limit leaves the earlier file as it was and no partial file behind. A write that fails raises
:class:`WriteFailed`, whose message is the one line the command prints: the file and the operating system's
reason ("cannot write lightning_logs/version_0/checkpoints/last.ckpt: No space left on device").
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["AtomicFile", "WriteFailed", "atomic_path", "atomic_write"]


class WriteFailed(OSError, ValueError):
    """A file could not be written; ``str()`` is one line: the file and the operating system's reason.

    An OSError (``errno`` and ``filename`` are those of the failure) and a ValueError, so that the command line
    reports it like other errors of the user's environment (one line, no traceback).
    """

    def __init__(self, path: str | os.PathLike[str], reason: BaseException | str) -> None:
        found = _os_error(reason) if isinstance(reason, BaseException) else None
        if found is not None:
            text = _describe(Path(path), found)
        else:
            text = (str(reason).strip().splitlines() or [type(reason).__name__])[0]
        super().__init__(f"cannot write {path}: {text}")
        self.errno = found.errno if found is not None else None  # type: ignore[assignment]
        self.filename = str(path)
        self.reason = text

    def __str__(self) -> str:
        return str(self.args[0])


def _os_error(err: BaseException) -> OSError | None:
    # The OSError behind an exception: itself, or one in its chain (torch.save reports a failed write as a
    # RuntimeError "unexpected pos ..." raised while handling the OSError of the file's write).
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and not isinstance(current, WriteFailed) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _describe(path: Path, err: OSError) -> str:
    reason = err.strerror or os.strerror(err.errno or 0)
    where = err.filename
    if where is not None and str(where) not in (str(path),) and not Path(str(where)).name.startswith("."):
        return f"{reason} ({where})"
    return reason


def _make_folder(folder: Path, path: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        # A path through a regular file (mkdir says "File exists" for the file itself): name that file.
        blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise WriteFailed(path, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(blocking))) from None
    except OSError as err:
        raise WriteFailed(path, err) from None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A file written to a temporary name next to ``path`` and renamed to ``path`` by :meth:`commit`.

    Args:
        path: the file to write; its folder is created if needed.
        mode: ``open``'s mode for :attr:`file` ("w", "wb", ...), or None to only reserve the temporary path (for
            writers that take a path: :attr:`tmp` ends in the target's suffix, so they pick the same format).
        **open_kwargs: ``open``'s other arguments (``newline=""``, ``encoding=``).

    Raises:
        WriteFailed: when the folder or the temporary file cannot be made.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str | None = "w", **open_kwargs: Any) -> None:
        self.path = Path(path)
        _make_folder(self.path.parent, self.path)
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=f".tmp{self.path.suffix}", dir=self.path.parent
            )
        except OSError as err:
            raise WriteFailed(self.path, err) from None
        self.tmp = Path(tmp)
        self.file: IO[Any] | None = None
        try:
            if mode is None:
                os.close(fd)
            else:
                self.file = os.fdopen(fd, mode, **open_kwargs)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        """Flush the temporary file to disk and rename it over the target; WriteFailed (and nothing left) if not."""
        try:
            if self.file is not None:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
            else:
                with open(self.tmp, "rb+") as f:
                    os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private to the user
            os.replace(self.tmp, self.path)
        except BaseException as err:
            self.discard()
            if isinstance(err, Exception) and _os_error(err) is not None:
                raise WriteFailed(self.path, err) from None
            raise
        _fsync_folder(self.path.parent)

    def discard(self) -> None:
        """Close and remove the temporary file; the target stays as it was."""
        if self.file is not None:
            with contextlib.suppress(Exception):
                self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def failed(self, err: BaseException) -> BaseException:
        """Discard, and return what to raise for ``err``: a WriteFailed when an OSError is behind it."""
        self.discard()
        if isinstance(err, Exception) and not isinstance(err, WriteFailed) and _os_error(err) is not None:
            return WriteFailed(self.path, err)
        return err


@contextlib.contextmanager
def _whole(out: AtomicFile) -> Iterator[AtomicFile]:
    # Commit when the block ends without error; otherwise discard, a failed write becoming WriteFailed.
    try:
        yield out
    except BaseException as err:
        replacement = out.failed(err)
        if replacement is err:
            raise
        raise replacement from None
    out.commit()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """``with atomic_write(path, "wb") as f: ...``: ``path`` gets what was written to ``f`` whole, or stays as it was.

    An exception inside the block leaves ``path`` unchanged and no temporary file; one caused by a failed write
    (an OSError, or an error raised while handling one) becomes :class:`WriteFailed`.
    """
    with _whole(AtomicFile(path, mode, **open_kwargs)) as out:
        assert out.file is not None
        yield out.file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_path(path) as tmp: writer(tmp)``, for writers that take a path (matplotlib, PIL, ONNX, export).

    ``tmp`` is in ``path``'s folder and ends in its suffix; it replaces ``path`` when the block ends without error.
    """
    with _whole(AtomicFile(path, None)) as out:
        yield out.tmp
