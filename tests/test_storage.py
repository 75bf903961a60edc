"""The run folder's file system and the journal's lock: which mounts `start` warns about."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FakeBackend, invoke
from test_cli import fake_backend  # noqa: F401 - the fixture

from orchestrator.cli import launch
from orchestrator.runs import storage
from orchestrator.runs.storage import lock_warning, mount_of, parse_mountinfo

ROOT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro"


def line(number: int, mount_point: str, fs_type: str, options: str = "rw", source: str = "server:/export") -> str:
    return f"{number} 22 0:{number} / {mount_point} rw,relatime shared:{number} - {fs_type} {source} {options}"


@pytest.mark.parametrize(("fs_type", "options", "expected"), [
    ("ext4", "rw", None),
    ("tmpfs", "rw,size=2m", None),
    ("nfs4", "rw,vers=4.2,rsize=1048576,hard,proto=tcp,local_lock=none,addr=10.0.0.2", None),
    ("nfs", "rw,vers=4.1,hard,local_lock=none", None),
    ("nfs", "rw,vers=3,hard,proto=tcp,mountproto=udp,local_lock=none",
     "NFS version 3: its lock is sound only while the lockd and statd services run"),
    ("nfs", "rw,vers=3,nolock,local_lock=all", "mounted with nolock: its locks stay on each host"),
    ("nfs4", "rw,vers=4.2,local_lock=flock", "mounted with local_lock=flock: its locks stay on each host"),
    ("fuse.sshfs", "rw,user_id=0", "on fuse.sshfs (/shared), whose locks evolvectl cannot vouch for"),
    ("cifs", "rw,vers=3.1.1", "on cifs (/shared), whose locks evolvectl cannot vouch for"),
])
def test_which_file_systems_get_a_lock_warning(fs_type: str, options: str, expected: str | None) -> None:
    mountinfo = "\n".join([ROOT, line(30, "/shared", fs_type, options)])
    warning = lock_warning(Path("/shared/runs/evolve/big"), mountinfo)
    assert (warning is None) if expected is None else (expected in warning), warning


def test_the_deepest_mount_holds_a_path_and_escaped_spaces_are_read() -> None:
    entries = parse_mountinfo("\n".join([ROOT, line(30, "/shared", "nfs", "rw,vers=3,nolock"),
                                         line(31, "/shared/local\\040disk", "ext4", "rw", "/dev/sdb1"),
                                         "garbage line without a separator"]))
    assert [entry.mount_point for entry in entries] == ["/", "/shared", "/shared/local disk"]
    assert mount_of(Path("/shared/local disk/runs"), entries).fs_type == "ext4"
    assert mount_of(Path("/shared/runs"), entries).fs_type == "nfs"
    assert mount_of(Path("/sharedother/runs"), entries).fs_type == "ext4"  # a prefix of the name is not a parent
    assert lock_warning(Path("/shared/local disk/runs"), "\n".join(
        [ROOT, line(30, "/shared", "nfs", "rw,vers=3,nolock"), line(31, "/shared/local\\040disk", "ext4")])) is None


def test_this_machines_own_run_folder_reads_its_real_mounts(tmp_path: Path) -> None:
    entry = mount_of(tmp_path, parse_mountinfo(storage.MOUNTINFO.read_text()))
    assert entry is not None and entry.fs_type  # the real mountinfo parses, and something holds every path


def test_start_warns_about_a_run_folder_on_nfs3_without_lock(fake_backend: FakeBackend, tmp_path: Path,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    mountinfo = "\n".join([ROOT, line(30, str(tmp_path), "nfs", "rw,vers=3,nolock")])
    monkeypatch.setattr(launch, "lock_warning", lambda path: lock_warning(path, mountinfo))
    result = invoke("start", "--cpu-workers", "1")
    assert result.exit_code == 0, result.output
    assert "Warning: " in result.output and "mounted with nolock: its locks stay on each host" in result.output
    assert len(fake_backend.plans) == 1  # a warning, not a refusal: one host is still sound
