"""Strict JSON, manifests, directories published whole, run-directory locks (mdaf_dist.files)."""

import json
import os
import socket

import pytest

from mdaf_dist.errors import UserError
from mdaf_dist.files import DirectoryLock, published_directory, read_json, verify_manifest, write_json, write_manifest


def test_json_is_strict_and_missing_numbers_are_null(tmp_path):
    write_json(tmp_path / "r.json", {"auc": float("nan"), "loss": [float("-inf"), 0.5]})
    text = (tmp_path / "r.json").read_text()

    def refuse(token):
        raise ValueError(token)

    assert json.loads(text, parse_constant=refuse) == {"auc": None, "loss": [None, 0.5]}


def test_corrupt_json_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "meta.json").write_text('{"rows": ')
    with pytest.raises(UserError, match=r"meta.json is not valid JSON \(prepared data\)"):
        read_json(tmp_path / "meta.json", "prepared data")


def _filled(directory):
    (directory / "sub").mkdir(parents=True)
    (directory / "a.bin").write_bytes(b"x" * 10_000)
    (directory / "sub" / "b.txt").write_text("hello")


def test_manifest_accepts_intact_and_names_what_changed(tmp_path):
    _filled(tmp_path)
    write_manifest(tmp_path)
    verify_manifest(tmp_path, "checkpoint")
    with open(tmp_path / "a.bin", "r+b") as f:
        f.seek(4000)
        f.write(b"y" * 100)
    verify_manifest(tmp_path, "checkpoint", checksums=False)  # same size: only the checksum tells
    with pytest.raises(UserError, match=r"damaged checkpoint: a.bin does not match its SHA-256"):
        verify_manifest(tmp_path, "checkpoint")
    with open(tmp_path / "a.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=r"damaged checkpoint: a.bin has 100 bytes, its manifest says 10000"):
        verify_manifest(tmp_path, "checkpoint")
    (tmp_path / "sub" / "b.txt").unlink()
    with pytest.raises(UserError, match=r"sub/b.txt is missing|a.bin has 100 bytes"):
        verify_manifest(tmp_path, "checkpoint")


def test_manifest_missing_means_incomplete(tmp_path):
    _filled(tmp_path)
    with pytest.raises(UserError, match=r"not a complete checkpoint: it has no manifest.json"):
        verify_manifest(tmp_path, "checkpoint")


def test_published_directory_replaces_owned_entries_and_keeps_the_users(tmp_path):
    final = tmp_path / "data"
    final.mkdir()
    (final / "notes.txt").write_text("mine")
    (final / "samples" / "test").mkdir(parents=True)
    (final / "samples" / "test" / "old.parquet").write_text("stale")
    (final / "meta.json").write_text("{}")
    with published_directory(final, owned=["samples", "meta.json", "rejects.csv"], last="meta.json") as staging:
        (staging / "samples" / "train").mkdir(parents=True)
        (staging / "samples" / "train" / "part.parquet").write_text("new")
        (staging / "meta.json").write_text('{"new": true}')
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == [
        "meta.json", "notes.txt", "samples", "samples/train", "samples/train/part.parquet"
    ]
    assert (final / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_published_directory_failure_leaves_the_old_directory(tmp_path):
    final = tmp_path / "data"
    final.mkdir()
    (final / "meta.json").write_text("old")
    with pytest.raises(RuntimeError):
        with published_directory(final, owned=["meta.json"], last="meta.json") as staging:
            (staging / "meta.json").write_text("new")
            raise RuntimeError("killed")
    assert (final / "meta.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    with DirectoryLock(tmp_path / "run"):
        with pytest.raises(UserError) as refused:
            DirectoryLock(tmp_path / "run").acquire()
    assert str(refused.value) == (
        f"{tmp_path / 'run'} is in use by another run (pid {os.getpid()} on {socket.gethostname()}); wait for it or stop it first"
    )
    with DirectoryLock(tmp_path / "run"):  # released: free again
        pass
