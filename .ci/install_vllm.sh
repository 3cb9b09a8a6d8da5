#!/usr/bin/env bash
# Usage: .ci/install_vllm.sh VERSION VENV
#
# Creates the virtual environment VENV (with python3) if it does not exist and installs
# vllm==VERSION and its declared requirements into it. Re-running with the same VERSION on a
# finished VENV does nothing.
#
# Where a vLLM release declares a pin that the package registry cannot satisfy and that has no
# bearing on what we test (vLLM's attention interface, torch and Triton), the pin is relaxed
# here, by name, with the reason, and announced loudly; see RELAXED below. Everything else vLLM
# declares is installed as declared, and `pip check` must report nothing but the relaxed pins.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 VERSION VENV" >&2
    exit 2
fi
version=$1
venv=$2

# Relaxed pins, per vLLM version: "package|reason" entries. A relaxed package is installed at
# whatever version the rest of the requirements resolve to, instead of vLLM's bound.
declare -A RELAXED=(
    # vLLM 0.33.0 declares certifi>=2026.10.19; the registry our CI machines reach tops out at
    # certifi 2026.10.18. certifi is Mozilla's CA bundle (data for TLS verification, used by
    # requests/httpx when downloading models); nothing in the attention path or the test suite
    # touches it.
    ["0.33.0"]="certifi|vLLM 0.33.0 requires certifi>=2026.10.19 but the package registry has at most 2026.10.18; certifi is only a CA-certificate bundle, unrelated to attention, torch or Triton"
)

py="$venv/bin/python"
stamp="$venv/.vllm-installed"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$version" ]]; then
    echo "install_vllm: $venv already has vllm==$version"
    exit 0
fi
if [[ ! -x "$py" ]]; then
    python3 -m venv "$venv"
fi
rm -f "$stamp"
# Pip's own version check would only add noise; everything else comes from pip's configuration.
export PIP_DISABLE_PIP_VERSION_CHECK=1

relax="${RELAXED[$version]:-}"
if [[ -z "$relax" ]]; then
    "$py" -m pip install "vllm==$version"
else
    package=${relax%%|*}
    reason=${relax#*|}
    banner="install_vllm: RELAXING vllm==$version's pin on '$package': $reason"
    echo "################################################################################"
    echo "$banner"
    echo "################################################################################"

    # 1. vLLM itself, without its requirements.
    "$py" -m pip install --no-deps "vllm==$version"
    # 2. Its declared requirements (those that apply to this platform, no extras), with the
    #    one relaxed package's version specifier dropped, resolved together in one pip run.
    reqs="$venv/vllm-$version-requirements.txt"
    "$py" - "$package" "$reqs" <<'EOF'
import importlib.metadata as md
import sys

from pip._vendor.packaging.requirements import Requirement  # pip's copy: no extra install
from pip._vendor.packaging.utils import canonicalize_name

relaxed, out = canonicalize_name(sys.argv[1]), sys.argv[2]
lines, found = [], False
for text in md.requires("vllm") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra, or another platform's requirement
    req.marker = None
    if canonicalize_name(req.name) == relaxed:
        found = True
        print(f"install_vllm: relaxed requirement {text!r} -> {req.name!r}")
        req.specifier = type(req.specifier)("")
    lines.append(str(req))
if not found:
    sys.exit(f"install_vllm: vllm declares no requirement on {relaxed!r}; drop the relaxation")
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
EOF
    "$py" -m pip install -r "$reqs"

    # 3. The environment is consistent but for the relaxed pin.
    set +e
    check=$("$py" -m pip check 2>&1)
    set -e
    unexpected=$(grep -v -i -E "^vllm [^ ]+ has requirement $package([^a-z0-9_.-]|$)" <<<"$check" \
        | grep -v -i '^No broken requirements found' || true)
    if [[ -n "$unexpected" ]]; then
        echo "install_vllm: pip check found problems besides the relaxed '$package' pin:" >&2
        echo "$check" >&2
        exit 1
    fi
    echo "$check"
    echo "################################################################################"
    echo "$banner"
    echo "install_vllm: installed $package $("$py" -c "import importlib.metadata as m; print(m.version('$package'))")"
    echo "################################################################################"
fi

"$py" -c "import vllm, sys; v = vllm.__version__; sys.exit(0 if v == '$version' else f'vllm {v}')"
echo "$version" >"$stamp"
echo "install_vllm: vllm==$version installed in $venv"
