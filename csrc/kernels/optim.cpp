// Optimizer updates (lingrad.hpp: optimizer_update): PyTorch's SGD, Adam and AdamW, element by
// element, with the roundings of PyTorch's CPU path (torch/optim/sgd.py and adam.py, the
// _single_tensor_* functions, run one ATen operation at a time):
//   Tensor.add(other, alpha=a)     fma(other, a, self)              (ATen's vectorised add is an fmadd)
//   lerp_(end, w)                  fma(w, end - self, self) for |w| < 0.5, else fma(w - 1, end - self, end)
//   addcmul_(t1, t2, value=c)      fma(c * t1, t2, self)            (ATen's build contracts it)
//   addcdiv_(t1, t2, value=c)      self + (c * t1) / t2
//   a Python float argument        rounded to T once, as ATen's Scalar is
// The tests (tests/test_train_step.py) check each rule against torch.optim: SGD bit for bit, Adam's
// state bit for bit and its parameters within a rounding, since std::sqrt is correctly rounded and
// torch's float sqrt (MKL's vectorised one) is 1 ulp off for about 17% of float32 values.
//
// Every element is computed by one thread from its own values only, so any split of the elements
// over threads gives the same bits. The loops are compiled twice (baseline and AVX2 + FMA, chosen at
// run time): std::fma is one instruction with FMA and a slow library call without it, the same value.
#include <algorithm>
#include <cmath>

#include "team.hpp"

