"""Writing files atomically (checkpoints and configs)."""

from emcaps.training.checkpoint import atomic_write_bytes


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_bytes(tmp_path / "f", b"one")
    atomic_write_bytes(tmp_path / "f", b"two")
    assert (tmp_path / "f").read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["f"]
