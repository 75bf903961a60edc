"""Whether the file system under a run folder keeps the journal's lock sound across hosts.

The journal takes `filelock`'s flock(2) on evolve.lock. Local file systems and NFSv4 (Linux
maps flock to locks the server holds) exclude writers on every host. NFSv3 needs the lockd and
statd services on server and clients, which a client cannot check; `nolock` and
`local_lock=flock|all` mounts keep locks on each host, so two hosts can append at once; FUSE
and SMB file systems give no such promise. `lock_warning` names those cases so that `start`
can say so before workers share such a folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
# Local (or block-device) file systems: one kernel sees every lock.
LOCAL_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs", "overlay", "ramfs",
                         "jfs", "reiserfs", "bcachefs", "vfat", "exfat", "ntfs3", "squashfs"})


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo: where it is mounted, its type and its options."""

    mount_point: str
    fs_type: str
    options: frozenset[str]  # the mount's and the superblock's, e.g. "vers=4.2", "nolock"

    def option(self, name: str) -> str | None:
        """The value of `name=value`, or "" for a bare flag; None when absent."""
        for option in self.options:
            key, _, value = option.partition("=")
            if key == name:
                return value
        return None


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The entries of a mountinfo file (see proc(5)): the mount point is the fifth field, with
    spaces written as \\040; after the lone "-" come the type, the source and the super options."""
    entries = []
    for line in text.splitlines():
        before, separator, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not separator or len(fields) < 6 or len(tail) < 2:
            continue
        mount_point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        options = set(fields[5].split(",")) | (set(tail[2].split(",")) if len(tail) > 2 else set())
        entries.append(MountEntry(mount_point, tail[0], frozenset(options)))
    return entries


def mount_of(path: Path, entries: list[MountEntry]) -> MountEntry | None:
    """The mount holding `path`: the longest mount point above it (the last mounted wins a tie)."""
    resolved = path.resolve()
    best = None
    for entry in entries:
        point = Path(entry.mount_point)
        if (resolved == point or point in resolved.parents) and (best is None or
                                                                 len(entry.mount_point) >= len(best.mount_point)):
            best = entry
    return best


def lock_warning(path: Path, mountinfo: str | None = None) -> str | None:
    """A sentence for a run folder whose file system may not exclude writers on other hosts;
    None where the lock is sound (or the mounts cannot be read)."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    entry = mount_of(path, parse_mountinfo(mountinfo))
    if entry is None or entry.fs_type in LOCAL_TYPES:
        return None
    where = f"{path} is on {entry.fs_type} ({entry.mount_point})"
    if entry.fs_type in ("nfs", "nfs4"):
        version = entry.option("vers") or entry.option("nfsvers") or ("4" if entry.fs_type == "nfs4" else "3")
        local_lock = entry.option("local_lock")
        if entry.option("nolock") is not None or local_lock in ("flock", "all"):
            flag = "nolock" if entry.option("nolock") is not None else f"local_lock={local_lock}"
            return (f"{where}, mounted with {flag}: its locks stay on each host, so workers on two hosts can "
                    "write evolve.csv at once. Remount without it (NFSv4.1 or later is best), or keep one host")
        if version.startswith("4"):
            return None
        return (f"{where}, NFS version {version}: its lock is sound only while the lockd and statd services run "
                "on the server and on every host. NFSv4.1 or later (mount -o vers=4.1) needs neither")
    return (f"{where}, whose locks evolvectl cannot vouch for across hosts: keep the workers of a run on one "
            "host, or put the run folder on a local disk or on NFSv4")
