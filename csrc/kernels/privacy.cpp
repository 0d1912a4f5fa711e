// Per-sample gradients of a Linear layer, for per-sample clipping and DP-SGD (lingrad.hpp).
//
//   dy (B, T, out), x (B, T, in); T = 1 for 2-D arrays
//   per-sample weight grad   G_b = dY_b^T X_b                    (out, in)
//   per-sample bias grad     g_b = sum_t dY_b[t]                 (out)
//   norms                    ||(G_b, g_b)|| without storing G_b (linear_per_sample_grad_norms)
//   weighted sum             dW = sum_b s_b G_b = (s * dY)^T X   one GEMM, s applied as dY^T is packed
//
// Every sample is computed by one thread in a fixed order, so results do not depend on the thread
// count. Norms accumulate in double: four fixed lanes per dot product (k mod 4), whatever the strides.
#include <cmath>
#include <memory>
#include <vector>

#include "products.hpp"
#include "team.hpp"

namespace lingrad {
namespace {

constexpr double kParallelMinWork = 1 << 16;  // multiply-adds below which one thread runs

// sum_k a[k] b[k] in double, in four lanes (k mod 4) added as (l0 + l1) + (l2 + l3).
template <typename T>
double dot(const T* a, index_t as, const T* b, index_t bs, index_t n) {
  double l0 = 0, l1 = 0, l2 = 0, l3 = 0;
  index_t k = 0;
  for (; k + 4 <= n; k += 4) {
    l0 += static_cast<double>(a[k * as]) * static_cast<double>(b[k * bs]);
    l1 += static_cast<double>(a[(k + 1) * as]) * static_cast<double>(b[(k + 1) * bs]);
    l2 += static_cast<double>(a[(k + 2) * as]) * static_cast<double>(b[(k + 2) * bs]);
    l3 += static_cast<double>(a[(k + 3) * as]) * static_cast<double>(b[(k + 3) * bs]);
  }
  double* lanes[3] = {&l0, &l1, &l2};
  for (index_t r = 0; k < n; ++k, ++r) *lanes[r] += static_cast<double>(a[k * as]) * static_cast<double>(b[k * bs]);
  return (l0 + l1) + (l2 + l3);
}

// f(b, thread) for each sample, over up to `threads` threads when the work is large enough.
template <typename F>
void for_each_sample(index_t batch, double work, int threads, const F& f) {
  run_team(batch > 1 && work >= kParallelMinWork ? threads : 1, [&](int thread, int team) {
    const Share samples = share(batch, thread, team);
    for (index_t b = samples.first; b < samples.last; ++b) f(b, thread);
  });
}

}  // namespace

bool per_sample_norms_use_gram(index_t steps, index_t in, index_t out) {
  const double t = static_cast<double>(steps);
  return t * (t + 1) / 2 * (static_cast<double>(in) + static_cast<double>(out)) <=
         t * static_cast<double>(in) * static_cast<double>(out);
}

template <typename T>
void linear_per_sample_grad_norms(SampleView<T> dy, SampleView<T> x, bool bias, double* norms) {
  const index_t batch = dy.batch, steps = dy.m.rows, out = dy.m.cols, in = x.m.cols;
  const bool gram = per_sample_norms_use_gram(steps, in, out);
  const double t = static_cast<double>(steps);
  const double work = static_cast<double>(batch) * (gram ? t * (t + 1) / 2 * static_cast<double>(in + out)
                                                         : t * static_cast<double>(in) * static_cast<double>(out));
  const int threads = get_num_threads();
  std::vector<std::unique_ptr<double[]>> rows(gram ? 0 : threads);  // per thread: one row of G_b
  for (auto& r : rows) r.reset(new double[in > 0 ? in : 1]);
  for_each_sample(batch, work, threads, [&](index_t b, int thread) {
    const T* y = dy.m.data + b * dy.batch_stride;
    const T* a = x.m.data + b * x.batch_stride;
    double weight_sq = 0, bias_sq = 0;
    if (gram) {  // sum over t, s of <dY_t, dY_s> <X_t, X_s>: pairs s < t twice
      for (index_t i = 0; i < steps; ++i)
        for (index_t j = 0; j <= i; ++j) {
          const double gy = dot(y + i * dy.m.rs, dy.m.cs, y + j * dy.m.rs, dy.m.cs, out);
          const double gx = dot(a + i * x.m.rs, x.m.cs, a + j * x.m.rs, x.m.cs, in);
          const double twice = i == j ? 1.0 : 2.0;
          weight_sq += twice * gx * gy;
          bias_sq += twice * gy;
        }
    } else {  // G_b row by row, in double
      double* row = rows[thread].get();
      for (index_t o = 0; o < out; ++o) {
        for (index_t i = 0; i < in; ++i) row[i] = 0;
        double g = 0;
        for (index_t s = 0; s < steps; ++s) {
          const double d = static_cast<double>(y[s * dy.m.rs + o * dy.m.cs]);
          const T* xs = a + s * x.m.rs;
          for (index_t i = 0; i < in; ++i) row[i] += d * static_cast<double>(xs[i * x.m.cs]);
          g += d;
        }
        weight_sq += dot(row, 1, row, 1, in);
        bias_sq += g * g;
      }
    }
    norms[b] = std::sqrt(bias ? weight_sq + bias_sq : weight_sq);
  });
}

template <typename T>
void linear_backward_weight_weighted(MatrixView<T> dy, MatrixView<T> x, VectorView<T> sample_weights, T* dw, T* db) {
  GemmArgs<T> g = weight_grad_args(dy, x, dw, db);
  std::unique_ptr<T[]> dense;
  const T* s = sample_weights.data;
  if (sample_weights.stride != 1 && sample_weights.size > 0) {  // the engine reads them contiguous
    dense.reset(new T[sample_weights.size]);
    for (index_t b = 0; b < sample_weights.size; ++b) dense[b] = sample_weights.data[b * sample_weights.stride];
    s = dense.get();
  }
  g.a_col_scale = s;
  gemm(g);
}

template <typename T>
void linear_per_sample_grads(SampleView<T> dy, SampleView<T> x, T* out) {
  const index_t batch = dy.batch, steps = dy.m.rows, o_n = dy.m.cols, in = x.m.cols;
  const index_t size = o_n * in;
  if (steps == 1) {  // outer products, one per sample: each element a single rounding
    const double work = static_cast<double>(batch) * static_cast<double>(size);
    for_each_sample(batch, work, get_num_threads(), [&](index_t b, int) {
      const T* y = dy.m.data + b * dy.batch_stride;
      const T* a = x.m.data + b * x.batch_stride;
      T* g = out + b * size;
      for (index_t o = 0; o < o_n; ++o) {
        const T d = y[o * dy.m.cs];
        T* row = g + o * in;
        if (x.m.cs == 1) {
#pragma omp simd
          for (index_t i = 0; i < in; ++i) row[i] = d * a[i];
        } else {
          for (index_t i = 0; i < in; ++i) row[i] = d * a[i * x.m.cs];
        }
      }
    });
    return;
  }
  for (index_t b = 0; b < batch; ++b) {  // one product per sample, on all the threads
    MatrixView<T> y = dy.m, a = x.m;
    y.data += b * dy.batch_stride;
    a.data += b * x.batch_stride;
    gemm(weight_grad_args(y, a, out + b * size, static_cast<T*>(nullptr)));
  }
}

#define LINGRAD_INSTANTIATE(T)                                                                           \
  template void linear_per_sample_grad_norms<T>(SampleView<T>, SampleView<T>, bool, double*);            \
  template void linear_backward_weight_weighted<T>(MatrixView<T>, MatrixView<T>, VectorView<T>, T*, T*); \
  template void linear_per_sample_grads<T>(SampleView<T>, SampleView<T>, T*);
LINGRAD_INSTANTIATE(float)
LINGRAD_INSTANTIATE(double)
#undef LINGRAD_INSTANTIATE

}  // namespace lingrad
