"""An image's build stage run without Docker: its RUN commands (read from the Dockerfile) in a fresh venv
over a build context made of its COPY lines filtered by .dockerignore, with the image's paths moved to where
a test can write."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .helpers import ROOT, dockerignore_excludes, read_dockerfile

IMAGE_VENV = "/opt/venv"


def run_build_stage(dockerfile: Path, root: Path, image_python: Path) -> Path:
    """Runs the first stage of ``dockerfile`` under ``root`` with ``image_python`` (a directory holding the
    base image's ``python``) first on PATH; returns the venv that stands for the image's /opt/venv."""
    build = read_dockerfile(dockerfile)[0]
    assert build.last("WORKDIR") == "/src"
    context = root / "src"
    context.mkdir()
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    venv = root / "venv"
    env = {**os.environ, **{k: v for k, v in build.env().items() if k != "PATH"}}
    env["PATH"] = f"{image_python}:{os.environ.get('PATH', '')}"  # the base image's `python`: CPython 3.11
    for keyword, arg in build.instructions:
        if keyword == "COPY":
            *sources, dest = arg.split()
            for source in sources:
                target = context / dest
                src = ROOT / source
                files = [p for p in src.rglob("*") if p.is_file()] if src.is_dir() else [src]
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    if dockerignore_excludes(rel, ignore):
                        continue
                    inner = f.relative_to(src) if src.is_dir() else Path(f.name)
                    out = (target / inner) if (src.is_dir() or dest.endswith("/")) else target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
        elif keyword == "RUN":
            # The same command; pip's cache is allowed here (it changes where bytes come from, not what
            # is installed), the venv lives where this test can write.
            command = arg.replace(IMAGE_VENV, str(venv)).replace(" --no-cache-dir", "")
            proc = subprocess.run(
                ["bash", "-c", command], cwd=context, env=env, capture_output=True, text=True, timeout=900
            )
            assert proc.returncode == 0, f"RUN {arg}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return venv
