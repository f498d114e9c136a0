"""`bootstrap.fastfs`: the parallel file work for a slow-metadata volume, on local disk and on
the MooseFS fixture (skipped there where MooseFS cannot run)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap import fastfs
from tests import moosefs as mfs


def _tree(root: Path) -> Path:
    pkg = root / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for i in range(40):
        (pkg / f"m{i}.py").write_text(f"X = {i}\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.m3 import X\nY = X * 2\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def (:\n")  # does not compile: left without bytecode
    (pkg / "data.bin").write_bytes(os.urandom(3_000_000))
    (pkg / "link.py").symlink_to("m1.py")
    os.utime(pkg / "m1.py", (1_600_000_000, 1_600_000_000))
    return pkg


def _import_y(path: Path) -> subprocess.CompletedProcess[str]:
    # -X importtime is not needed: `-v` says whether bytecode was used ("matches") or recompiled
    return subprocess.run(
        [sys.executable, "-v", "-c", "import pkg.sub; print(pkg.sub.Y)"],
        cwd=path,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )


@pytest.fixture(params=["local", "moosefs"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "local":
        yield tmp_path
        return
    if mfs.unavailable_reason():
        pytest.skip(mfs.unavailable_reason() or "")
    fs: mfs.MooseFS = request.getfixturevalue("moosefs")
    root = fs.a / f"fastfs-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=False)


def test_compile_then_copy_keeps_bytecode_valid(tmp_path: Path, where: Path) -> None:
    src = _tree(tmp_path / "build")
    compiled = fastfs.compile_tree(src, threads=8, procs=2)
    assert compiled == 43  # every .py (the symlink too) but bad.py, which does not compile
    assert not list((src / "__pycache__").glob("bad.*.pyc"))
    dst = where / "published"
    files, nbytes = fastfs.copy_tree(tmp_path / "build", dst, threads=8)
    assert nbytes >= 3_000_000 and files >= 44
    assert (dst / "pkg" / "link.py").is_symlink() and os.readlink(dst / "pkg" / "link.py") == "m1.py"
    assert (dst / "pkg" / "m1.py").stat().st_mtime == 1_600_000_000
    assert (dst / "pkg" / "data.bin").read_bytes() == (src / "data.bin").read_bytes()
    out = _import_y(dst)
    assert out.stdout.strip() == "6"
    # the copied bytecode is used as is: its header's source mtime and size still match
    assert "matches" in out.stderr and f"code object from '{dst}" in out.stderr
    assert "bytecode is stale" not in out.stderr
    with pytest.raises(FileExistsError):
        fastfs.copy_tree(tmp_path / "build", dst)


def test_imported_files_and_prefetch(tmp_path: Path, where: Path) -> None:
    pkg = _tree(where / "lib")
    files = fastfs.imported_files(
        Path(sys.executable),
        ["pkg.sub", "no_such_module"],
        under=where / "lib",
        pythonpath=str(where / "lib"),
    )
    assert str(pkg / "sub" / "__init__.py") in files and str(pkg / "m3.py") in files
    assert str(pkg / "m5.py") not in files  # never imported
    assert fastfs.prefetch([*files, str(where / "missing")]) == sum(Path(f).stat().st_size for f in files)
    # the boot-time helper form: paths relative to the env root, absolute ones ignored
    listing = tmp_path / "prefetch.list"
    listing.write_text("".join(f"{Path(f).relative_to(where / 'lib')}\n" for f in files) + "/etc/hostname\n")
    out = subprocess.run(
        [sys.executable, fastfs.__file__, "prefetch", str(where / "lib"), str(listing)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(out.stdout) == sum(Path(f).stat().st_size for f in files)
