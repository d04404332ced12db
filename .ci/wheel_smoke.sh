#!/usr/bin/env bash
# Build the sdist and the wheel, check what they hold, install the wheel with its extras into
# a fresh virtual environment that cannot see this source tree, and smoke-test it there.
#
# Fails when a package or a package-data file (py.typed, ...) is missing from the wheel, when
# the wheel holds a top-level package it should not, or when the installed packages do not
# import and work. Versions are pinned to the development environment's (`pip freeze`), so
# the run is quick to resolve and tests what the project is developed against.
#
# Usage: .ci/wheel_smoke.sh            (PY=path/to/python selects the building interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
PACKAGES="sngm_integrations hf_trainer hf_trainer_optim timm_optim lightning_callbacks"
EXTRAS="hf,lightning,study"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== copying the source tree (files git tracks or would track, nothing it ignores)"
# Building from a copy keeps build leftovers such as an editable install's *.egg-info out of
# the archives: setuptools would otherwise add every file its old SOURCES.txt lists.
SRC="$WORK/src"
mkdir "$SRC"
git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null || {
    echo "FAIL: $ROOT is not a git checkout; the files to package are read from git"
    exit 1
}
git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' path; do if [[ -e $path ]]; then printf '%s\0' "$path"; fi; done |
    xargs -0 cp --parents -t "$SRC"

echo "== building the sdist and the wheel (the wheel is built from the sdist)"
"$PY" -m build --outdir "$WORK/dist" "$SRC" >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log"
    exit 1
}
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
echo "   $(basename "$SDIST")"
echo "   $(basename "$WHEEL")"

echo "== checking the archives against the source tree"
"$PY" - "$SRC" "$SDIST" "$WHEEL" $PACKAGES <<'EOF'
"""Every file of every package in the source tree must be in both archives, and no other
top-level package may be in the wheel."""
import sys
import tarfile
import zipfile
from pathlib import Path

source, sdist, wheel, *packages = sys.argv[1:]
root_path = Path(source)
expected = set()
for package in packages:
    package_dir = root_path / package
    if not (package_dir / "__init__.py").is_file():
        sys.exit(f"FAIL: {package}/__init__.py is missing from the source tree")
    if not (package_dir / "py.typed").is_file():
        sys.exit(f"FAIL: {package}/py.typed is missing from the source tree")
    for path in package_dir.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            expected.add(path.relative_to(root_path).as_posix())

wheel_names = set(zipfile.ZipFile(wheel).namelist())
with tarfile.open(sdist) as archive:
    prefix = archive.getnames()[0].split("/")[0]
    sdist_names = {name.removeprefix(prefix + "/") for name in archive.getnames()}

problems = []
for name in sorted(expected - wheel_names):
    problems.append(f"missing from the wheel: {name}")
for name in sorted(expected - sdist_names):
    problems.append(f"missing from the sdist: {name}")
for name in ("pyproject.toml", "README.md", "LICENSE"):
    if name not in sdist_names:
        problems.append(f"missing from the sdist: {name}")
top_level = {name.split("/")[0] for name in wheel_names}
top_level -= {name for name in top_level if name.endswith(".dist-info")}
for name in sorted(top_level - set(packages)):
    problems.append(f"unexpected top-level entry in the wheel: {name}")
if not any(name.endswith(("/licenses/LICENSE", ".dist-info/LICENSE")) for name in wheel_names):
    problems.append("the wheel carries no LICENSE in its .dist-info")
if problems:
    sys.exit("FAIL:\n  " + "\n  ".join(problems))
print(f"   {len(expected)} package files in both archives; top level: {sorted(top_level)}")
EOF

echo "== installing the wheel with [$EXTRAS] into a fresh virtual environment"
BASE_PYTHON=$("$PY" -c 'import sys; print(sys._base_executable)')
"$BASE_PYTHON" -m venv "$WORK/venv"
VENV_PY="$WORK/venv/bin/python"
"$PY" -m pip freeze --exclude-editable >"$WORK/constraints.txt"
"$VENV_PY" -m pip install -q --no-compile -c "$WORK/constraints.txt" "torch==2.14.1" "$WHEEL[$EXTRAS]" \
    >"$WORK/install.log" 2>&1 || {
    tail -n 40 "$WORK/install.log"
    exit 1
}

echo "== smoke test, run from an empty folder in isolated mode (no source tree, no PYTHONPATH)"
mkdir "$WORK/empty"
cd "$WORK/empty"
"$VENV_PY" -I - $PACKAGES <<'EOF'
import importlib
import importlib.metadata
import importlib.resources
import pkgutil
import sys
import sysconfig
import tempfile
from pathlib import Path

packages = sys.argv[1:]
site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()

for package in packages:
    module = importlib.import_module(package)
    location = Path(module.__file__).resolve()
    assert location.is_relative_to(site_packages), f"{package} imported from {location}"
    assert importlib.resources.files(package).joinpath("py.typed").is_file(), (
        f"{package}/py.typed is not installed"
    )
    submodules = [
        info.name
        for info in pkgutil.walk_packages(module.__path__, prefix=package + ".")
        if not info.name.endswith(".__main__")  # running it would start the command line
    ]
    for name in submodules:
        importlib.import_module(name)
    for name in getattr(module, "__all__", []):
        assert hasattr(module, name), f"{package}.__all__ names {name!r}, which is missing"
    print(f"   {package}: imported with {len(submodules)} submodules, py.typed present")

import sngm_integrations

installed = importlib.metadata.version("sngm-integrations")
assert installed == sngm_integrations.__version__, (installed, sngm_integrations.__version__)

# One SNGM step moves the weights by lr along the normalized gradient (momentum starts at 0).
import torch

from sngm_integrations import SNGM

torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
before = [p.detach().clone() for p in model.parameters()]
optimizer = SNGM(model.parameters(), lr=0.5, momentum=0.9)
model(torch.randn(8, 4)).square().mean().backward()
grads = [p.grad.detach().clone() for p in model.parameters()]
norm = torch.cat([g.flatten() for g in grads]).norm()
optimizer.step()
for p, w, g in zip(model.parameters(), before, grads):
    torch.testing.assert_close(p.detach(), w - 0.5 * g / norm)
torch.testing.assert_close(optimizer.last_grad_norm, norm)
print("   one SNGM step: as expected")

# Importing hf_trainer registers the optimizer name with transformers.
import transformers
from transformers import Trainer, TrainingArguments

import hf_trainer  # noqa: F401

with tempfile.TemporaryDirectory() as output_dir:
    args = TrainingArguments(
        output_dir=output_dir, optim="sngm", learning_rate=0.5, max_grad_norm=0, report_to=[]
    )
    optimizer_cls, _ = Trainer.get_optimizer_cls_and_kwargs(args, model)
assert optimizer_cls is SNGM, optimizer_cls
print(f"   hf_trainer: optim='sngm' gives SNGM (transformers {transformers.__version__})")

import lightning

import lightning_callbacks

print(f"   lightning_callbacks: {sorted(getattr(lightning_callbacks, '__all__', []))} "
      f"(lightning {lightning.__version__})")
EOF

echo "== the console script"
"$WORK/venv/bin/sngm-study" --help >/dev/null
echo "   sngm-study --help: ok"
echo "wheel smoke test passed in $SECONDS s"
