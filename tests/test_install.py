"""The installer and the units: idempotent install into a tree, units that systemd accepts
and scores as hardened (issue 5, items 1 and 4)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install"
UNITS = ("dashsos.service", "dashsos-dispatch.service")


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(INSTALL), "--root", str(root), *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _snapshot(root: Path) -> dict[str, str]:
    """Every file with its content hash; inside the venv, names only (pip rewrites)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if "__pycache__" in rel or path.is_dir():
            continue
        if rel.startswith("opt/dashsos/venv/"):
            out[rel] = ""
        elif path.is_symlink():
            out[rel] = "-> " + str(path.readlink())
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("root")
    first = _install(root)
    snapshot = _snapshot(root)
    second = _install(root)
    assert _snapshot(root) == snapshot, "a second install changed the tree"
    return root, first.stdout, second.stdout


def test_install_twice_gives_the_same_tree(installed: tuple[Path, str, str]) -> None:
    root, first, second = installed
    assert "skipping Pi-only packages" in first  # this is not a Pi
    assert "already installed" in second and "kept" in second
    assert (root / "etc/dashsos/config.toml").read_text() == \
        (REPO / "config/dashsos.toml").read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/dashsos.service").is_symlink()
    passwd = (root / "etc/passwd").read_text()
    assert "dashsos:" in passwd and "/usr/sbin/nologin" in passwd
    groups = {line.split(":")[0]: line.split(":")[3]
              for line in (root / "etc/group").read_text().splitlines()}
    assert all("dashsos" in groups[g] for g in ("video", "audio", "gpio"))
    dashsos = root / "opt/dashsos/venv/bin/dashsos"
    assert subprocess.run([str(dashsos), "--version"], capture_output=True).returncode == 0
    # The desk's street map ships inside the installed package (not only in this checkout).
    leaflet = list((root / "opt/dashsos/venv/lib").glob(
        "python3*/site-packages/dashsos/dispatch/console/vendor/leaflet"))
    assert leaflet and (leaflet[0] / "leaflet.js").stat().st_size > 100_000, leaflet
    assert (leaflet[0] / "leaflet.css").is_file() and (leaflet[0] / "LICENSE").is_file()


def test_config_is_never_overwritten(installed: tuple[Path, str, str], tmp_path: Path) -> None:
    root, _, _ = installed
    config = root / "etc/dashsos/config.toml"
    config.write_text('[vehicle]\nid = "van-9"\n')
    _install(root)
    assert config.read_text() == '[vehicle]\nid = "van-9"\n'
    assert (root / "etc/dashsos/config.toml.dist").exists()


def test_installed_units_pass_systemd_analyze_verify(installed: tuple[Path, str, str]) -> None:
    root, _, _ = installed
    # verify resolves the units' dependencies (sysinit.target, ...) inside the root.
    system = root / "usr/lib/systemd/system"
    if not system.exists():
        shutil.copytree("/usr/lib/systemd/system", system, symlinks=True)
    units = [str(root / "etc/systemd/system" / u) for u in UNITS]
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *units],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_hardened(unit: str) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=25",
                             str(REPO / "systemd" / unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
    score = float(result.stdout.strip().splitlines()[-1].split("level for")[1].split(":")[1]
                  .split()[0])
    assert score <= 2.5, score


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = _install(root, "--dry-run")
    assert "would run:" in result.stdout
    assert not (root / "etc").exists() and not (root / "opt").exists()
