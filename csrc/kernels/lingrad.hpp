// lingrad: CPU kernels for one training step of a Linear layer followed by an MSE loss.
//
//   forward         Y  = X W^T + b            X (B, in), W (out, in), b (out), Y (B, out)
//   loss            L  = mean((Y - T)^2)      T (B, out); or the sum, or elementwise ("none")
//   loss gradient   dY = 2 (Y - T) / N        N = B*out for "mean", 1 for "sum"
//   input grad      dX = dY W                 dX (B, in)
//   weight grad     dW = dY^T X               dW (out, in): sum over the batch of outer products
//   bias grad       db = sum_b dY[b]          db (out)
//
// This header is the whole C++ API. It knows nothing of Python: callers validate shapes (the
// Python bindings do, in csrc/bindings/arrays.cpp). Inputs are strided views (any strides, in
// elements, zero and negative included); outputs are dense row-major arrays that do not overlap
// the inputs. Results are bitwise identical for any number of threads: threads split the
// outputs, never a reduction, and no block size depends on the thread count.
#pragma once
#include <cstddef>
#include <cstdint>
#include <iterator>

namespace lingrad {

using index_t = std::int64_t;

// A read-only strided matrix: element (r, c) is data[r*rs + c*cs].
template <typename T>
struct MatrixView {
  const T* data;
  index_t rows, cols;
  index_t rs, cs;
};

// A read-only strided vector, or "absent" when data is null.
template <typename T>
struct VectorView {
  const T* data = nullptr;
  index_t size = 0;
  index_t stride = 1;
};

enum class Reduction { none, mean, sum };

// The MSE loss's two formulas, for the standalone loss (mse.cpp) and the fused steps (linear.cpp,
// mlp.cpp), with N = count, the number of elements: dY = scale (Y - T) with scale = 2 / N for "mean"
// and 2 for "sum" and "none" (each element's own square); the loss of the summed squares is
// squares / N for "mean" (NaN for no elements, as in torch) and squares for "sum".
static inline double mse_grad_scale(Reduction reduction, double count) {
  return reduction == Reduction::mean ? 2.0 / count : 2.0;
}
static inline double mse_of_squares(Reduction reduction, double squares, double count) {
  return reduction == Reduction::mean ? squares / count : squares;
}

// Y (B, out) = X W^T (+ bias).
template <typename T>
void linear_forward(MatrixView<T> x, MatrixView<T> w, VectorView<T> bias, T* y);

// dX (B, in) = dY W.
template <typename T>
void linear_backward_input(MatrixView<T> dy, MatrixView<T> w, T* dx);

// dW (out, in) = dY^T X, and db (out) = column sums of dY in the same pass when db is not null.
template <typename T>
void linear_backward_weight(MatrixView<T> dy, MatrixView<T> x, T* dw, T* db);

// Loss of pred against target (same shape). For mean/sum returns the loss (accumulated in
// double); for none writes (pred - target)^2 to out_none and returns 0.
template <typename T>
double mse_loss(MatrixView<T> pred, MatrixView<T> target, Reduction reduction, T* out_none);

// grad (dense, pred's shape) = 2 (pred - target) / N, N = element count for mean, else 1.
template <typename T>
void mse_backward(MatrixView<T> pred, MatrixView<T> target, Reduction reduction, T* grad);

// The fused training step: the forward pass, the loss (mean or sum) and dY in the epilogue of
// the forward GEMM, then dX (if dx is not null), dW and db (if db is not null).
// Returns the loss. Y is never stored: its tiles become dY while still in cache. dY (B, out) is
// written to dy when it is not null (the caller keeps it, e.g. for a later backward pass), else
// to a buffer of the call's own.
template <typename T>
double linear_mse(MatrixView<T> x, MatrixView<T> w, VectorView<T> bias, MatrixView<T> target, Reduction reduction,
                  T* dx, T* dw, T* db, T* dy = nullptr);

// ---------------------------------------------------------------------------------------------
// bfloat16 products: the operands' values rounded to bfloat16 (to nearest, ties to even), each
// product of two of them exact in float32, the sums in float32. Every ISA path but AMX computes the
// same bits (see gemm/pack_bf16.inc: the pairs of K); a denormal bfloat16 operand counts as zero, as the
// AVX512-BF16 instruction reads it.

struct bfloat16 {
  std::uint16_t bits;
};

// The conversions, with internal linkage so that no build shares a copy compiled for another ISA.
static inline float bf16_to_float(bfloat16 h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h.bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}
// Round to nearest even; a NaN stays a (quiet) NaN. Branch-free, so that loops of it vectorise.
static inline bfloat16 float_to_bf16(float f) {
  std::uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet_nan = (u >> 16) | 0x40u;
  return {static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}

// An operand of a bfloat16 product: bfloat16 values, or float32 values rounded to bfloat16 as the
// engine packs them (never converted by a separate copy). Exactly one of f32 and bf16 is set.
struct Bf16Matrix {
  const float* f32 = nullptr;
  const bfloat16* bf16 = nullptr;
  index_t rows = 0, cols = 0;
  index_t rs = 0, cs = 0;  // element (r, c) at [r*rs + c*cs]
};

// Where a result of a bfloat16 product goes, dense row-major: float32 values (f32), or rounded to
// bfloat16 (bf16: then f32 is null and the float32 sums live in a scratch buffer of the call).
struct Bf16Output {
  float* f32 = nullptr;
  bfloat16* bf16 = nullptr;
};

// The layer's products and the fused step of linear_forward ... linear_mse, for bfloat16 operands.
// The bias, the target and db are float32 (the bindings widen a bfloat16 bias or target, a vector
// and a (B, out) matrix; dY is kept in float32 and rounded to bfloat16 as dX's and dW's products
// pack it, as PyTorch's autocast rounds it).
void linear_forward_bf16(Bf16Matrix x, Bf16Matrix w, VectorView<float> bias, Bf16Output y);
void linear_backward_input_bf16(Bf16Matrix dy, Bf16Matrix w, Bf16Output dx);
void linear_backward_weight_bf16(Bf16Matrix dy, Bf16Matrix x, Bf16Output dw, float* db);
double linear_mse_bf16(Bf16Matrix x, Bf16Matrix w, VectorView<float> bias, MatrixView<float> target,
                       Reduction reduction, Bf16Output dx, Bf16Output dw, float* db, float* dy = nullptr);

// How the ISA in use runs bfloat16 products: "amx" (AMX tiles), "vdpbf16ps" (AVX512-BF16 pair dot
// products) or "widened" (to float32 while packing, the float32 micro-kernel). And the machine's peak
// with those instructions in GFLOP/s (0 for "widened"), measured like measure_fma_peak.
const char* bf16_kernel();
double measure_bf16_peak(int threads, double seconds);

// ---------------------------------------------------------------------------------------------
// Whole small networks (mlp.cpp): L Linear layers, each followed by an elementwise activation.
//
//   H_0 = X (B, in_0);   Z_l = H_{l-1} W_l^T + b_l (B, out_l);   H_l = act_l(Z_l);   Y = H_L
//
// and back from dY = dL/dY:  dZ_l = dH_l * act_l'(Z_l);  dW_l = dZ_l^T H_{l-1};  db_l = sum_b dZ_l;
//   dH_{l-1} = dZ_l W_l.  Bias and activation run in the forward products' epilogues, act' in the
// input-gradient products' epilogues, while each tile of the result is still in cache.

enum class Activation { identity, relu, leaky_relu, tanh, sigmoid, gelu, gelu_tanh, silu };
constexpr std::size_t kActivationCount = static_cast<std::size_t>(Activation::silu) + 1;
// Their names, in the enum's order: the bindings parse them, Python reads them as lingrad._C.ACTIVATIONS.
inline constexpr const char* kActivationNames[] = {"identity", "relu", "leaky_relu", "tanh",
                                                   "sigmoid",  "gelu", "gelu_tanh",  "silu"};
static_assert(std::size(kActivationNames) == kActivationCount, "one name per Activation, in its order");

// Whether act' must be computed from the pre-activation Z (else the output H is enough: ReLU,
// Tanh, Sigmoid, LeakyReLU with a positive slope, Identity).
bool activation_needs_pre(Activation act, double slope);

template <typename T>
struct MlpLayer {
  MatrixView<T> weight;  // (out, in)
  VectorView<T> bias;    // (out), or absent
  Activation act = Activation::identity;
  T slope = 0;  // LeakyReLU's negative slope
};

// What a forward pass keeps for backward, per layer l: its output H_l (B, out_l; for the last
// layer the caller's y) and, where act_l' needs it, its pre-activation Z_l (else null).
template <typename T>
struct MlpSaved {
  T* h = nullptr;
  T* z = nullptr;
};

// Y (B, out_L). With saved (n entries; h of the last one unused), every layer's H and the Z that
// backward needs are kept there; without, two scratch buffers carry the activations.
template <typename T>
void mlp_forward(MatrixView<T> x, const MlpLayer<T>* layers, int n, T* y, const MlpSaved<T>* saved);

// The gradients of a forward pass that kept `saved`, for dY (B, out_L) at its output y: dX (if dx
// is not null), and dW_l, db_l (each if not null).
template <typename T>
void mlp_backward(MatrixView<T> x, const MlpLayer<T>* layers, int n, const MlpSaved<T>* saved, const T* y,
                  MatrixView<T> dy, T* dx, T* const* dw, T* const* db);

// The whole training step with the MSE loss on the output (mean or sum): the forward pass, the loss
// and dZ_L in the last product's epilogue, then every gradient. Returns the loss.
template <typename T>
double mlp_mse(MatrixView<T> x, const MlpLayer<T>* layers, int n, MatrixView<T> target, Reduction reduction, T* dx,
               T* const* dw, T* const* db);

// ---------------------------------------------------------------------------------------------
// Optimizers (optim.cpp): PyTorch's update rules, element by element, with PyTorch's roundings
// (torch/optim/sgd.py and adam.py, _single_tensor_*: what CPU tensors run). Where ATen's CPU kernels
// fuse a multiply and an add (Tensor.add(alpha=), lerp, addcmul), so does the rule (std::fma), so
// that a step computes PyTorch's bits; the hyperparameters are rounded to T where PyTorch does.
//
//   SGD   g = -grad if maximize else grad;  g += wd p;  buf = g (first step) or mom buf + (1 - damp) g;
//         g = g + mom buf (nesterov) or buf;  p -= lr g
//   Adam  step += 1;  p *= 1 - lr wd (AdamW) or g += wd p (Adam);  m = lerp(m, g, 1 - beta1);
//         v = beta2 v + (1 - beta2) g^2;  vmax = max(vmax, v) (amsgrad);
//         p -= lr / (1 - beta1^step) m / (sqrt(v or vmax) / sqrt(1 - beta2^step) + eps)

enum class OptimizerKind { sgd, adam };

// One parameter group's hyperparameters, as torch.optim's param_groups hold them.
struct OptimizerHyper {
  OptimizerKind kind = OptimizerKind::sgd;
  double lr = 0, weight_decay = 0;
  bool maximize = false;
  double momentum = 0, dampening = 0;  // SGD
  bool nesterov = false;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // Adam, AdamW
  bool amsgrad = false, decoupled = false;        // decoupled: AdamW's weight decay
};

// One trainable tensor and its optimizer state, each dense with `size` elements (state in PyTorch's
// layout: optimizer.state[p]["momentum_buffer"], "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step").
template <typename T>
struct ParamState {
  T* value = nullptr;  // updated in place
  index_t size = 0;
  const OptimizerHyper* hyper = nullptr;  // null: frozen, never updated
  T* momentum_buffer = nullptr;           // SGD with momentum != 0
  bool fresh_buffer = false;              // ... which holds nothing yet: this step sets it to g (torch's clone)
  T* exp_avg = nullptr;                   // Adam
  T* exp_avg_sq = nullptr;
  T* max_exp_avg_sq = nullptr;  // amsgrad
  float* step_f32 = nullptr;    // Adam's step count, a 0-d float32 tensor (or float64: step_f64) as torch keeps it
  double* step_f64 = nullptr;
};

// The optimizer's update of p from its gradient grad (p.size elements); nothing for a frozen p.
// Elements are shared out to threads (the same bits for any number).
template <typename T>
void optimizer_update(const ParamState<T>& p, const T* grad);

// Asks the CPU to bring p's optimizer state (momentum buffer, Adam's moments) into cache, to be read
// by a later optimizer_update: a step issues it for small networks before their forward pass, whose
// products then hide the loads (between steps other work may have evicted the state). Changes nothing.
template <typename T>
void optimizer_prefetch(const ParamState<T>& p);

// ---------------------------------------------------------------------------------------------
// The whole training step of a network (mlp.cpp): forward, loss, backward and the optimizer's update
// of each layer's weight and bias as soon as their gradients are complete (while in cache).

enum class Loss { mse, cross_entropy, huber, bce_with_logits };
// Their names, in the enum's order (the bindings parse them).
inline constexpr const char* kLossNames[] = {"mse", "cross_entropy", "huber", "bce_with_logits"};
static_assert(std::size(kLossNames) == static_cast<std::size_t>(Loss::bce_with_logits) + 1, "one name per Loss");

// A step's loss on the network's output Y (B, out_L), with PyTorch's definitions (torch.nn.functional):
//   mse              (y - t)^2                                    t (B, out_L)
//   cross_entropy    log-softmax over each row: lse(y_b) - y_b[t_b]   classes t (B) in [0, out_L)
//   huber            |r| < delta ? r^2 / 2 : delta (|r| - delta / 2),  r = y - t
//   bce_with_logits  max(y, 0) - y t + log(1 + exp(-|y|))         (binary cross-entropy of sigmoid(y))
// summed ("sum") or averaged ("mean": over the B * out_L elements; over the B rows for cross_entropy).
struct LossSpec {
  Loss kind = Loss::mse;
  Reduction reduction = Reduction::mean;
  double delta = 1.0;  // huber's
};

// What a step needs besides the parameters, kept by the caller from step to step: it grows when a
// batch needs more and is otherwise reused (no allocation per step).
template <typename T>
struct TrainWorkspace {
  T* memory = nullptr;
  index_t capacity = 0;  // elements of memory
  double* rows = nullptr;
  index_t row_capacity = 0;
  TrainWorkspace() = default;
  TrainWorkspace(const TrainWorkspace&) = delete;
  TrainWorkspace& operator=(const TrainWorkspace&) = delete;
  ~TrainWorkspace();
  T* reserve(index_t elements);
  double* reserve_rows(index_t count);
};

// The loss (LossSpec) of the network's output against target (B, out_L), or against classes (B)
// for cross_entropy. weights[l], biases[l]: the state of layers[l]'s weight and bias (value: the same memory as the
// layer's view, dense; hyper null where frozen or absent). Returns the loss before the update.
template <typename T>
double mlp_train_step(MatrixView<T> x, const MlpLayer<T>* layers, int n, const LossSpec& loss, MatrixView<T> target,
                      const std::int64_t* classes, const ParamState<T>* weights, const ParamState<T>* biases,
                      TrainWorkspace<T>& workspace);

// ---------------------------------------------------------------------------------------------
// Per-sample gradients, for clipping and differentially private training (privacy.cpp).
//
// A batch of per-sample matrices: sample b's (steps, features) matrix is m with its data at
// data + b * batch_stride. A 2-D (B, features) array is B samples of one step (steps = 1).
template <typename T>
struct SampleView {
  MatrixView<T> m;  // one sample: (steps, features), its data the first sample's
  index_t batch = 0, batch_stride = 0;
};

// Sample b's weight gradient is G_b = dY_b^T X_b (out, in), its bias gradient g_b = sum_t dY_b[t]
// (out). norms[b] (B) = sqrt(||G_b||_F^2 + ||g_b||^2) (the bias term only if bias), accumulated in
// double, without storing G_b whole. Per sample, the cheaper of two ways (multiply-adds):
//   Gram   ||G_b||^2 = sum_{t,s} <dY_t, dY_s> <X_t, X_s>, over t <= s:   T (T + 1) / 2 (in + out)
//   rows   G_b one row at a time (in doubles), its squares summed:        T in out
// the Gram form when T (T + 1) / 2 (in + out) <= T in out (always for T = 1: ||dY_b||^2 ||X_b||^2).
// Samples are shared out to threads; each is summed by one thread in a fixed order.
template <typename T>
void linear_per_sample_grad_norms(SampleView<T> dy, SampleView<T> x, bool bias, double* norms);
// Whether linear_per_sample_grad_norms takes the Gram form for these sizes.
bool per_sample_norms_use_gram(index_t steps, index_t in, index_t out);

// The weighted weight gradient: dW (out, in) = sum_b s_b dY[b]^T X[b] = (s * dY)^T X, and db (out)
// = sum_b s_b dY[b] when db is not null, in one pass of the GEMM engine (the weights scale dY^T's
// columns while it is packed). dy (B, out), x (B, in), s (B).
template <typename T>
void linear_backward_weight_weighted(MatrixView<T> dy, MatrixView<T> x, VectorView<T> sample_weights, T* dw, T* db);

// out (B, out, in, dense) = G_b = dY_b^T X_b for every sample (for T = 1 the outer products dY[b] X[b]^T).
template <typename T>
void linear_per_sample_grads(SampleView<T> dy, SampleView<T> x, T* out);

// ---------------------------------------------------------------------------------------------
// Threads and instruction sets (process-wide, thread-safe).
int get_num_threads();
void set_num_threads(int n);  // n >= 1; ignored (stays 1) in a build without OpenMP
bool has_openmp();

const char* get_isa();           // the micro-kernel set in use: "avx512_bf16", "avx512", "avx2" or "generic"
bool set_isa(const char* name);  // false if unknown or not supported by this CPU
int available_isas(const char** names, int capacity);  // supported by this build and CPU, best first
// The GEMM engine's own choices (block sizes, thresholds, the plan of a product): gemm/plan.hpp.

// The machine's float32 FMA peak in GFLOP/s with the given threads, measured with the active
// build's instructions (12 independent FMA chains per thread, best of repeats over ~seconds).
double measure_fma_peak(int threads, double seconds);
// The float32 micro-kernel's rate in GFLOP/s on panels in L1 (no packing, no cache misses), measured
// like measure_fma_peak: the share of the peak that the register tile itself reaches.
double measure_tile_rate(int threads, double seconds);

}  // namespace lingrad
