"""The PTB-XL downloader against a real HTTP server on loopback that serves a PhysioNet-shaped tree.

The served tree is a subset of the shared PTB-XL files (symlinked into tmp_path, never copied into the
repository) with the checksums PhysioNet publishes for them. The server speaks HTTP/1.1 with Range
support and can be told to cut a response short or to ignore Range, as real mirrors sometimes do.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from crema.data.download import CHECKSUM_FILE, DownloadError, download_ptbxl

TOP_LEVEL = ["LICENSE.txt", "ptbxl_database.csv", "scp_statements.csv"]
N_RECORDS = 10
RECORDS = [f"records100/00000/{i:05d}_lr.{ext}" for i in range(1, N_RECORDS + 1) for ext in ("hea", "dat")] + \
          [f"records500/00000/{i:05d}_hr.{ext}" for i in range(1, N_RECORDS + 1) for ext in ("hea", "dat")]
BIG_RECORD = "records500/00000/00003_hr.dat"  # 120,000 bytes: room to cut it part-way


@dataclass
class ServerState:
    root: Path
    supports_range: bool = True
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the connection drops (once)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class PhysioNetHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "MirrorServer"

    def do_GET(self):
        state = self.server.state
        relative = unquote(urlsplit(self.path).path).removeprefix("/files/ptb-xl/1.0.3/")
        state.requests.append((relative, self.headers.get("Range")))
        file = state.root / relative
        if ".." in Path(relative).parts or not file.is_file():
            self._send(404, b"not found")
            return
        data = file.read_bytes()
        requested = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")) if state.supports_range else None
        if requested and int(requested.group(1)) >= len(data):
            self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            return
        start = int(requested.group(1)) if requested else 0
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if requested else {}
        self._send(206 if requested else 200, data[start:], headers, cut=state.cut_after.pop(relative, None))

    def _send(self, status: int, body: bytes, headers: dict | None = None, cut: int | None = None):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes" if self.server.state.supports_range else "none")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True  # fewer bytes than Content-Length, then EOF: a dropped transfer

    def log_message(self, *args):
        pass


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: ServerState):
        super().__init__(("127.0.0.1", 0), PhysioNetHandler)
        self.state = state

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/files/ptb-xl/1.0.3/"


@pytest.fixture(scope="module")
def published_checksums(ptbxl_root) -> dict[str, str]:
    sums = {}
    for line in (ptbxl_root / CHECKSUM_FILE).read_text().splitlines():
        digest, relative = line.split(maxsplit=1)
        sums[relative] = digest
    return {relative: sums[relative] for relative in TOP_LEVEL + RECORDS}


@pytest.fixture
def mirror(tmp_path, ptbxl_root, published_checksums):
    served = tmp_path / "served"
    for relative in published_checksums:
        (served / relative).parent.mkdir(parents=True, exist_ok=True)
        (served / relative).symlink_to(ptbxl_root / relative)
    write_checksums(served, published_checksums)
    server = MirrorServer(ServerState(root=served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def write_checksums(served: Path, sums: dict[str, str], extra_lines: tuple[str, ...] = ()):
    lines = [f"{digest}  {relative}" for relative, digest in sums.items()]  # two spaces, as sha256sum writes
    (served / CHECKSUM_FILE).write_text("\n".join(lines + list(extra_lines)) + "\n")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_requests(server: MirrorServer) -> list[tuple[str, str | None]]:
    return [(path, rng) for path, rng in server.state.requests if path != CHECKSUM_FILE]


def test_full_download_matches_the_published_checksums_and_a_second_run_skips_everything(
        mirror, tmp_path, published_checksums):
    dest = tmp_path / "ptbxl"
    report = download_ptbxl(dest, base_url=mirror.base_url, workers=4, progress=True)
    assert report.downloaded == sorted(published_checksums)
    assert report.failed == {} and report.skipped == []
    for relative, digest in published_checksums.items():
        assert sha256(dest / relative) == digest, relative
    assert not list(dest.rglob("*.part"))
    assert report.bytes_downloaded == sum((dest / r).stat().st_size for r in published_checksums)

    mirror.state.requests.clear()
    again = download_ptbxl(dest, base_url=mirror.base_url, workers=4, progress=False)
    assert again.skipped == sorted(published_checksums)
    assert again.downloaded == [] and again.bytes_downloaded == 0
    assert file_requests(mirror) == []  # only the checksum list was fetched


def test_include_limits_the_record_folders_but_keeps_the_tables(mirror, tmp_path):
    dest = tmp_path / "ptbxl"
    report = download_ptbxl(dest, base_url=mirror.base_url, include=("records100",), workers=2, progress=False)
    assert not (dest / "records500").exists()
    assert all((dest / name).is_file() for name in TOP_LEVEL)
    assert len(list((dest / "records100" / "00000").glob("*_lr.dat"))) == N_RECORDS
    assert {r.split("/")[0] for r in report.downloaded} == {"records100", *TOP_LEVEL}


def test_an_interrupted_download_leaves_a_part_file_that_the_next_run_resumes_with_range(
        mirror, tmp_path, published_checksums):
    dest = tmp_path / "ptbxl"
    mirror.state.cut_after[BIG_RECORD] = 50_000
    with pytest.raises(DownloadError, match=re.escape(BIG_RECORD)) as err:
        download_ptbxl(dest, base_url=mirror.base_url, workers=4, progress=False, retries=0)
    assert list(err.value.report.failed) == [BIG_RECORD]
    part = dest / (BIG_RECORD + ".part")
    assert part.stat().st_size == 50_000
    assert not (dest / BIG_RECORD).exists()

    mirror.state.requests.clear()
    report = download_ptbxl(dest, base_url=mirror.base_url, workers=4, progress=False, retries=0)
    assert report.downloaded == [BIG_RECORD]
    assert file_requests(mirror) == [(BIG_RECORD, "bytes=50000-")]
    assert report.bytes_downloaded == 120_000 - 50_000
    assert sha256(dest / BIG_RECORD) == published_checksums[BIG_RECORD]
    assert not part.exists()


def test_a_dropped_connection_is_retried_from_where_it_stopped_within_one_run(mirror, tmp_path, published_checksums):
    dest = tmp_path / "ptbxl"
    mirror.state.cut_after[BIG_RECORD] = 30_000
    report = download_ptbxl(dest, base_url=mirror.base_url, workers=2, progress=False, retries=2, backoff_s=0.01)
    assert BIG_RECORD in report.downloaded
    assert [rng for path, rng in file_requests(mirror) if path == BIG_RECORD] == [None, "bytes=30000-"]
    assert sha256(dest / BIG_RECORD) == published_checksums[BIG_RECORD]


def test_a_server_that_ignores_range_gets_a_fresh_full_download(mirror, tmp_path, published_checksums):
    dest = tmp_path / "ptbxl"
    mirror.state.supports_range = False
    part = dest / (BIG_RECORD + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 1000)  # wrong bytes: appending the 200 body to them would fail the checksum
    download_ptbxl(dest, base_url=mirror.base_url, workers=2, progress=False)
    assert [rng for path, rng in file_requests(mirror) if path == BIG_RECORD] == ["bytes=1000-"]
    assert sha256(dest / BIG_RECORD) == published_checksums[BIG_RECORD]


def test_a_complete_part_file_is_verified_and_moved_into_place(mirror, tmp_path, ptbxl_root, published_checksums):
    dest = tmp_path / "ptbxl"
    part = dest / (BIG_RECORD + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes((ptbxl_root / BIG_RECORD).read_bytes())
    report = download_ptbxl(dest, base_url=mirror.base_url, workers=2, progress=False)
    assert BIG_RECORD in report.downloaded
    assert sha256(dest / BIG_RECORD) == published_checksums[BIG_RECORD]
    assert not part.exists()


def test_a_local_file_with_other_bytes_is_downloaded_again(mirror, tmp_path, published_checksums):
    dest = tmp_path / "ptbxl"
    dest.mkdir()
    (dest / "scp_statements.csv").write_text("tampered\n")
    report = download_ptbxl(dest, base_url=mirror.base_url, workers=2, progress=False)
    assert "scp_statements.csv" in report.downloaded
    assert sha256(dest / "scp_statements.csv") == published_checksums["scp_statements.csv"]


def test_a_file_whose_bytes_differ_from_the_checksum_list_fails_by_name(mirror, tmp_path, ptbxl_root):
    dest = tmp_path / "ptbxl"
    corrupted = "records100/00000/00002_lr.dat"
    served = mirror.state.root / corrupted
    data = bytearray((ptbxl_root / corrupted).read_bytes())
    data[100] ^= 0xFF
    served.unlink()
    served.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match=re.escape(corrupted)) as err:
        download_ptbxl(dest, base_url=mirror.base_url, workers=4, progress=False)
    report = err.value.report
    assert list(report.failed) == [corrupted]
    assert "checksum mismatch" in report.failed[corrupted]
    assert not (dest / corrupted).exists()
    assert not (dest / (corrupted + ".part")).exists()
    assert len(report.downloaded) == len(TOP_LEVEL) + len(RECORDS) - 1


def test_entries_that_point_outside_the_destination_are_refused(mirror, tmp_path, published_checksums):
    dest = tmp_path / "ptbxl"
    outside = tmp_path / "outside.txt"
    digest = "0" * 64
    hostile = ["../evil", "records100/../../evil", str(outside)]
    write_checksums(mirror.state.root, published_checksums, tuple(f"{digest}  {path}" for path in hostile))
    with pytest.raises(DownloadError, match=re.escape("../evil")) as err:
        download_ptbxl(dest, base_url=mirror.base_url, workers=4, progress=False)
    report = err.value.report
    assert sorted(report.failed) == sorted(hostile)
    assert all("outside the destination" in reason for reason in report.failed.values())
    assert not (tmp_path / "evil").exists() and not outside.exists()
    assert not any("evil" in path or "outside" in path for path, _ in mirror.state.requests)
    assert report.downloaded == sorted(published_checksums)  # the honest entries still arrive
