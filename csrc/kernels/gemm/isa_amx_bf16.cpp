// AVX-512 build with AMX (compiled with the AVX-512 flags and -mamx-tile -mamx-bf16): the avx512
// engine, whose bfloat16 products run on AMX tiles (engine.inc). Linux hands out AMX state to a
// process that asks for it (cpu.cpp asks before this build is chosen).
#include "avx512_traits.hpp"

namespace lingrad::isa_amx_bf16 {
constexpr GemmTable kBlocking = avx512_table("amx_bf16");
}  // namespace lingrad::isa_amx_bf16

#define LINGRAD_ISA isa_amx_bf16
#define LINGRAD_AMX 1
#include "engine.inc"
