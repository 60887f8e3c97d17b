"""`zpipe export dockerfile`: a Dockerfile for a user's folder of stages, on the zpipe image.

The folder that holds pipeline.toml holds the stages' modules too (``run =
"detector:BlobDetector"`` is looked up there), and perhaps a
requirements.txt: the image is the zpipe image plus those requirements plus
that folder, at the same path under /app as in the build context, so the
commands `zpipe export compose` and `zpipe export k8s` write find it. Folders
the stages write (``volumes``) are made in the image and owned by its user: a
volume mounted there starts with that owner, so the stage may write it.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..config import PipelineSpec
from .export import APP_UID, header, pipeline_folder

ZPIPE_IMAGE = f"zpipe:{__version__}"  # the Dockerfile's `zpipe` target (README)
REQUIREMENTS = "requirements.txt"


def dockerfile(spec: PipelineSpec, file: str | Path, context: str | Path = ".") -> str:
    """Dockerfile text for the stages of ``spec``."""
    folder = pipeline_folder(file, context)
    source = Path(file).resolve().parent
    lines = [
        f"ARG ZPIPE_IMAGE={ZPIPE_IMAGE}",
        "FROM ${ZPIPE_IMAGE}",
        "USER root",
    ]
    if (source / REQUIREMENTS).is_file():
        requirements = (folder / REQUIREMENTS).as_posix()
        lines += [
            "# The stages' own dependencies; offline from a wheelhouse/ folder in the build",
            "# context when there is one (then build with --network none).",
            f"COPY {requirements} /tmp/zpipe-stage-requirements.txt",
            "RUN --mount=type=bind,target=/tmp/context \\",
            "    if [ -d /tmp/context/wheelhouse ]; then \\",
            "      pip install --no-cache-dir --no-index --find-links /tmp/context/wheelhouse \\",
            "        -r /tmp/zpipe-stage-requirements.txt; \\",
            "    else pip install --no-cache-dir -r /tmp/zpipe-stage-requirements.txt; fi",
        ]
    where = "." if str(folder) == "." else folder.as_posix()
    lines.append(f"COPY --chown={APP_UID}:{APP_UID} {where} ./{'' if where == '.' else where}")
    written = sorted({(folder / v).as_posix() for s in spec.stages for v in s.volumes})
    if written:
        lines.append(f"RUN mkdir -p {' '.join(written)} && chown {APP_UID}:{APP_UID} "
                     f"{' '.join(written)}")
    inside = (folder / Path(file).name).as_posix()
    # Each container is given its own command (export compose, export k8s).
    lines += [f"USER {APP_UID}", f'CMD ["zpipe", "validate", "{inside}"]']
    build = f"docker build -t zpipe-{spec.name.lower()}:latest ."
    return header(f"zpipe export dockerfile {inside}",
                  f"The stages of pipeline {spec.name!r} on the zpipe image. Build from the "
                  f"folder you ran",
                  f"that in: {build}") + "\n".join(lines) + "\n"
