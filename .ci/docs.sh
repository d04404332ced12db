#!/usr/bin/env bash
# Build the documentation in strict mode: a broken link, a missing page or an API reference
# that no longer resolves fails the build. Nothing is fetched from the network.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# SITE_DIR given (make docs: site/): the site stays there; otherwise a temporary folder.
if [ -z "${SITE_DIR:-}" ]; then
  SITE_DIR=$(mktemp -d)
  trap 'rm -rf "$SITE_DIR"' EXIT
fi
# NO_MKDOCS_2_WARNING silences mkdocs-material's notice about its end of life.
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --site-dir "$SITE_DIR"
echo "docs build passed: $SITE_DIR"
