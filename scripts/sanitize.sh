#!/usr/bin/env bash
# The test suite against a build of lingrad with AddressSanitizer + UndefinedBehaviorSanitizer
# (the CMake option LINGRAD_SANITIZE), in its own venv (.venv-sanitize) and build directory
# (build/sanitize). Any memory error or undefined behaviour in the C++ code aborts the test
# process with the sanitizer's report, so the run fails.
#
#   scripts/sanitize.sh [pytest arguments]     (default: tests -m "not slow")
#
# By default it runs the whole suite except the tests marked slow (the largest shapes; the fuzz
# campaigns cover the same blocking edges at smaller sizes): 1-2 minutes of tests on 2 cores,
# after a 1-minute build. Tests that cannot work under ASan skip themselves (UNDER_ASAN in
# tests/helpers.py): the memory measurements (ASan's quarantine keeps freed memory resident) and
# one out-of-memory test (ASan's operator new aborts instead of throwing std::bad_alloc).
#
# How the sanitizers are hosted by Python:
# - python is not instrumented, so libasan must be the first library loaded: LD_PRELOAD. libstdc++
#   is preloaded too: ASan intercepts __cxa_throw and finds the real one only if libstdc++ is
#   already loaded when ASan starts (python is a C program); otherwise the first C++ exception
#   (any argument error) aborts with "CHECK failed: real___cxa_throw".
# - detect_leaks=0: CPython and NumPy keep allocations alive until exit by design, which
#   LeakSanitizer would report as leaks; tests/test_memory.py checks memory growth instead.
# - allocator_may_return_null=1: a malloc that cannot be satisfied returns NULL (NumPy raises
#   MemoryError), as without ASan, instead of ending the process.
# - UBSan errors are not recoverable (-fno-sanitize-recover=all in CMakeLists.txt): the first one
#   ends the process.
# - The venv (scripts/variant_venv.sh) has no torch (torch's own libraries are not built for
#   ASan): tests that need torch must skip without it (pytest.importorskip("torch")).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

venv=.venv-sanitize
source scripts/variant_venv.sh
# LINGRAD_HOST_ISAS_ONLY: only the ISA builds this CPU runs are compiled (the others never run here).
variant_venv "$venv" build/sanitize -Ccmake.define.LINGRAD_SANITIZE=ON -Ccmake.define.LINGRAD_HOST_ISAS_ONLY=ON \
  -Ccmake.build-type=Release -Cinstall.strip=false
echo "sanitize.sh: venv and sanitizer build ready after $((SECONDS - start)) s"

cxx="${CXX:-g++}"
libasan="$("$cxx" -print-file-name=libasan.so)"
libstdcxx="$("$cxx" -print-file-name=libstdc++.so.6)"
for lib in "$libasan" "$libstdcxx"; do
  if [[ ! -e "$lib" ]]; then
    echo "sanitize.sh: $lib not found (it comes with GCC: libasan, libstdc++)" >&2
    exit 1
  fi
done

export LD_PRELOAD="$libasan $libstdcxx"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
module="$("$venv/bin/python" -c 'import lingrad._C; print(lingrad._C.__file__)')"
if [[ "$(ldd "$module")" != *libasan* ]]; then
  echo "sanitize.sh: $module is not linked with libasan: not a sanitizer build" >&2
  exit 1
fi
echo "sanitize.sh: testing $module (ASan + UBSan) with LD_PRELOAD=$LD_PRELOAD"
if [[ $# -eq 0 ]]; then
  set -- tests -m "not slow"
fi
# --capture=sys: pytest captures Python's output only, so a sanitizer's report (written to file
# descriptor 2 just before the process ends) reaches the log instead of a lost capture file.
"$venv/bin/python" -m pytest -p no:cacheprovider --capture=sys "$@"
echo "sanitize.sh: clean, $((SECONDS - start)) s in all"
