// Whole small networks in one call (lingrad.hpp: mlp_forward, mlp_backward, mlp_mse): the layers'
// products run one after the other on the GEMM engine, each with its bias and activation (forward)
// or its activation's derivative (the input-gradient products) in the epilogue, so no elementwise
// pass reads an activation again. Shapes: X (B, in_0), W_l (out_l, in_l) with in_l = out_{l-1}.
#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>
#include <vector>

#include "products.hpp"
#include "team.hpp"

namespace lingrad {

bool activation_needs_pre(Activation act, double slope) {
  switch (act) {
    case Activation::gelu:
    case Activation::gelu_tanh:
    case Activation::silu:
      return true;
    case Activation::leaky_relu:
      return !(slope > 0);  // a slope <= 0 makes the output's sign say nothing of z's
    default:
      return false;
  }
}

namespace {

template <typename T>
index_t widest(const MlpLayer<T>* layers, int n) {
  index_t w = 1;
  for (int l = 0; l < n; ++l) w = std::max(w, layers[l].weight.rows);
  return w;
}

template <typename T>
MatrixView<T> dense(const T* data, index_t rows, index_t cols) {
  return {data, rows, cols, cols, 1};
}

// Z_l = H W_l^T + b_l into out (B, out_l), with act_l applied, and Z_l kept in pre if set.
template <typename T>
void layer_forward(MatrixView<T> h, const MlpLayer<T>& layer, T* out, T* pre) {
  GemmArgs<T> g = forward_args(h, layer.weight, out);
  g.epilogue.bias = layer.bias;
  g.epilogue.act = layer.act;
  g.epilogue.slope = layer.slope;
  g.epilogue.pre = pre;
  g.epilogue.saved_ld = layer.weight.rows;
  gemm(g);
}

// The backward sweep from dZ_{n-1} (B, out_last) in dz: dW_l, db_l for every layer where asked
// (dw[l], db[l] not null) and dX (if dx is not null). layer_input(l) is H_{l-1} (X for l = 0). dz is
// overwritten. done(l) runs as soon as layer l's dW_l and db_l are complete, after the sweep's last
// read of W_l (dZ_{l-1} = dZ_l W_l is made first): the train step updates the layer there, while its
// weight and gradient are in cache. The sweep stops at the lowest layer that needs anything.
template <typename T, typename Input, typename Done>
void backward_sweep(const MlpLayer<T>* layers, int n, const MlpSaved<T>* saved, Input layer_input, T* dz, T* scratch,
                    T* dx, T* const* dw, T* const* db, const Done& done) {
  const index_t batch = layer_input(0).rows;
  int lowest = n;  // the lowest layer whose gradients are wanted (0 when dX is)
  for (int l = 0; l < n && !dx; ++l)
    if (dw[l] || db[l]) lowest = std::min(lowest, l);
  if (dx) lowest = 0;
  for (int l = n - 1; l >= lowest; --l) {
    const MlpLayer<T>& layer = layers[l];
    const MatrixView<T> dz_view = dense<T>(dz, batch, layer.weight.rows);
    if (l > lowest) {  // dZ_{l-1} = (dZ_l W_l) * act_{l-1}'(.), the derivative in the product's epilogue
      const MlpLayer<T>& below = layers[l - 1];
      GemmArgs<T> g = input_grad_args(dz_view, layer.weight, scratch);
      g.epilogue.grad_act = below.act;
      g.epilogue.slope = below.slope;
      g.epilogue.at_is_pre = saved[l - 1].z != nullptr;
      g.epilogue.at = g.epilogue.at_is_pre ? saved[l - 1].z : saved[l - 1].h;
      if (below.act == Activation::identity) g.epilogue.at = nullptr;
      g.epilogue.saved_ld = below.weight.rows;
      gemm(g);
    } else if (dx) {
      gemm(input_grad_args(dz_view, layer.weight, dx));
    }
    if (dw[l]) gemm(weight_grad_args(dz_view, layer_input(l), dw[l], db[l]));
    if (!dw[l] && db[l]) {  // a frozen weight with a trained bias: the column sums alone
      for (index_t o = 0; o < layer.weight.rows; ++o) db[l][o] = T(0);
      for (index_t b = 0; b < batch; ++b)
        for (index_t o = 0; o < layer.weight.rows; ++o) db[l][o] += dz[b * layer.weight.rows + o];
    }
    done(l);
    if (l > lowest) std::swap(dz, scratch);
  }
}

// Optimizer state up to this size is prefetched at the start of a step (mlp_train_step): well within
// L2, so that it is still there at each layer's update.
constexpr index_t kPrefetchStateBytes = 256 << 10;

struct NothingMore {
  void operator()(int) const {}
};

// Where a step keeps its activations in `memory` (total_step_elements(...) elements): every hidden
// layer's H (and Z where act' needs it) in saved[l], the last layer's too if keep_last (the
// cross-entropy's logits), then dZ's two buffers of B x (widest layer) each, returned as dz.
template <typename T>
index_t step_elements(const MlpLayer<T>* layers, int n, index_t batch, bool keep_last) {
  index_t total = 2 * batch * widest(layers, n);
  for (int l = 0; l < (keep_last ? n : n - 1); ++l)
    total += batch * layers[l].weight.rows * (activation_needs_pre(layers[l].act, layers[l].slope) ? 2 : 1);
  return total;
}

template <typename T>
T* carve_step(const MlpLayer<T>* layers, int n, index_t batch, bool keep_last, MlpSaved<T>* saved, T* next) {
  for (int l = 0; l < (keep_last ? n : n - 1); ++l) {
    const index_t size = batch * layers[l].weight.rows;
    saved[l].h = next;
    next += size;
    if (activation_needs_pre(layers[l].act, layers[l].slope)) {
      saved[l].z = next;
      next += size;
    }
  }
  return next;
}

// Row b's cross-entropy of logits z (B, C) against class classes[b], in double: the stable
// log-softmax lse = max + log(sum exp(z - max)); rows[b] = lse - z[b, t] and
// dz[b, j] = scale (softmax_j - [j == t]).
template <typename T>
void cross_entropy_rows(const T* z, index_t batch, index_t classes, const std::int64_t* target, double scale, T* dz,
                        double* rows) {
  const int threads = batch * classes >= (index_t(1) << 15) ? get_num_threads() : 1;
  run_team(threads, [&](int thread, int team) {
    const Share s = share(batch, thread, team);
    for (index_t b = s.first; b < s.last; ++b) {
      const T* row = z + b * classes;
      double top = -INFINITY;
      for (index_t j = 0; j < classes; ++j)
        if (row[j] > top || row[j] != row[j]) top = row[j];  // (a NaN stays)
      double sum = 0;
      for (index_t j = 0; j < classes; ++j) sum += std::exp(double(row[j]) - top);
      const double lse = top + std::log(sum);
      const std::int64_t t = target[b];
      rows[b] = lse - double(row[t]);
      for (index_t j = 0; j < classes; ++j)
        dz[b * classes + j] = static_cast<T>(scale * (std::exp(double(row[j]) - lse) - (j == t ? 1.0 : 0.0)));
    }
  });
}

// Huber's and the binary cross-entropy's elementwise loss of y (B, C) against target, each row's sum
// in rows[b] (in double), and dz = scale * dloss/dy (PyTorch's derivatives: Huber's r clamped to
// [-delta, delta]; sigmoid(y) - t).
template <typename T>
void elementwise_rows(Loss kind, double delta, const T* y, index_t batch, index_t cols, MatrixView<T> target,
                      double scale, T* dz, double* rows) {
  const int threads = batch * cols >= (index_t(1) << 15) ? get_num_threads() : 1;
  run_team(threads, [&](int thread, int team) {
    const Share s = share(batch, thread, team);
    for (index_t b = s.first; b < s.last; ++b) {
      double sum = 0;
      for (index_t j = 0; j < cols; ++j) {
        const double v = y[b * cols + j], t = target.data[b * target.rs + j * target.cs];
        double value, grad;
        if (kind == Loss::huber) {
          const double r = v - t, a = std::fabs(r);
          value = a < delta ? 0.5 * r * r : delta * (a - 0.5 * delta);
          grad = r < -delta ? -delta : r > delta ? delta : r;
        } else {  // bce_with_logits, in the stable form
          value = std::max(v, 0.0) - v * t + std::log1p(std::exp(-std::fabs(v)));
          grad = 1.0 / (1.0 + std::exp(-v)) - t;
        }
        sum += value;
        dz[b * cols + j] = static_cast<T>(scale * grad);
      }
      rows[b] = sum;
    }
  });
}

// The forward pass (every layer's H and needed Z into saved), then the loss of the output and
// dZ_{n-1} into dz. Returns the loss.
template <typename T>
double forward_and_loss(MatrixView<T> x, const MlpLayer<T>* layers, int n, const LossSpec& loss, MatrixView<T> target,
                        const std::int64_t* classes, const MlpSaved<T>* saved, T* dz, double* rows) {
  const Reduction reduction = loss.reduction;
  const index_t batch = x.rows, out = layers[n - 1].weight.rows;
  MatrixView<T> h = x;
  for (int l = 0; l + 1 < n; ++l) {
    layer_forward(h, layers[l], saved[l].h, saved[l].z);
    h = dense<T>(saved[l].h, batch, layers[l].weight.rows);
  }
  const MlpLayer<T>& last = layers[n - 1];
  if (loss.kind == Loss::mse) {
    // The last layer: its output's residual, the loss and dZ = scale (act(z) - t) act'(z), in the epilogue.
    const double count = static_cast<double>(batch) * static_cast<double>(out);
    double squares = 0;
    GemmArgs<T> g = forward_args(h, last.weight, dz);
    g.epilogue.bias = last.bias;
    g.epilogue.act = last.act;
    g.epilogue.slope = last.slope;
    set_mse_epilogue(g.epilogue, target, reduction, count, &squares);
    gemm(g);
    return mse_of_squares(reduction, squares, count);
  }
  // The other losses: the output act(z) kept, then row by row, then dZ = dY * act'(z).
  layer_forward(h, last, saved[n - 1].h, saved[n - 1].z);
  const double count = loss.kind == Loss::cross_entropy ? static_cast<double>(batch)
                                                        : static_cast<double>(batch) * static_cast<double>(out);
  const double scale = reduction == Reduction::mean ? 1.0 / count : 1.0;
  if (loss.kind == Loss::cross_entropy)
    cross_entropy_rows(saved[n - 1].h, batch, out, classes, scale, dz, rows);
  else
    elementwise_rows(loss.kind, loss.delta, saved[n - 1].h, batch, out, target, scale, dz, rows);
  if (last.act != Activation::identity) {
    Epilogue<T> e;
    e.grad_act = last.act;
    e.slope = last.slope;
    e.at_is_pre = saved[n - 1].z != nullptr;
    e.at = e.at_is_pre ? saved[n - 1].z : saved[n - 1].h;
    e.saved_ld = out;
    epilogue(e, dz, batch, out);
  }
  const double total = ordered_sum(rows, batch);
  return reduction == Reduction::mean ? total / count : total;
}

}  // namespace

template <typename T>
void mlp_forward(MatrixView<T> x, const MlpLayer<T>* layers, int n, T* y, const MlpSaved<T>* saved) {
  const index_t batch = x.rows, width = widest(layers, n);
  std::unique_ptr<T[]> buffers;
  if (!saved) buffers.reset(new T[2 * std::max<index_t>(batch * width, 1)]);
  MatrixView<T> h = x;
  for (int l = 0; l < n; ++l) {
    const index_t out = layers[l].weight.rows;
    T* dst = l == n - 1 ? y : saved ? saved[l].h : buffers.get() + (l % 2) * batch * width;
    layer_forward(h, layers[l], dst, saved ? saved[l].z : nullptr);
    h = dense<T>(dst, batch, out);
  }
}

template <typename T>
void mlp_backward(MatrixView<T> x, const MlpLayer<T>* layers, int n, const MlpSaved<T>* saved, const T* y,
                  MatrixView<T> dy, T* dx, T* const* dw, T* const* db) {
  const index_t batch = x.rows, width = widest(layers, n);
  std::unique_ptr<T[]> buffers(new T[2 * std::max<index_t>(batch * width, 1)]);
  T* dz = buffers.get();
  T* scratch = dz + batch * width;
  // dZ of the last layer: dY * act'(.) from its pre-activation or its output y.
  const MlpLayer<T>& last = layers[n - 1];
  const index_t out = last.weight.rows;
  for (index_t b = 0; b < batch; ++b)
    for (index_t o = 0; o < out; ++o) dz[b * out + o] = dy.data[b * dy.rs + o * dy.cs];
  if (last.act != Activation::identity) {
    Epilogue<T> e;
    e.grad_act = last.act;
    e.slope = last.slope;
    e.at_is_pre = saved[n - 1].z != nullptr;
    e.at = e.at_is_pre ? saved[n - 1].z : y;
    e.saved_ld = out;
    epilogue(e, dz, batch, out);
  }
  auto layer_input = [&](int l) { return l == 0 ? x : dense<T>(saved[l - 1].h, batch, layers[l - 1].weight.rows); };
  backward_sweep(layers, n, saved, layer_input, dz, scratch, dx, dw, db, NothingMore{});
}

template <typename T>
double mlp_mse(MatrixView<T> x, const MlpLayer<T>* layers, int n, MatrixView<T> target, Reduction reduction, T* dx,
               T* const* dw, T* const* db) {
  const index_t batch = x.rows, width = widest(layers, n);
  std::vector<MlpSaved<T>> saved(n);
  std::unique_ptr<T[]> memory(new T[std::max<index_t>(step_elements(layers, n, batch, false), 1)]);
  T* dz = carve_step(layers, n, batch, false, saved.data(), memory.get());
  T* scratch = dz + batch * width;
  const double loss =
      forward_and_loss(x, layers, n, LossSpec{Loss::mse, reduction}, target, nullptr, saved.data(), dz, nullptr);
  auto layer_input = [&](int l) { return l == 0 ? x : dense<T>(saved[l - 1].h, batch, layers[l - 1].weight.rows); };
  backward_sweep(layers, n, saved.data(), layer_input, dz, scratch, dx, dw, db, NothingMore{});
  return loss;
}

template <typename T>
TrainWorkspace<T>::~TrainWorkspace() {
  delete[] memory;
  delete[] rows;
}

namespace {
// buffer with room for at least count elements: kept if it has it, else replaced (its values are
// not kept). If the allocation throws, the buffer is left empty and consistent.
template <typename U>
U* grow(U*& buffer, index_t& capacity, index_t count) {
  if (count > capacity) {
    delete[] buffer;
    buffer = nullptr;
    capacity = 0;
    buffer = new U[count];
    capacity = count;
  }
  return buffer;
}
}  // namespace

template <typename T>
T* TrainWorkspace<T>::reserve(index_t elements) {
  return grow(memory, capacity, elements);
}

template <typename T>
double* TrainWorkspace<T>::reserve_rows(index_t count) {
  return grow(rows, row_capacity, count);
}

template <typename T>
double mlp_train_step(MatrixView<T> x, const MlpLayer<T>* layers, int n, const LossSpec& loss, MatrixView<T> target,
                      const std::int64_t* classes, const ParamState<T>* weights, const ParamState<T>* biases,
                      TrainWorkspace<T>& workspace) {
  const index_t batch = x.rows, width = widest(layers, n);
  const bool keep_last = loss.kind != Loss::mse;
  // The workspace: activations and dZ (step_elements), then the trained parameters' gradients.
  index_t total = step_elements(layers, n, batch, keep_last);
  for (int l = 0; l < n; ++l)
    total += (weights[l].hyper ? weights[l].size : 0) + (biases[l].hyper ? biases[l].size : 0);
  T* memory = workspace.reserve(std::max<index_t>(total, 1));
  double* rows = keep_last ? workspace.reserve_rows(std::max<index_t>(batch, 1)) : nullptr;
  MlpSaved<T> saved_small[8];  // (no allocation for networks of up to 8 layers)
  std::unique_ptr<MlpSaved<T>[]> saved_large;
  MlpSaved<T>* saved = saved_small;
  if (n > 8) saved = (saved_large.reset(new MlpSaved<T>[n]), saved_large.get());
  for (int l = 0; l < n; ++l) saved[l] = MlpSaved<T>{};
  T* dz = carve_step(layers, n, batch, keep_last, saved, memory);
  T* scratch = dz + batch * width;
  T* next = scratch + batch * width;
  T* grads_small[16];
  std::unique_ptr<T*[]> grads_large;
  T** grads = grads_small;
  if (n > 8) grads = (grads_large.reset(new T*[2 * n]), grads_large.get());
  T** dw = grads;
  T** db = grads + n;
  for (int l = 0; l < n; ++l) {
    dw[l] = weights[l].hyper ? std::exchange(next, next + weights[l].size) : nullptr;
    db[l] = biases[l].hyper ? std::exchange(next, next + biases[l].size) : nullptr;
  }

  // A small network's optimizer state is fetched into cache now, while the forward pass runs (a large
  // one's would not stay there until its update; its loops stream it).
  index_t state_bytes = 0;
  for (int l = 0; l < n; ++l)
    for (const ParamState<T>* p : {&weights[l], &biases[l]})
      if (p->hyper)
        state_bytes += p->size * static_cast<index_t>(sizeof(T)) *
                       ((p->momentum_buffer ? 1 : 0) + (p->exp_avg ? 2 : 0) + (p->max_exp_avg_sq ? 1 : 0));
  if (state_bytes <= kPrefetchStateBytes)
    for (int l = 0; l < n; ++l) {
      optimizer_prefetch(weights[l]);
      optimizer_prefetch(biases[l]);
    }
  const double result = forward_and_loss(x, layers, n, loss, target, classes, saved, dz, rows);
  auto layer_input = [&](int l) { return l == 0 ? x : dense<T>(saved[l - 1].h, batch, layers[l - 1].weight.rows); };
  auto update = [&](int l) {  // layer l's gradients are complete and W_l is read no more: its update
    if (dw[l]) optimizer_update(weights[l], dw[l]);
    if (db[l]) optimizer_update(biases[l], db[l]);
  };
  backward_sweep(layers, n, saved, layer_input, dz, scratch, static_cast<T*>(nullptr), dw, db, update);
  return result;
}

#define LINGRAD_INSTANTIATE(T)                                                                                       \
  template void mlp_forward<T>(MatrixView<T>, const MlpLayer<T>*, int, T*, const MlpSaved<T>*);                      \
  template void mlp_backward<T>(MatrixView<T>, const MlpLayer<T>*, int, const MlpSaved<T>*, const T*, MatrixView<T>, \
                                T*, T* const*, T* const*);                                                           \
  template double mlp_mse<T>(MatrixView<T>, const MlpLayer<T>*, int, MatrixView<T>, Reduction, T*, T* const*,        \
                             T* const*);                                                                             \
  template struct TrainWorkspace<T>;                                                                                 \
  template double mlp_train_step<T>(MatrixView<T>, const MlpLayer<T>*, int, const LossSpec&, MatrixView<T>,          \
                                    const std::int64_t*, const ParamState<T>*, const ParamState<T>*,                 \
                                    TrainWorkspace<T>&);
LINGRAD_INSTANTIATE(float)
LINGRAD_INSTANTIATE(double)
#undef LINGRAD_INSTANTIATE

}  // namespace lingrad
