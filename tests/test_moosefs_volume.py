"""`bootstrap.volume.filesystem` reads mountinfo as RunPod's volume shows it (no root needed)."""

from __future__ import annotations

from pathlib import Path

from bootstrap import volume as volmod

MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u
45 22 0:40 / /runpod-volume rw,nosuid,nodev,relatime - fuse mfs\\04310.0.0.9:9421 rw,user_id=0
46 22 0:41 / /my\\040data rw - ext4 /dev/vdb1 rw
47 45 0:42 / /runpod-volume/scratch rw - tmpfs tmpfs rw
"""


def test_names_moosefs_and_the_longest_mount(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    fs = volmod.filesystem(Path("/runpod-volume/.bootstrap/envs"), info)
    assert (fs.mount_point, fs.type, fs.source, fs.name) == (
        Path("/runpod-volume"),
        "fuse",
        "mfs#10.0.0.9:9421",
        "MooseFS",
    )
    assert fs.describe() == "MooseFS (fuse, mfs#10.0.0.9:9421) at /runpod-volume"
    assert volmod.filesystem(Path("/runpod-volume/scratch/x"), info).type == "tmpfs"
    assert volmod.filesystem(Path("/my data/x"), info).describe() == "ext4 at /my data"
    assert volmod.filesystem(Path("/etc"), info).name == "overlay"


def test_unreadable_mountinfo_is_unknown(tmp_path: Path) -> None:
    fs = volmod.filesystem(tmp_path, tmp_path / "absent")
    assert fs.type == "unknown" and fs.name == "unknown"
