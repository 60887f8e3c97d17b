"""`zpipe export dockerfile`: a user's folder of stages, with its requirements, on the zpipe image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import zpipe

ZPIPE = [sys.executable, "-m", "zpipe"]
PIPELINE = """
[pipeline]
name = "Shop"
[[stages]]
name = "fetch"
run = "fetchers:fetch"
[[stages]]
name = "save"
run = "savers:save"
volumes = ["out", "reports/daily"]
"""


def project(tmp_path: Path, requirements: bool = True) -> Path:
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "pipeline.toml").write_text(PIPELINE)
    (folder / "fetchers.py").write_text("def fetch():\n    yield from range(3)\n")
    (folder / "savers.py").write_text("def save(item):\n    print(item)\n")
    if requirements:
        (folder / "requirements.txt").write_text("six\n")
    return folder


def export(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZPIPE, "export", "dockerfile", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_the_folder_and_its_requirements_go_on_the_zpipe_image(tmp_path):
    project(tmp_path)
    result = export(tmp_path, "shop/pipeline.toml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"ARG ZPIPE_IMAGE=zpipe:{zpipe.__version__}" in lines
    assert "FROM ${ZPIPE_IMAGE}" in lines
    assert "COPY shop/requirements.txt /tmp/zpipe-stage-requirements.txt" in lines
    # Offline from a wheelhouse when the context has one; from the index otherwise.
    assert any("--no-index --find-links /tmp/context/wheelhouse" in line for line in lines)
    copy = lines.index("COPY --chown=10001:10001 shop ./shop")
    assert copy > lines.index("COPY shop/requirements.txt /tmp/zpipe-stage-requirements.txt")
    # The folders the stages write exist, owned by the image's user, so a
    # volume mounted there is writable.
    assert "RUN mkdir -p shop/out shop/reports/daily && chown 10001:10001 shop/out " \
           "shop/reports/daily" in lines
    assert lines.index("USER 10001") > copy
    assert lines[-1] == 'CMD ["zpipe", "validate", "shop/pipeline.toml"]'
    assert "docker build -t zpipe-Shop:latest ." not in result.stdout  # image names are lowercase
    assert "docker build -t zpipe-shop:latest ." in result.stdout


def test_without_requirements_nothing_is_installed(tmp_path):
    folder = project(tmp_path, requirements=False)
    result = export(folder, "pipeline.toml")
    assert result.returncode == 0, result.stderr
    assert "pip install" not in result.stdout and "requirements" not in result.stdout
    assert "COPY --chown=10001:10001 . ./" in result.stdout.splitlines()
    assert "RUN mkdir -p out reports/daily" in result.stdout


def test_a_folder_outside_the_build_context_is_refused(tmp_path):
    project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = export(elsewhere, str(tmp_path / "shop" / "pipeline.toml"))
    assert result.returncode == 2 and "not inside the build context" in result.stderr
