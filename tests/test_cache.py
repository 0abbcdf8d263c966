import os

import pytest

from irc.cache import atomic_dir, atomic_file, cache_dir, cached_sha256, sha256_files


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("IRC_CACHE", str(tmp_path / "c"))
    assert cache_dir("models") == tmp_path / "c" / "models"
    assert (tmp_path / "c" / "models").is_dir()


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert not final.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_dir_keeps_a_concurrent_winner(tmp_path):
    final = tmp_path / "entry"
    with atomic_dir(final) as tmp:
        (tmp / "mine").write_text("a")
        final.mkdir()  # another process finished first
        (final / "theirs").write_text("b")
    assert sorted(os.listdir(final)) == ["theirs"]
    assert os.listdir(tmp_path) == ["entry"]


def test_atomic_file(tmp_path):
    target = tmp_path / "f.txt"
    with pytest.raises(ValueError), atomic_file(target, "w") as f:
        f.write("partial")
        raise ValueError
    assert not target.exists() and os.listdir(tmp_path) == []
    with atomic_file(target, "w") as f:
        f.write("whole")
    assert target.read_text() == "whole"


def test_cached_sha256_tracks_content(tmp_path):
    import hashlib

    p = tmp_path / "w.bin"
    p.write_bytes(b"weights-1")
    expected = hashlib.sha256(b"w.bin\0weights-1").hexdigest()
    assert sha256_files([p]) == expected
    assert cached_sha256([p]) == expected
    assert cached_sha256([p]) == expected  # memoised
    p.write_bytes(b"weights-2 longer")
    assert cached_sha256([p]) == hashlib.sha256(b"w.bin\0weights-2 longer").hexdigest()
