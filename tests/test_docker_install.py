"""Dockerfile.cuda / Dockerfile.rocm: their structure, and their install layer run for real.

Docker cannot build here (no daemon; the base images are many gigabytes), so the install layer
(`COPY . /opt/vllm_portable_attn` + its `RUN`) is replayed outside Docker: the `RUN` text, joined
as Docker joins continuation lines and run with `/bin/sh -c` as Docker runs the shell form,
goes verbatim (but for the copy's path) into a fresh `python3 -m venv --system-site-packages`,
where vLLM, torch and Triton come from the system as they come from the base image. pip gets
`PIP_NO_INDEX=1`, so a step that needed the network would fail. Then, in that venv with the
Dockerfile's ENV applied, vLLM's own plugin loader must find and run our entry point and resolve
the CUSTOM backend. Before the step, the venv gets the setuptools the images have (vLLM 0.26
requires setuptools>=77.0.3 on their Python 3.12), the one use of the package index here.
docker/README.md lists what is and is not verified.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL_DIR = "/opt/vllm_portable_attn"
ENTRYPOINT = ["vllm", "serve", "--attention-backend", "CUSTOM"]
# What vLLM 0.26 requires on the images' Python 3.12 (its `python_version > "3.11"` pin).
IMAGE_SETUPTOOLS = "setuptools>=77.0.3,<81"
# Dockerfile -> (base image repository, route); the tag is checked against pyproject's vLLM pin.
IMAGES = {
    "Dockerfile.cuda": ("vllm/vllm-openai", "unified"),
    "Dockerfile.rocm": ("vllm/vllm-openai-rocm", "grouped"),
}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions as Docker reads them: comment lines dropped (also inside a continuation),
    a trailing backslash joins the next line (the backslash and newline are removed)."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        text = (pending + line).strip()
        pending = ""
        if text:
            keyword, _, args = text.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a continuation"
    return instructions


def only(instructions: list[Instruction], keyword: str) -> str:
    found = [i.args for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def vllm_pin() -> str:
    """The vLLM version of the `test` extra in pyproject.toml (what CI tests against)."""
    match = re.search(r'"vllm==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert match, "pyproject.toml pins no vllm== version"
    return match.group(1)


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    env = {}
    for args in (i.args for i in instructions if i.keyword == "ENV"):
        key, _, value = args.partition("=")
        assert value, f"use the ENV key=value form: {args!r}"
        env[key.strip()] = value.strip().strip('"')
    return env


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_structure(name: str) -> None:
    repository, route = IMAGES[name]
    ins = parse_dockerfile(REPO / name)
    assert only(ins, "ARG") == f"VLLM_IMAGE={repository}:v{vllm_pin()}"
    assert only(ins, "FROM") == "${VLLM_IMAGE}"
    assert ins[0].keyword == "ARG" and ins[1].keyword == "FROM"
    assert only(ins, "COPY").split() == [".", INSTALL_DIR]
    run = only(ins, "RUN")
    for flag in ("pip install", "--no-deps", "--no-build-isolation", INSTALL_DIR):
        assert flag in run, f"{name}: the install step lacks {flag!r}"
    # The install layer comes right after the COPY it installs.
    keywords = [i.keyword for i in ins]
    assert keywords.index("RUN") == keywords.index("COPY") + 1
    assert image_env(ins) == {"PORTABLE_ATTN_ROUTE": route}
    assert json.loads(only(ins, "ENTRYPOINT")) == ENTRYPOINT
    assert json.loads(only(ins, "CMD")) == []


# -- the install layer, replayed in a venv ----------------------------------------------------

# Runs in the venv. Prints one JSON object; every vLLM lookup goes through vLLM's own code.
_CHECK = r"""
import importlib.metadata as md, json, sys
import vllm_portable_attn
from vllm.plugins import load_general_plugins, load_plugins_by_group
plugins = sorted(load_plugins_by_group("vllm.general_plugins"))
load_general_plugins()
from vllm.v1.attention.backends.registry import AttentionBackendEnum
cls = AttentionBackendEnum.CUSTOM.get_class()
from vllm_portable_attn import envs
# `docker run IMAGE MODEL --max-model-len 2048` runs ENTRYPOINT + those arguments; parse them
# with vLLM's own serve parser (which needs a platform to build its defaults: use the CPU one,
# as vLLM's CLI does for `vllm bench`).
from vllm import platforms
from vllm.platforms.cpu import CpuPlatform
platforms.current_platform = CpuPlatform()
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
entrypoint = json.loads(sys.argv[1])
assert entrypoint[0] == "vllm", entrypoint
args = parser.parse_args(entrypoint[1:] + ["my-org/my-model", "--max-model-len", "2048"])
print(json.dumps({
    "package_file": vllm_portable_attn.__file__,
    "backend_file": sys.modules[cls.__module__].__file__,
    "backend_name": cls.get_name(),
    "entry_points": [e.value for e in md.entry_points(group="vllm.general_plugins")
                     if e.name == "portable_attn"],
    "plugins": plugins,
    "route": envs.get_route(),
    "subcommand": args.subparser,
    "model": args.model_tag,
    "max_model_len": args.max_model_len,
    "attention_backend": str(getattr(args.attention_backend, "name", args.attention_backend)),
}))
"""


def _copy_build_context(dest: Path) -> None:
    """`COPY . /opt/...`: the repository, minus what cannot matter to the install (VCS data,
    caches, build leftovers), which a .dockerignore would also exclude."""
    shutil.copytree(
        REPO,
        dest,
        ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.egg-info", "build", "dist", ".venv*", ".*_cache", ".gl"
        ),
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """Replay each Dockerfile's install layer in its own venv; return the check's findings.

    Identical RUN steps are replayed once (today both images run the same step), which keeps
    this test well under a minute.
    """
    by_step: dict[str, dict[str, object]] = {}
    findings: dict[str, dict[str, object]] = {}
    for name in IMAGES:
        ins = parse_dockerfile(REPO / name)
        step, entrypoint = only(ins, "RUN"), json.loads(only(ins, "ENTRYPOINT"))
        key = json.dumps([step, image_env(ins), entrypoint])
        if key not in by_step:
            by_step[key] = _replay(tmp_path_factory.mktemp(name), step, image_env(ins), entrypoint)
        findings[name] = by_step[key]
    return findings


def _see_the_running_environment(venv: Path) -> None:
    """Give `venv` the packages of the environment running the tests, as the image's system
    Python holds vLLM.

    `--system-site-packages` reaches the base interpreter's site-packages only. When the tests
    run in a venv themselves (CI makes one per vLLM version), vLLM lives in that venv, so it is
    chained in with a .pth file; its directories come before the base interpreter's.
    """
    if sys.prefix == sys.base_prefix:
        return
    outer = [p for p in site.getsitepackages() if Path(p).is_relative_to(sys.prefix)]
    found = subprocess.run(
        [str(venv / "bin" / "python3"), "-c", "import site; print(site.getsitepackages()[0])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    inner = Path(found.stdout.strip())
    (inner / "_running_environment.pth").write_text("".join(f"{p}\n" for p in outer))


def _replay(
    tmp: Path, step: str, image_env: dict[str, str], entrypoint: list[str]
) -> dict[str, object]:
    """Run the install step in a fresh venv, then the check script in it."""
    context = tmp / "context"
    _copy_build_context(context)
    venv = tmp / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        check=True,
        timeout=120,
    )
    _see_the_running_environment(venv)
    # The images' Python is 3.12, where vLLM 0.26 requires setuptools>=77.0.3 (it ships
    # bdist_wheel, which --no-build-isolation relies on). On older Pythons vLLM does not pull it
    # in, and the venv's own setuptools may be too old to build a wheel: give the venv the
    # image's, the only step here that may use the package index.
    provision = subprocess.run(
        [str(venv / "bin" / "python3"), "-m", "pip", "install", "-q", IMAGE_SETUPTOOLS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if provision.returncode != 0:
        pytest.skip(f"cannot install {IMAGE_SETUPTOOLS} into the venv: {provision.stderr[-500:]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VLLM_PLUGINS"))}
    env.pop("PYTHONPATH", None)  # the venv alone decides what is importable
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        PIP_NO_INDEX="1",  # the step must not need the network
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    command = step.replace(INSTALL_DIR, str(context))
    done = subprocess.run(
        ["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"install step failed:\n{command}\n{done.stdout}\n{done.stderr}"

    env.update(image_env)
    env.pop("TRITON_INTERPRET", None)
    check = subprocess.run(
        [str(venv / "bin" / "python3"), "-c", _CHECK, json.dumps(entrypoint)],
        env=env,
        cwd=tmp,  # not the repository, whose package would shadow the installed one
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, f"check failed:\n{check.stdout}\n{check.stderr}"
    result = json.loads(check.stdout.strip().splitlines()[-1])
    result["venv"] = str(venv)
    return result


# A venv, a pip install and a vLLM import (shared by these tests): about half a minute.
@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGES)
def test_install_layer_registers_custom_backend(
    name: str, installed: dict[str, dict[str, object]]
) -> None:
    found = installed[name]
    venv = str(found["venv"])
    # The venv's copy is what loads, not a development install of this repository.
    assert str(found["package_file"]).startswith(venv), found
    assert str(found["backend_file"]).startswith(venv), found
    assert found["entry_points"] == ["vllm_portable_attn:register"]
    assert "portable_attn" in found["plugins"]  # type: ignore[operator]
    assert found["backend_name"] == "CUSTOM"
    assert found["route"] == IMAGES[name][1]


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGES)
def test_docker_run_model_parses(name: str, installed: dict[str, dict[str, object]]) -> None:
    """`docker run IMAGE my-org/my-model --max-model-len 2048` means what it says."""
    found = installed[name]
    assert found["subcommand"] == "serve"
    assert found["model"] == "my-org/my-model"
    assert found["max_model_len"] == 2048
    assert found["attention_backend"] == "CUSTOM"
