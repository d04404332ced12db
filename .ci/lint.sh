#!/usr/bin/env bash
# Lint, format and type checks. Every check runs, and the script fails if any of them did.
#   ruff check, ruff format --check: the whole repository (rules in pyproject.toml)
#   mypy --strict: the core, sngm_integrations
#   mypy, every function typed: the public adapters, hf_trainer and lightning_callbacks
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
failed=()

run() {
    local name=$1
    shift
    echo "== $name: $*"
    "$@" || failed+=("$name")
}

run "ruff check" "$VENV/bin/ruff" check --output-format concise .
run "ruff format" "$VENV/bin/ruff" format --check .
run "mypy (core, strict)" "$VENV/bin/mypy" --strict sngm_integrations
run "mypy (adapters)" "$VENV/bin/mypy" --follow-imports=silent --disallow-untyped-defs \
    --disallow-incomplete-defs --warn-unused-ignores hf_trainer hf_trainer_optim timm_optim lightning_callbacks

if ((${#failed[@]})); then
    printf 'lint failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "lint passed"