namespace lingrad {
namespace {

// The rules' constants for one call, rounded to T where PyTorch rounds them.
template <typename T>
struct SgdRule {
  T wd, momentum, damp1, neg_lr;  // damp1 = 1 - dampening
  bool decay, has_momentum, nesterov, maximize, fresh;
};

template <typename T>
struct AdamRule {
  T wd, keep, w1, beta2, c2, bc2_sqrt, eps, neg_step_size;  // keep = 1 - lr wd (AdamW); w1 = 1 - beta1; c2 = 1 - beta2
  bool coupled_decay, decoupled_decay, amsgrad, maximize, small_w1;
};

#define LINGRAD_INLINE inline __attribute__((always_inline))

// (The options that skip an operation are template arguments: a loop without branches vectorises.)
template <bool Decay, bool Momentum, bool Fresh, bool Nesterov, typename T>
LINGRAD_INLINE void sgd_range(const SgdRule<T>& r, T* __restrict p, const T* __restrict grad, T* __restrict buf,
                              index_t first, index_t last) {
  for (index_t i = first; i < last; ++i) {
    T g = r.maximize ? -grad[i] : grad[i];
    if (Decay) g = std::fma(p[i], r.wd, g);  // grad.add(param, alpha=weight_decay)
    if (Momentum) {
      const T b = Fresh ? g : std::fma(g, r.damp1, buf[i] * r.momentum);  // buf.mul_(m).add_(g, alpha=1-d)
      buf[i] = b;
      g = Nesterov ? std::fma(b, r.momentum, g) : b;  // grad.add(buf, alpha=momentum)
    }
    p[i] = std::fma(g, r.neg_lr, p[i]);  // param.add_(grad, alpha=-lr)
  }
}

// The loop for r's options.
template <typename T>
LINGRAD_INLINE void sgd_any(const SgdRule<T>& r, T* p, const T* g, T* buf, index_t first, index_t last) {
  if (!r.has_momentum)
    return r.decay ? sgd_range<true, false, false, false>(r, p, g, buf, first, last)
                   : sgd_range<false, false, false, false>(r, p, g, buf, first, last);
  const int options = (r.decay ? 1 : 0) | (r.fresh ? 2 : 0) | (r.nesterov ? 4 : 0);
  switch (options) {
    case 0:
      return sgd_range<false, true, false, false>(r, p, g, buf, first, last);
    case 1:
      return sgd_range<true, true, false, false>(r, p, g, buf, first, last);
    case 2:
      return sgd_range<false, true, true, false>(r, p, g, buf, first, last);
    case 3:
      return sgd_range<true, true, true, false>(r, p, g, buf, first, last);
    case 4:
      return sgd_range<false, true, false, true>(r, p, g, buf, first, last);
    case 5:
      return sgd_range<true, true, false, true>(r, p, g, buf, first, last);
    case 6:
      return sgd_range<false, true, true, true>(r, p, g, buf, first, last);
    default:
      return sgd_range<true, true, true, true>(r, p, g, buf, first, last);  // 7
  }
}

template <bool Coupled, bool Decoupled, bool Amsgrad, typename T>
LINGRAD_INLINE void adam_range(const AdamRule<T>& r, T* __restrict p, const T* __restrict grad, T* __restrict m,
                               T* __restrict v, T* __restrict vmax, index_t first, index_t last) {
  for (index_t i = first; i < last; ++i) {
    T g = r.maximize ? -grad[i] : grad[i];
    T value = p[i];
    if (Decoupled) value = value * r.keep;      // param.mul_(1 - lr * weight_decay)
    if (Coupled) g = std::fma(value, r.wd, g);  // grad.add(param, alpha=weight_decay)
    const T d = g - m[i];                       // exp_avg.lerp_(grad, 1 - beta1)
    const T mi = r.small_w1 ? std::fma(r.w1, d, m[i]) : std::fma(r.w1 - T(1), d, g);
    m[i] = mi;
    const T vi = std::fma(r.c2 * g, g, v[i] * r.beta2);  // exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1-beta2)
    v[i] = vi;
    T second = vi;
    if (Amsgrad) {  // torch.maximum: NaN if either is
      const T a = vmax[i];
      second = (a > vi || a != a) ? a : vi;
      vmax[i] = second;
    }
    const T denom = std::sqrt(second) / r.bc2_sqrt + r.eps;  // (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p[i] = value + (r.neg_step_size * mi) / denom;           // param.addcdiv_(exp_avg, denom, value=-step_size)
  }
}

// The loop for r's options.
template <typename T>
LINGRAD_INLINE void adam_any(const AdamRule<T>& r, T* p, const T* g, T* m, T* v, T* vmax, index_t first, index_t last) {
  const int options = (r.coupled_decay ? 1 : 0) | (r.decoupled_decay ? 2 : 0) | (r.amsgrad ? 4 : 0);
  switch (options) {
    case 0:
      return adam_range<false, false, false>(r, p, g, m, v, vmax, first, last);
    case 1:
      return adam_range<true, false, false>(r, p, g, m, v, vmax, first, last);
    case 2:
      return adam_range<false, true, false>(r, p, g, m, v, vmax, first, last);
    case 4:
      return adam_range<false, false, true>(r, p, g, m, v, vmax, first, last);
    case 5:
      return adam_range<true, false, true>(r, p, g, m, v, vmax, first, last);
    default:
      return adam_range<false, true, true>(r, p, g, m, v, vmax, first, last);  // 6
  }
}

// The loops as functions, for each element type, baseline and (x86) AVX2 + FMA.
#define LINGRAD_RANGES(SUFFIX)                                                                                      \
  void sgd_##SUFFIX(const SgdRule<float>& r, float* p, const float* g, float* b, index_t first, index_t last) {     \
    sgd_any(r, p, g, b, first, last);                                                                               \
  }                                                                                                                 \
  void sgd_##SUFFIX(const SgdRule<double>& r, double* p, const double* g, double* b, index_t first, index_t last) { \
    sgd_any(r, p, g, b, first, last);                                                                               \
  }                                                                                                                 \
  void adam_##SUFFIX(const AdamRule<float>& r, float* p, const float* g, float* m, float* v, float* vmax,           \
                     index_t first, index_t last) {                                                                 \
    adam_any(r, p, g, m, v, vmax, first, last);                                                                     \
  }                                                                                                                 \
  void adam_##SUFFIX(const AdamRule<double>& r, double* p, const double* g, double* m, double* v, double* vmax,     \
                     index_t first, index_t last) {                                                                 \
    adam_any(r, p, g, m, v, vmax, first, last);                                                                     \
  }

LINGRAD_RANGES(baseline)
#if defined(LINGRAD_X86) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
LINGRAD_RANGES(fma)
#pragma GCC pop_options
bool use_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
#define sgd_fma sgd_baseline
#define adam_fma adam_baseline
bool use_fma() { return false; }
#endif

// Elements per thread below which one thread updates a tensor (a team costs more than the loop).
constexpr index_t kElementsPerThread = 1 << 15;

