"""Static checks of docker/Dockerfile and docker/compose.yaml (no Docker engine needed).

    python -m pytest tests/integration/test_docker.py

The compose file is parsed as YAML with compose's `${VAR:-default}` defaults filled in; the
Dockerfile is split into instructions (continuations joined, comments dropped).  Every file
the build copies must exist in the build context and not be excluded by
docker/Dockerfile.dockerignore.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def _defaults(text: str) -> str:
    """Compose interpolation with an empty environment: ${VAR:-default} -> default, ${VAR} -> ''."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(_defaults((DOCKER / "compose.yaml").read_text()))


def _instructions() -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        lines.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return lines


def _ignored(path: str) -> bool:
    patterns = [p.strip() for p in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    return any(fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(parts[0], pat) for pat in patterns)


def test_dockerfile_uses_a_cuda_pytorch_base_and_installs_the_package():
    steps = _instructions()
    assert steps[0][0] == "FROM"
    image = steps[0][1]
    assert image.startswith("pytorch/pytorch:") and "cuda" in image and "runtime" in image
    runs = [arg for kw, arg in steps if kw == "RUN"]
    assert any(re.search(r"\bpip install \.(\s|$)", r) for r in runs)
    workdir = [arg for kw, arg in steps if kw == "WORKDIR"]
    assert workdir == ["/app"]


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored():
    copies = [arg for kw, arg in _instructions() if kw in ("COPY", "ADD")]
    assert copies
    for arg in copies:
        words = [w for w in shlex.split(arg) if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY source {source} is not in the build context"
            assert not _ignored(source), f"COPY source {source} is excluded by Dockerfile.dockerignore"
    # What pip install . needs: pyproject's readme and py-modules.
    copied = {s for arg in copies for s in shlex.split(arg)[:-1]}
    assert {"pyproject.toml", "README.md", "eagle_dist_tvshim.py", "eagle_dist", "launch", "configs"} <= copied


def test_dockerfile_runs_as_a_non_root_user_with_the_accelerate_entrypoint():
    steps = _instructions()
    users = [(i, arg) for i, (kw, arg) in enumerate(steps) if kw == "USER"]
    assert users, "no USER instruction: the container would run as root"
    last_index, last_user = users[-1]
    assert last_user.split(":")[0] not in ("root", "0")
    assert any(kw == "RUN" and "useradd" in arg and last_user.split(":")[0] in arg for kw, arg in steps[:last_index])
    entry = [arg for kw, arg in steps if kw == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["accelerate", "launch", "launch/train.py"]
    assert (REPO / "launch" / "train.py").is_file()
    cmd = json.loads([arg for kw, arg in steps if kw == "CMD"][-1])
    assert cmd[0] == "--config" and (REPO / cmd[1]).is_file()


def test_dockerignore_keeps_data_and_environments_out():
    for path in (".venv", ".git", "runs", "shards", "mlruns"):
        assert _ignored(path), path
    for path in ("eagle_dist", "launch", "configs", "pyproject.toml"):
        assert not _ignored(path), path


def test_compose_has_mlflow_on_localhost_with_sqlite_and_an_artifact_volume(compose):
    mlflow = compose["services"]["mlflow"]
    ports = mlflow["ports"]
    assert ports, "the MLflow UI should be published"
    for port in ports:
        host_ip = str(port).split(":")[0]
        assert host_ip == "127.0.0.1", f"MLflow must bind to 127.0.0.1 by default, got {port!r}"
    args = mlflow["entrypoint"]
    assert args[:2] == ["mlflow", "server"]
    options = dict(a.split("=", 1) for a in args[2:] if "=" in a)
    assert options["--backend-store-uri"].startswith("sqlite:////mlflow/")
    assert options["--artifacts-destination"].startswith("/mlflow/")
    assert "mlflow:5000" in options["--allowed-hosts"].split(",")
    assert "mlflow:/mlflow" in mlflow["volumes"] and "mlflow" in compose["volumes"]
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])


def test_compose_trainer_reserves_gpus_and_talks_to_the_mlflow_service(compose):
    trainer = compose["services"]["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert int(trainer["shm_size"].rstrip("gb")) >= 1
    for service in compose["services"].values():
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO and (context / build["dockerfile"]).is_file()
    command = shlex.split(trainer["command"])
    assert command[0] == "--config" and (REPO / command[1]).is_file()
    for volume in trainer["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (DOCKER / source).resolve().parent == REPO, f"bind mount {source} leaves the repository"
