#!/usr/bin/env bash
# The test suite on the oldest torch lingrad supports and on the newest torch pip finds, each in a
# venv of its own (.venv-torch-oldest, .venv-torch-newest): requirements-dev.txt keeps the main run
# pinned, so a new torch shows up here first. CI runs it (.ci/run); about 4-5 minutes on 2 cores.
#
#   scripts/torch_matrix.sh [oldest] [newest] [-- pytest arguments]   (default: both; the whole suite)
#
# - The range is pyproject.toml's `torch>=FLOOR,<N` (FLOOR is lingrad.TORCH_MIN, which a test keeps
#   equal). "oldest" installs torch==FLOOR, "newest" the highest torch of the range that pip finds.
# - PyPI's torch for Linux is the CUDA build. Its own libraries link the CUDA runtime, so `import torch`
#   fails without the NVIDIA wheels it depends on (about 3 GB; a minute to fetch and unpack, and pip's
#   cache is off, see below): they are installed as pip resolves them, and nothing runs on a
#   GPU. PyTorch's CPU-only wheels live on PyTorch's own index, which CI machines do not reach.
# - lingrad's binary never links torch: one wheel, built once (build/matrix, with the build tools of
#   the main .venv) while the venvs are made, is installed in both. The other packages are
#   requirements-dev.txt's, less its torch pin.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

sides=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    oldest | newest) sides+=("$1") ;;
    *)
      echo "torch_matrix.sh: $1: expected oldest, newest or -- followed by pytest arguments" >&2
      exit 2
      ;;
  esac
  shift
done
[[ $# -gt 0 ]] && shift # the --
[[ ${#sides[@]} -eq 0 ]] && sides=(oldest newest)
[[ $# -eq 0 ]] && set -- tests

range="$(grep -oE '"torch>=[0-9.]+,<[0-9]+"' pyproject.toml | tr -d '"')"
floor="${range#torch>=}"
floor="${floor%%,*}"
if [[ -z "$floor" ]]; then
  echo "torch_matrix.sh: no torch>=FLOOR,<N range in pyproject.toml" >&2
  exit 1
fi
builder=.venv/bin/python
if [[ ! -x "$builder" ]]; then
  echo "torch_matrix.sh: .venv not found: run the README's test command first (it installs the build tools)" >&2
  exit 1
fi
# Disk: each venv holds about 6 GB (torch and the NVIDIA wheels); pip's cache is off here, since a
# fresh CI machine gains nothing from it and would hold another 3 GB per side.
need_gb=$((7 * ${#sides[@]}))
free_gb=$(($(df -Pk . | awk 'NR == 2 {print $4}') / 1024 / 1024))
if ((free_gb < need_gb)); then
  echo "torch_matrix.sh: $free_gb GB free on $(pwd), the venvs (${sides[*]}) need about $need_gb GB" >&2
  exit 1
fi
export PIP_NO_CACHE_DIR=1
mkdir -p build/matrix
rm -rf build/matrix/dist build/matrix/*.ready
requirements=build/matrix/requirements.txt # requirements-dev.txt less its torch pin
grep -vE '^(-r |torch==)' requirements-dev.txt >"$requirements"

# The venvs, one after the other, in the background; each side's .ready
# file says its venv is complete.
make_venvs() {
  local side venv torch_spec
  for side in "${sides[@]}"; do
    venv=".venv-torch-$side"
    if [[ "$side" == oldest ]]; then torch_spec="torch==$floor"; else torch_spec="$range"; fi
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "$torch_spec" -r requirements-test.txt -r "$requirements"
    touch "build/matrix/$side.ready"
  done
}
make_venvs >build/matrix/venvs.log 2>&1 &
venvs=$!
trap 'kill "$venvs" 2>/dev/null || true' EXIT

"$builder" -m pip wheel -q --no-deps --no-build-isolation -Cbuild-dir=build/matrix -w build/matrix/dist .
wheel="$(ls build/matrix/dist/lingrad-*.whl)"
echo "torch_matrix.sh: $wheel built after $((SECONDS - start)) s; torch range $range"

for side in "${sides[@]}"; do
  venv=".venv-torch-$side"
  while [[ ! -e "build/matrix/$side.ready" ]]; do
    if ! kill -0 "$venvs" 2>/dev/null && [[ ! -e "build/matrix/$side.ready" ]]; then
      grep -v '^WARNING: Location' build/matrix/venvs.log >&2 || true
      echo "torch_matrix.sh: making $venv failed (build/matrix/venvs.log)" >&2
      exit 1
    fi
    sleep 2
  done
  "$venv/bin/pip" install -q --no-deps --force-reinstall "$wheel"
  version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  echo "torch_matrix.sh: $side torch is $version ($venv, ready after $((SECONDS - start)) s)"
  "$venv/bin/python" -m pytest -p no:cacheprovider "$@" # (no cache: the main run owns .pytest_cache)
  echo "torch_matrix.sh: $side (torch $version) passed, $((SECONDS - start)) s so far"
done
wait "$venvs"
echo "torch_matrix.sh: done in $((SECONDS - start)) s"