template <typename Body>
void over_elements(index_t size, const Body& body) {
  const int threads = static_cast<int>(std::min<index_t>(get_num_threads(), 1 + size / kElementsPerThread));
  run_team(threads, [&](int thread, int team) {
    const Share s = share(size, thread, team);
    body(s.first, s.last);
  });
}

template <typename T>
void sgd_update(const ParamState<T>& p, const OptimizerHyper& h, const T* grad) {
  SgdRule<T> r;
  r.wd = static_cast<T>(h.weight_decay);
  r.momentum = static_cast<T>(h.momentum);
  r.damp1 = static_cast<T>(1 - h.dampening);
  r.neg_lr = static_cast<T>(-h.lr);
  r.decay = h.weight_decay != 0;
  r.has_momentum = h.momentum != 0 && p.momentum_buffer;
  r.nesterov = h.nesterov;
  r.maximize = h.maximize;
  r.fresh = p.fresh_buffer;
  const bool fma = use_fma();
  over_elements(p.size, [&](index_t first, index_t last) {
    if (fma)
      sgd_fma(r, p.value, grad, p.momentum_buffer, first, last);
    else
      sgd_baseline(r, p.value, grad, p.momentum_buffer, first, last);
  });
}

template <typename T>
void adam_update(const ParamState<T>& p, const OptimizerHyper& h, const T* grad) {
  // step_t += 1 in the step tensor's dtype; then Python's arithmetic in double on its value.
  double step;
  if (p.step_f32) {
    *p.step_f32 += 1.0f;
    step = *p.step_f32;
  } else {
    *p.step_f64 += 1.0;
    step = *p.step_f64;
  }
  const double bias_correction1 = 1 - std::pow(h.beta1, step), bias_correction2 = 1 - std::pow(h.beta2, step);
  AdamRule<T> r;
  r.wd = static_cast<T>(h.weight_decay);
  r.keep = static_cast<T>(1 - h.lr * h.weight_decay);
  r.w1 = static_cast<T>(1 - h.beta1);
  r.beta2 = static_cast<T>(h.beta2);
  r.c2 = static_cast<T>(1 - h.beta2);
  r.bc2_sqrt = static_cast<T>(std::pow(bias_correction2, 0.5));  // Python's bias_correction2**0.5
  r.eps = static_cast<T>(h.eps);
  r.neg_step_size = static_cast<T>(-(h.lr / bias_correction1));
  r.coupled_decay = h.weight_decay != 0 && !h.decoupled;
  r.decoupled_decay = h.weight_decay != 0 && h.decoupled;
  r.amsgrad = h.amsgrad && p.max_exp_avg_sq;
  r.maximize = h.maximize;
  r.small_w1 = std::abs(r.w1) < T(0.5);  // ATen's lerp chooses its formula by the weight
  const bool fma = use_fma();
  over_elements(p.size, [&](index_t first, index_t last) {
    if (fma)
      adam_fma(r, p.value, grad, p.exp_avg, p.exp_avg_sq, p.max_exp_avg_sq, first, last);
    else
      adam_baseline(r, p.value, grad, p.exp_avg, p.exp_avg_sq, p.max_exp_avg_sq, first, last);
  });
}

}  // namespace

template <typename T>
void optimizer_update(const ParamState<T>& p, const T* grad) {
  if (!p.hyper) return;
  if (p.hyper->kind == OptimizerKind::sgd)
    sgd_update(p, *p.hyper, grad);
  else
    adam_update(p, *p.hyper, grad);
}

template <typename T>
void optimizer_prefetch(const ParamState<T>& p) {
  if (!p.hyper) return;
  for (const T* state : {p.momentum_buffer, p.exp_avg, p.exp_avg_sq, p.max_exp_avg_sq})
    if (state)
      for (index_t i = 0; i < p.size; i += 64 / static_cast<index_t>(sizeof(T)))  // one per cache line
        __builtin_prefetch(state + i, 1, 3);
}

template void optimizer_update<float>(const ParamState<float>&, const float*);
template void optimizer_update<double>(const ParamState<double>&, const double*);
template void optimizer_prefetch<float>(const ParamState<float>&);
template void optimizer_prefetch<double>(const ParamState<double>&);

}  // namespace lingrad
