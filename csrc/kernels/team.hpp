// The one way lingrad's kernels use threads, and the one way they add partial sums:
//
//   run_team(threads, [&](int thread, int team) {...})   the body on each thread of a team (inline for one)
//   share(n, thread, team)                                that thread's contiguous part of n items
//   ordered_sum(partials, n)                              the partials added in index order
//
// Results do not depend on the number of threads because a thread only ever decides *who* computes
// an item, never how it is summed: each partial is summed by one thread, and the partials are added
// in a fixed order afterwards. Compiles without OpenMP (scripts/serial.sh): the body then runs inline.
//
// Everything here has internal linkage (static), as bf16_to_float: a per-ISA build that includes
// this file gets its own copy, never one compiled for another ISA.
#pragma once
#include "lingrad.hpp"
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace lingrad {

// body(thread, team) on each thread of a team of `threads`: inline in this thread for one (setting
// up a team costs more than a small kernel), else in `#pragma omp parallel`, where OpenMP may give
// fewer threads than asked: `team` is the number that runs, thread in [0, team).
template <typename Body>
static inline void run_team(int threads, const Body& body) {
#if defined(_OPENMP)
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    body(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#else
  (void)threads;
#endif
  body(0, 1);
}

// Items [first, last) of n for `thread` of `team`: contiguous, the sizes within one of each other.
struct Share {
  index_t first, last;
};
static inline Share share(index_t n, int thread, int team) { return {n * thread / team, n * (thread + 1) / team}; }

// total + partials[0] + partials[1] + ... + partials[n - 1], added in that order (whatever thread
// computed each partial): the loss totals.
static inline double ordered_sum(const double* partials, index_t n, double total = 0) {
  for (index_t i = 0; i < n; ++i) total += partials[i];
  return total;
}

}  // namespace lingrad
