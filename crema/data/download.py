"""Resumable, checksum-verified download of a PhysioNet database (PTB-XL by default).

PhysioNet publishes ``SHA256SUMS.txt`` at the root of every database release, one
``<sha256> <relative path>`` line per file. That list is the download plan and the integrity check:
a file counts as downloaded only once its bytes hash to the listed digest. Interrupted transfers
leave ``<file>.part`` behind and continue from there with an HTTP Range request, so a 3 GB release
survives a flaky connection or a Ctrl-C.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import requests
import urllib3
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PTBXL_URL = "https://physionet.org/files/ptb-xl/1.0.3/"
CHECKSUM_FILE = "SHA256SUMS.txt"
CHUNK_BYTES = 1 << 20
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class DownloadError(RuntimeError):
    """Some files could not be fetched or verified; `report` says which and why."""

    def __init__(self, message: str, report: "DownloadReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclass
class DownloadReport:
    """What a download did: files downloaded, skipped (present and verified), failed, and bytes fetched."""

    dest: Path
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present with the right checksum
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> reason
    bytes_downloaded: int = 0

    def summary(self) -> str:
        return (f"{len(self.downloaded)} downloaded ({self.bytes_downloaded / 2**20:.1f} MiB), "
                f"{len(self.skipped)} already present, {len(self.failed)} failed")


class _Retryable(Exception):
    """A transient failure (connection dropped, 5xx): worth another attempt from the .part file."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def parse_checksums(text: str) -> list[tuple[str, str]]:
    """(sha256, relative path) per line of a ``sha256sum``-style list (one or two spaces, optional ``*``)."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or not _SHA256.fullmatch(parts[0]):
            raise DownloadError(f"{CHECKSUM_FILE} line {number} is not '<sha256> <path>': {line!r}")
        entries.append((parts[0].lower(), parts[1].strip().removeprefix("*")))
    return entries


def safe_target(dest: Path, relative: str) -> Path | None:
    """Where `relative` lands under `dest`, or None when it would land anywhere else."""
    if "\\" in relative or "\x00" in relative:
        return None
    posix = PurePosixPath(relative)
    if not posix.parts or posix.is_absolute() or ".." in posix.parts or ":" in posix.parts[0]:
        return None
    target = dest.joinpath(*posix.parts)
    # Also catches a symlinked folder inside dest that points elsewhere.
    return target if target.resolve().is_relative_to(dest.resolve()) else None


def _wanted(relative: str, include: tuple[str, ...]) -> bool:
    """Top-level files (the label tables, licence, RECORDS) always; deeper files only under `include`."""
    if "/" not in relative:
        return relative != CHECKSUM_FILE
    return any(relative.startswith(prefix.strip("/") + "/") for prefix in include)


class _Fetcher:
    """Downloads one file at a time per thread, each thread with its own HTTP session."""

    def __init__(self, base_url: str, retries: int, timeout: tuple[float, float], backoff_s: float, on_bytes):
        self.base_url = base_url.rstrip("/") + "/"
        self.retries = retries
        self.timeout = timeout
        self.backoff_s = backoff_s
        self.on_bytes = on_bytes
        self.stop = threading.Event()  # set on Ctrl-C so running transfers end at their next chunk
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def url(self, relative: str) -> str:
        return self.base_url + quote(relative)

    def _retrying(self, action):
        """Run `action` until it stops raising _Retryable, at most 1 + retries times, backing off."""
        for attempt in range(self.retries + 1):
            try:
                return action()
            except _Retryable as err:
                if attempt == self.retries:
                    raise DownloadError(f"gave up after {attempt + 1} attempt(s): {err}") from err
                time.sleep(self.backoff_s * 2**attempt)

    def get_text(self, relative: str) -> str:
        """A small text file (the checksum list), retried on transient errors."""
        def attempt() -> str:
            try:
                response = self.session.get(self.url(relative), timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as err:
                raise _Retryable(str(err)) from err
            if response.status_code in RETRY_STATUS:
                raise _Retryable(f"HTTP {response.status_code}")
            if response.status_code >= 400:
                raise DownloadError(f"HTTP {response.status_code} {response.reason}")
            return response.text
        try:
            return self._retrying(attempt)
        except DownloadError as err:
            raise DownloadError(f"cannot fetch {self.url(relative)}: {err}") from err

    def fetch(self, relative: str, target: Path, expected: str) -> None:
        """Download into ``target.part`` (resuming it), verify, then move into place."""
        part = target.with_name(target.name + ".part")
        target.parent.mkdir(parents=True, exist_ok=True)
        self._retrying(lambda: self._transfer(relative, part))
        actual = sha256_of(part)
        if actual != expected:
            part.unlink()
            raise DownloadError(f"checksum mismatch (expected {expected}, got {actual})")
        os.replace(part, target)

    def _transfer(self, relative: str, part: Path) -> None:
        """Fetch one file into its `.part`, resuming from what is already there (the caller verifies it)."""
        offset = part.stat().st_size if part.exists() else 0
        # Checksums and byte ranges refer to the file's own bytes, so no transfer compression.
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        try:
            with self.session.get(self.url(relative), headers=headers, stream=True, timeout=self.timeout) as response:
                if response.status_code == 416:
                    # Nothing left past the .part: it is complete (verified next) or longer than the file.
                    if _content_range_total(response.headers.get("Content-Range", "")) == offset:
                        return
                    part.unlink()
                    raise _Retryable("the partial file is longer than the server's copy")
                if response.status_code in RETRY_STATUS:
                    raise _Retryable(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    raise DownloadError(f"HTTP {response.status_code} {response.reason}")
                resumed = response.status_code == 206
                if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                    part.unlink()
                    raise _Retryable(f"the server answered another range: {response.headers.get('Content-Range')}")
                announced = response.headers.get("Content-Length")
                received = 0
                # A 200 answer to a Range request carries the whole file: start the .part over.
                with open(part, "ab" if resumed else "wb") as f:
                    # read1 hands over whatever has arrived, so a dropped connection loses no received bytes.
                    while chunk := response.raw.read1(CHUNK_BYTES, decode_content=False):
                        if self.stop.is_set():
                            raise DownloadError("interrupted (the .part file resumes next time)")
                        f.write(chunk)
                        received += len(chunk)
                        self.on_bytes(len(chunk))
                if announced is not None and received < int(announced):
                    raise _Retryable(f"connection closed after {received} of {announced} bytes")
        except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as err:
            raise _Retryable(str(err)) from err


def _content_range_total(header: str) -> int | None:
    """The complete length from ``bytes */1234`` (a 416 answer), if the server gave one."""
    match = re.fullmatch(r"bytes \*/(\d+)", header.strip())
    return int(match.group(1)) if match else None


def download_ptbxl(
    dest: Path,
    base_url: str = PTBXL_URL,
    include: tuple[str, ...] = ("records100", "records500"),
    workers: int = 8,
    progress: bool = True,
    retries: int = 3,
    timeout: tuple[float, float] = (10.0, 60.0),
    backoff_s: float = 1.0,
) -> DownloadReport:
    """Mirror the files listed in `base_url`/SHA256SUMS.txt into `dest`, verified and resumable.

    Record folders are fetched only under the `include` prefixes (``records100``, the 100 Hz set, is
    about 0.5 GB; ``records500`` about 2.6 GB); top-level files (the label tables) always.
    Files already present with the right checksum are skipped. Raises DownloadError at the end,
    with the report attached, when any file failed; otherwise returns the report.
    """
    if retries < 0:
        raise ValueError("retries must be >= 0")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    report = DownloadReport(dest=dest)
    lock = threading.Lock()
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[mib]:.1f} MiB"), TimeElapsedColumn(), disable=not progress,
    ) as bar:
        task = bar.add_task("PTB-XL", total=None, mib=0.0)

        def count_bytes(n: int) -> None:
            with lock:
                report.bytes_downloaded += n
                bar.update(task, mib=report.bytes_downloaded / 2**20)

        fetcher = _Fetcher(base_url, retries, timeout, backoff_s, count_bytes)
        checksums_text = fetcher.get_text(CHECKSUM_FILE)
        plan = []
        for expected, relative in parse_checksums(checksums_text):
            target = safe_target(dest, relative)
            if target is None:
                report.failed[relative] = "refused: the path points outside the destination folder"
            elif _wanted(relative, include):
                plan.append((relative, target, expected))
        (dest / CHECKSUM_FILE).write_text(checksums_text)
        bar.update(task, total=len(plan))

        def one(relative: str, target: Path, expected: str) -> str:
            if target.is_file() and sha256_of(target) == expected:
                return "skipped"
            fetcher.fetch(relative, target, expected)
            return "downloaded"

        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        try:
            futures = {pool.submit(one, *item): item[0] for item in plan}
            for future in as_completed(futures):
                relative = futures[future]
                try:
                    outcome = future.result()
                except (DownloadError, OSError) as err:
                    report.failed[relative] = str(err)
                else:
                    (report.skipped if outcome == "skipped" else report.downloaded).append(relative)
                bar.advance(task)
        except BaseException:
            fetcher.stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    report.downloaded.sort()
    report.skipped.sort()
    if report.failed:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in sorted(report.failed.items())[:20])
        more = f"\n  ... and {len(report.failed) - 20} more" if len(report.failed) > 20 else ""
        raise DownloadError(f"{len(report.failed)} file(s) failed ({report.summary()}):\n{listed}{more}", report)
    return report
