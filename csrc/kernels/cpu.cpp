// Run-time choices: which build of the micro-kernels runs (from the CPU's features), and how
// many threads. Both are process-wide atomics, safe to change from any thread.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gemm/gemm.hpp"
#include "team.hpp"
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(_OPENMP) && defined(__unix__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lingrad {
namespace {

// Every build compiled in, best first: CMake defines LINGRAD_BUILD_<ISA> for each x86 build it
// compiles (all of them, unless LINGRAD_HOST_ISAS_ONLY); the generic build is always there.
const IsaBuild* const kAllBuilds[] = {
#if defined(LINGRAD_BUILD_AMX_BF16)
    &isa_amx_bf16::build,
#endif
#if defined(LINGRAD_BUILD_AVX512_BF16)
    &isa_avx512_bf16::build,
#endif
#if defined(LINGRAD_BUILD_AVX512)
    &isa_avx512::build,
#endif
#if defined(LINGRAD_BUILD_AVX2)
    &isa_avx2::build,
#endif
    &isa_generic::build,
};

bool is(const IsaBuild* k, const char* name) { return std::strcmp(k->name, name) == 0; }

#if defined(LINGRAD_X86) && defined(__linux__)
// AMX-BF16 on the CPU (CPUID 7.0: EDX bit 24 AMX-TILE, bit 22 AMX-BF16), and Linux's permission for
// this process to use the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, feature 18: XTILEDATA), asked
// for once.
bool amx_usable() {
  static const bool usable = [] {
    unsigned eax = 7, ebx = 0, ecx = 0, edx = 0;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    if (!((edx >> 24) & 1) || !((edx >> 22) & 1)) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return usable;
}
#else
bool amx_usable() { return false; }
#endif

bool cpu_supports(const IsaBuild* k) {
#if defined(LINGRAD_X86) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma");
  if (is(k, "amx_bf16")) return avx512 && __builtin_cpu_supports("avx512bf16") && amx_usable();
  if (is(k, "avx512_bf16")) return avx512 && __builtin_cpu_supports("avx512bf16");
  if (is(k, "avx512")) return avx512;
  if (is(k, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return k == &isa_generic::build;
}

const IsaBuild* find_supported(const char* name) {
  for (const IsaBuild* k : kAllBuilds)
    if (std::strcmp(k->name, name) == 0) return cpu_supports(k) ? k : nullptr;
  return nullptr;
}

// Whether a supported build is a good default. avx512_bf16 differs from avx512 only in its bfloat16
// products, which pay where vdpbf16ps runs at the FMA units' rate (AMD Zen 4 and Zen 5: two float32
// FMAs' work per instruction). On an Intel Sapphire Rapids-class CPU it measured half the FMA peak
// in flops (240 against 485 GFLOP/s on 2 cores), so there the widened avx512 products are faster.
bool good_default(const IsaBuild* k) {
#if defined(LINGRAD_X86) && (defined(__GNUC__) || defined(__clang__))
  if (is(k, "avx512_bf16")) return __builtin_cpu_is("amd");
#endif
  (void)k;
  return true;
}

// The best build the CPU runs, unless LINGRAD_ISA names another supported one.
const IsaBuild* initial_build() {
  if (const char* env = std::getenv("LINGRAD_ISA"))
    if (const IsaBuild* k = find_supported(env)) return k;
  for (const IsaBuild* k : kAllBuilds)
    if (cpu_supports(k) && good_default(k)) return k;
  return &isa_generic::build;
}

std::atomic<const IsaBuild*>& active() {
  static std::atomic<const IsaBuild*> build{initial_build()};
  return build;
}

std::atomic<int>& thread_count() {
#if defined(_OPENMP)
  static std::atomic<int> n{omp_get_max_threads()};
#else
  static std::atomic<int> n{1};
#endif
  return n;
}

// GNU OpenMP cannot start a thread team again in a process forked from one whose team had run:
// the child waits forever for threads that fork() did not copy. So a child forked after the kernels
// ran with threads runs them with one thread (the same results, bitwise).
std::atomic<bool>& threads_used() {
  static std::atomic<bool> used{false};
  return used;
}

std::atomic<bool>& forked_after_threads() {
  static std::atomic<bool> forked{false};
  return forked;
}

#if defined(_OPENMP) && defined(__unix__)
void in_forked_child() {
  if (threads_used().load()) forked_after_threads().store(true);
}
const bool kForkHandlerRegistered = pthread_atfork(nullptr, nullptr, in_forked_child) == 0;
#endif

// The team a kernel may start when `requested` threads are asked for: one in a child forked after
// threads ran, else at least one; a team of more is remembered for the fork handler.
int usable_threads(int requested) {
  if (forked_after_threads().load(std::memory_order_relaxed)) return 1;
  requested = std::max(requested, 1);
  if (requested > 1 && !threads_used().load(std::memory_order_relaxed)) threads_used().store(true);
  return requested;
}

}  // namespace

const IsaBuild& active_build() { return *active().load(std::memory_order_relaxed); }

const char* get_isa() { return active_build().name; }

bool set_isa(const char* name) {
  const IsaBuild* k = find_supported(name);
  if (!k) return false;
  active().store(k);
  return true;
}

int available_isas(const char** names, int capacity) {
  int count = 0;
  for (const IsaBuild* k : kAllBuilds)
    if (cpu_supports(k) && count < capacity) names[count++] = k->name;
  return count;
}

GemmBlocking get_blocking(bool double_) {
  const IsaBuild& k = active_build();
  return double_ ? k.floats->blocking_double : k.floats->blocking_float;
}

double gemm_serial_work() { return kSerialWork; }
index_t gemm_slab_bytes() { return kSlabBytes; }
int gemm_small_m() { return static_cast<int>(kSmallM); }
int gemm_small_min_k() { return static_cast<int>(kSmallMinK); }

GemmPlan gemm_plan(bool double_, index_t m, index_t n, index_t k, index_t a_rs, index_t a_cs, index_t b_rs,
                   index_t b_cs, bool row_sums, bool loss, int threads) {
  GemmProblem q;
  q.m = m, q.n = n, q.k = k;
  q.a_rs = a_rs, q.a_cs = a_cs, q.b_rs = b_rs, q.b_cs = b_cs;
  q.elem_bytes = double_ ? 8 : 4;
  q.row_sums = row_sums;
  q.loss = loss;
  q.threads = threads > 1 ? threads : 1;  // as asked (the fork guard is not consulted: a plan starts no team)
  return make_plan(*active_build().traits, q);
}

namespace {
// The best rate of `probe` (flops_per_iteration each) over repeats for about `seconds`, GFLOP/s.
double measure_peak(double (*probe)(index_t, float), int flops_per_iteration, int threads, double seconds) {
  using clock = std::chrono::steady_clock;
  threads = usable_threads(threads);
  const index_t iterations = 1 << 20;
  double best = 0, sink = 0;
  std::vector<double> sums(static_cast<std::size_t>(threads));  // each thread's checksum
  const auto stop = clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(seconds));
  do {
    const clock::time_point start = clock::now();
    const float seed = 1.0f + 1e-3f * static_cast<float>(sink != sink);
    run_team(threads, [&](int thread, int) { sums[thread] = probe(iterations, seed); });
    sink = ordered_sum(sums.data(), threads, sink);
    const double elapsed = std::chrono::duration<double>(clock::now() - start).count();
    const double flops = static_cast<double>(iterations) * flops_per_iteration * threads;
    if (elapsed > 0 && flops / elapsed > best) best = flops / elapsed;
  } while (clock::now() < stop);
  volatile double keep = sink;  // the checksum must be used
  (void)keep;
  return best * 1e-9;
}
}  // namespace

double measure_fma_peak(int threads, double seconds) {
  const IsaBuild& k = active_build();
  return measure_peak(k.floats->fma_probe, k.floats->fma_probe_flops, threads, seconds);
}

double measure_tile_rate(int threads, double seconds) {
  const IsaBuild& k = active_build();
  return measure_peak(k.floats->tile_probe, k.floats->tile_probe_flops, threads, seconds);
}

const char* bf16_kernel() { return active_build().bf16_kernel; }

double measure_bf16_peak(int threads, double seconds) {
  const IsaBuild& k = active_build();
  return k.bf16_probe ? measure_peak(k.bf16_probe, k.bf16_probe_flops, threads, seconds) : 0.0;
}

int get_num_threads() { return usable_threads(thread_count().load(std::memory_order_relaxed)); }

void set_num_threads(int n) {
#if defined(_OPENMP)
  thread_count().store(n > 0 ? n : 1);
#else
  (void)n;
#endif
}

bool has_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace lingrad
