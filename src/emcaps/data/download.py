"""Verified, resumable, atomic HTTP downloads shared by the smallNORB and MNIST loaders.

A file only ever appears under its final name after it was fully received and verified: bytes go to
``NAME.part`` (resumed with an HTTP Range request if a previous attempt was cut off), are checked
against the expected size, SHA-256 and any format check, fsynced, then renamed into place.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emcaps.progress import progress_bar


class DownloadError(RuntimeError):
    """A download failed (unreachable server, HTTP error, dropped connection); names the URL."""


class ChecksumError(DownloadError):
    """Received bytes did not match the expected size, SHA-256 or format; the partial file was removed."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: its name under the base URL and what it must match (None: not checked)."""

    name: str
    size: int | None = None
    sha256: str | None = None


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _receive(url: str, part: Path, timeout: float, chunk_size: int, progress: bool, total: int | None) -> None:
    """One HTTP attempt appending to ``part``; raises on a dropped connection, leaving what arrived."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = have > 0 and response.status == 206
        if resumed:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise DownloadError(f"{url}: server answered Range {have}- with Content-Range {content_range!r}")
        else:
            have = 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part, "ab" if resumed else "wb") as handle, progress_bar(
            total, desc=part.name.removesuffix(".part"), enabled=progress, unit="B", initial=have
        ) as bar:
            while block := response.read(chunk_size):
                handle.write(block)
                received += len(block)
                bar.update(len(block))
        if expected is not None and received < expected:
            raise http.client.IncompleteRead(b"", expected - received)


def _check(url: str, part: Path, size: int | None, sha256: str | None,
           verify: Callable[[Path], None] | None) -> None:
    """Raise ChecksumError (after deleting ``part``) unless it matches every expectation."""
    problem = None
    actual_size = part.stat().st_size
    if size is not None and actual_size != size:
        problem = f"size {actual_size} bytes, expected {size}"
    elif sha256 is not None and (digest := sha256_of(part)) != sha256.lower():
        problem = f"SHA-256 {digest}, expected {sha256.lower()}"
    elif verify is not None:
        try:
            verify(part)
        except ValueError as error:
            problem = f"content check failed: {error}"
    if problem is not None:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: downloaded file is corrupt ({problem}); removed it, try again")


def fetch(url: str, dest: str | os.PathLike, *, size: int | None = None, sha256: str | None = None,
          verify: Callable[[Path], None] | None = None, retries: int = 3, timeout: float = 60.0,
          chunk_size: int = 1 << 16, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless it is already there; resume, verify, then rename atomically.

    ``verify(part_path)`` may raise ValueError to reject the content (e.g. a format check). A dropped
    connection is retried ``retries`` times with a Range request; if it still fails, the ``.part`` file
    is kept so the next call resumes from it.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()
    attempt = 0
    while not (size is not None and part.exists() and part.stat().st_size == size):
        try:
            _receive(url, part, timeout, chunk_size, progress, size)
            break
        except urllib.error.HTTPError as error:
            if error.code == 416 and part.exists():
                break
            raise DownloadError(f"{url}: HTTP error {error.code} {error.reason}") from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, (ConnectionError, TimeoutError, socket.timeout)) and part.exists():
                problem = error.reason
            else:
                raise DownloadError(
                    f"{url}: could not connect ({error.reason}); are you offline? You can also put the "
                    f"file there by hand: {dest}"
                ) from error
        except (http.client.IncompleteRead, ConnectionError, TimeoutError, http.client.HTTPException) as error:
            problem = error
        attempt += 1
        if attempt > retries:
            kept = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"{url}: connection dropped ({problem!r}) after {attempt} attempts; kept {kept} bytes in "
                f"{part}, run again to resume"
            )
    _check(url, part, size, sha256, verify)
    with open(part, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest
