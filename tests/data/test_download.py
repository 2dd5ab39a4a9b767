import hashlib

import pytest

from emcaps.data.download import ChecksumError, DownloadError, fetch

from .http_server import FileServer, closed_port_url

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def test_success_and_no_second_request(tmp_path):
    with FileServer({"f.bin": PAYLOAD}) as server:
        path = fetch(server.base_url + "f.bin", tmp_path / "f.bin", size=len(PAYLOAD), sha256=DIGEST,
                     progress=False)
        assert path.read_bytes() == PAYLOAD
        assert not (tmp_path / "f.bin.part").exists()
        fetch(server.base_url + "f.bin", tmp_path / "f.bin", size=len(PAYLOAD), sha256=DIGEST, progress=False)
        assert len(server.requests) == 1


def test_checksum_mismatch_leaves_nothing(tmp_path):
    corrupt = bytearray(PAYLOAD)
    corrupt[5000] ^= 0xFF
    with FileServer({"f.bin": bytes(corrupt)}) as server:
        with pytest.raises(ChecksumError, match=r"f\.bin: downloaded file is corrupt \(SHA-256"):
            fetch(server.base_url + "f.bin", tmp_path / "f.bin", size=len(PAYLOAD), sha256=DIGEST,
                  progress=False)
    assert list(tmp_path.iterdir()) == []


def test_size_mismatch_leaves_nothing(tmp_path):
    with FileServer({"f.bin": PAYLOAD[:-1]}) as server:
        with pytest.raises(ChecksumError, match="size 102399 bytes, expected 102400"):
            fetch(server.base_url + "f.bin", tmp_path / "f.bin", size=len(PAYLOAD), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_content_check_rejects(tmp_path):
    def reject(path):
        raise ValueError("not what we wanted")

    with FileServer({"f.bin": PAYLOAD}) as server:
        with pytest.raises(ChecksumError, match="content check failed: not what we wanted"):
            fetch(server.base_url + "f.bin", tmp_path / "f.bin", verify=reject, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_dropped_connection_then_resume_on_next_call(tmp_path):
    with FileServer({"f.bin": PAYLOAD}, drop_after={"f.bin": 30000}) as server:
        url = server.base_url + "f.bin"
        with pytest.raises(DownloadError, match="connection dropped.*run again to resume") as info:
            fetch(url, tmp_path / "f.bin", size=len(PAYLOAD), sha256=DIGEST, retries=0, progress=False)
        assert url in str(info.value)
        part = tmp_path / "f.bin.part"
        assert part.stat().st_size == 30000
        assert not (tmp_path / "f.bin").exists()
        fetch(url, tmp_path / "f.bin", size=len(PAYLOAD), sha256=DIGEST, retries=0, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert not part.exists()
    assert server.requests == [("f.bin", None), ("f.bin", "bytes=30000-")]


def test_dropped_connection_retried_automatically(tmp_path):
    with FileServer({"f.bin": PAYLOAD}, drop_after={"f.bin": 777}) as server:
        fetch(server.base_url + "f.bin", tmp_path / "f.bin", size=len(PAYLOAD), sha256=DIGEST, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert server.requests == [("f.bin", None), ("f.bin", "bytes=777-")]


def test_offline_names_the_url(tmp_path):
    url = closed_port_url()
    with pytest.raises(DownloadError, match="could not connect") as info:
        fetch(url, tmp_path / "file.bin", progress=False)
    assert url in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_http_404(tmp_path):
    with FileServer({}) as server, pytest.raises(DownloadError, match="HTTP error 404"):
        fetch(server.base_url + "missing.bin", tmp_path / "missing.bin", progress=False)
