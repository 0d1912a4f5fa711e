# Sourced by scripts/sanitize.sh and scripts/serial.sh: a venv of its own for a variant build of
# lingrad (sanitizers, no OpenMP), so that it never replaces the build in the developer's .venv.
#
#   variant_venv VENV BUILD_DIR [pip install options...]
#
# VENV gets requirements-test.txt (no torch: its libraries are not built for the variants, and
# tests that need torch or the demo's packages skip themselves) and the build tools, then lingrad built in
# BUILD_DIR with the given options (-Ccmake.define.X=Y ...). No build isolation, so a second run
# rebuilds only what changed.
variant_venv() {
  local venv="$1" build_dir="$2"
  shift 2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r requirements-test.txt "scikit-build-core>=0.10" "pybind11>=2.12" ninja
  "$venv/bin/pip" install -q --no-build-isolation . -Cbuild-dir="$build_dir" "$@"
}
