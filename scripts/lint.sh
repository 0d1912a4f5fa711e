#!/usr/bin/env bash
# The style checks that CI runs (.ci/run) and that a developer runs before a commit (or through
# pre-commit: .pre-commit-config.yaml): a few seconds in all.
#
#   scripts/lint.sh          check only; exit 1 on the first finding
#   scripts/lint.sh --fix    let ruff and clang-format rewrite the files, then check
#
# - ruff: the lint rules and the formatter configured in pyproject.toml ([tool.ruff]);
# - clang-format: csrc/ against .clang-format;
# - mypy.stubtest: python/lingrad/_C.pyi against the compiled lingrad._C that the venv imports
#   (a function missing from the stub, or one the module no longer has, is a finding).
# The tools come from requirements-dev.txt, in the venv named by LINGRAD_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LINGRAD_VENV:-.venv}"
for tool in ruff clang-format python; do
  if [[ ! -x "$venv/bin/$tool" ]]; then
    echo "lint.sh: $venv/bin/$tool not found: pip install -r requirements-dev.txt into $venv" >&2
    exit 1
  fi
done
bin="$(cd "$venv/bin" && pwd)"
mapfile -t cxx_files < <(git ls-files 'csrc/*.cpp' 'csrc/*.hpp' 'csrc/*.inc')

if [[ "${1:-}" == "--fix" ]]; then
  "$bin/ruff" check --fix .
  "$bin/ruff" format .
  "$bin/clang-format" -i "${cxx_files[@]}"
fi
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/clang-format" --dry-run --Werror "${cxx_files[@]}"
# stubtest imports lingrad._C from the installed package, not from the source tree
(cd "${TMPDIR:-/tmp}" && "$bin/python" -m mypy.stubtest lingrad._C --allowlist "$OLDPWD/scripts/stubtest_allowlist.txt")
echo "lint.sh: ruff, ruff format, clang-format and the _C.pyi stub check all pass"
