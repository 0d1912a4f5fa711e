#!/usr/bin/env bash
# lingrad built without OpenMP (as with a compiler that has none), and a fast part of the test
# suite against that build, so that the serial branch of CMakeLists.txt and of the kernels keeps
# working. CI runs it (.ci/run) after the main suite; about a minute with the build.
#
#   scripts/serial.sh [pytest arguments]    (default: the kernel, error, determinism and config tests)
#
# Its own venv (.venv-serial) and build directory (build/serial): see scripts/variant_venv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
venv=.venv-serial
source scripts/variant_venv.sh
variant_venv "$venv" build/serial -Ccmake.define.CMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON
"$venv/bin/python" -c '
import lingrad
info = lingrad.config()
assert not info["openmp"], f"the serial build has OpenMP: {info}"
print("serial.sh: testing", lingrad.__file__, "(no OpenMP, SIMD path", info["isa"] + ")")
'
if [[ $# -eq 0 ]]; then
  set -- tests/test_kernels.py tests/test_errors.py tests/test_determinism.py tests/test_config.py -m "not slow"
fi
"$venv/bin/python" -m pytest -p no:cacheprovider "$@"
echo "serial.sh: done in $((SECONDS - start)) s"
