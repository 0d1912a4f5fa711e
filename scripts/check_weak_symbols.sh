#!/usr/bin/env bash
# The include-once rule of the GEMM engine (csrc/kernels/gemm/engine.inc), checked on the compiled
# library: an ISA build's object (gemm/isa_<name>.cpp.o) must define no weak symbol. A weak symbol
# there is an inline function or template instantiation that other objects may define too (an
# std:: template, a function of a header); the linker keeps one copy, which could be the one
# compiled for AVX-512 and then run on a CPU without it. Weak symbols of the objects compiled with
# baseline flags (the layer kernels' explicit instantiations, std::vector) are listed, not refused.
#
#   scripts/check_weak_symbols.sh [liblingrad_kernels.a]     (default: the newest under build/)
#
# CI can call it after any build of the package, e.g. after `pip install ... -Cbuild-dir=build/ci`:
#   scripts/check_weak_symbols.sh build/ci/liblingrad_kernels.a
set -euo pipefail
cd "$(dirname "$0")/.."
lib="${1:-}"
if [[ -z "$lib" ]]; then
  lib="$(ls -t build/*/liblingrad_kernels.a 2>/dev/null | head -n 1 || true)"
fi
if [[ -z "$lib" || ! -f "$lib" ]]; then
  echo "check_weak_symbols.sh: no liblingrad_kernels.a (build the package first, or name the library)" >&2
  exit 1
fi
# nm -A: "library:object:address type name"; weak: W (function), V (object), u (unique global).
# DW.ref.__gxx_personality_v0 is the exception-handling personality's reference that GCC emits weak
# in every C++ object: the same data everywhere, not code.
weak="$(nm -C -A --defined-only "$lib" | awk '$2 ~ /^[WVu]$/' | grep -v ' DW\.ref\.__gxx_personality_v0$' || true)"
in_isa="$(grep -E '^[^:]*:isa_[a-z0-9_]+\.cpp\.o:' <<<"$weak" || true)"
echo "check_weak_symbols.sh: $lib: $(grep -c . <<<"$weak" || true) weak symbols (allowed outside the ISA builds' objects)"
if [[ -n "$in_isa" ]]; then
  echo "check_weak_symbols.sh: weak symbols in ISA builds' objects (the include-once rule is broken):" >&2
  echo "$in_isa" >&2
  exit 1
fi
echo "check_weak_symbols.sh: no weak symbol in the ISA builds' objects"
