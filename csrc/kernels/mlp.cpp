// Whole small networks in one call (lingrad.hpp: mlp_forward, mlp_backward, mlp_mse): the layers'
// products run one after the other on the GEMM engine, each with its bias and activation (forward)
// or its activation's derivative (the input-gradient products) in the epilogue, so no elementwise
// pass reads an activation again. Shapes: X (B, in_0), W_l (out_l, in_l) with in_l = out_{l-1}.
#include <algorithm>
#include <memory>
#include <vector>

#include "products.hpp"

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

// The backward sweep from dZ_{n-1} (B, out_last) in dz: dW_l, db_l for every layer and dX.
// layer_input(l) is H_{l-1} (X for l = 0). dz is overwritten.
template <typename T, typename Input>
void backward_sweep(const MlpLayer<T>* layers, int n, const MlpSaved<T>* saved, Input layer_input, T* dz, T* scratch,
                    T* dx, T* const* dw, T* const* db) {
  const index_t batch = layer_input(0).rows;
  for (int l = n - 1; l >= 0; --l) {
    const MlpLayer<T>& layer = layers[l];
    const MatrixView<T> dz_view = dense<T>(dz, batch, layer.weight.rows);
    if (dw[l]) gemm(weight_grad_args(dz_view, layer_input(l), dw[l], db[l]));
    if (!dw[l] && db[l]) {  // a frozen weight with a trained bias: the column sums alone
      for (index_t o = 0; o < layer.weight.rows; ++o) db[l][o] = T(0);
      for (index_t b = 0; b < batch; ++b)
        for (index_t o = 0; o < layer.weight.rows; ++o) db[l][o] += dz[b * layer.weight.rows + o];
    }
    if (l > 0) {  // dZ_{l-1} = (dZ_l W_l) * act_{l-1}'(.), the derivative in the product's epilogue
      const MlpLayer<T>& below = layers[l - 1];
      GemmArgs<T> g = input_grad_args(dz_view, layer.weight, scratch);
      g.epilogue.grad_act = below.act;
      g.epilogue.slope = below.slope;
      g.epilogue.at_is_pre = saved[l - 1].z != nullptr;
      g.epilogue.at = g.epilogue.at_is_pre ? saved[l - 1].z : saved[l - 1].h;
      if (below.act == Activation::identity) g.epilogue.at = nullptr;
      g.epilogue.saved_ld = below.weight.rows;
      gemm(g);
      std::swap(dz, scratch);
    } else if (dx) {
      gemm(input_grad_args(dz_view, layer.weight, dx));
    }
  }
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
  backward_sweep(layers, n, saved, layer_input, dz, scratch, dx, dw, db);
}

template <typename T>
double mlp_mse(MatrixView<T> x, const MlpLayer<T>* layers, int n, MatrixView<T> target, Reduction reduction, T* dx,
               T* const* dw, T* const* db) {
  const index_t batch = x.rows, width = widest(layers, n), out = layers[n - 1].weight.rows;
  const double count = static_cast<double>(batch) * static_cast<double>(out);
  // The hidden layers' H (and Z where needed), then two buffers for dZ.
  std::vector<MlpSaved<T>> saved(n);
  index_t total = 2 * batch * width;
  for (int l = 0; l + 1 < n; ++l)
    total += batch * layers[l].weight.rows * (activation_needs_pre(layers[l].act, layers[l].slope) ? 2 : 1);
  std::unique_ptr<T[]> memory(new T[std::max<index_t>(total, 1)]);
  T* next = memory.get();
  for (int l = 0; l + 1 < n; ++l) {
    const index_t size = batch * layers[l].weight.rows;
    saved[l].h = next;
    next += size;
    if (activation_needs_pre(layers[l].act, layers[l].slope)) {
      saved[l].z = next;
      next += size;
    }
  }
  T* dz = next;
  T* scratch = dz + batch * width;

  MatrixView<T> h = x;
  for (int l = 0; l + 1 < n; ++l) {
    layer_forward(h, layers[l], saved[l].h, saved[l].z);
    h = dense<T>(saved[l].h, batch, layers[l].weight.rows);
  }
  // The last layer: its output's residual, the loss and dZ = scale (act(z) - t) act'(z), in the epilogue.
  double squares = 0;
  GemmArgs<T> g = forward_args(h, layers[n - 1].weight, dz);
  g.epilogue.bias = layers[n - 1].bias;
  g.epilogue.act = layers[n - 1].act;
  g.epilogue.slope = layers[n - 1].slope;
  set_mse_epilogue(g.epilogue, target, reduction, count, &squares);
  gemm(g);

  auto layer_input = [&](int l) { return l == 0 ? x : dense<T>(saved[l - 1].h, batch, layers[l - 1].weight.rows); };
  backward_sweep(layers, n, saved.data(), layer_input, dz, scratch, dx, dw, db);
  return mse_of_squares(reduction, squares, count);
}

#define LINGRAD_INSTANTIATE(T)                                                                                       \
  template void mlp_forward<T>(MatrixView<T>, const MlpLayer<T>*, int, T*, const MlpSaved<T>*);                      \
  template void mlp_backward<T>(MatrixView<T>, const MlpLayer<T>*, int, const MlpSaved<T>*, const T*, MatrixView<T>, \
                                T*, T* const*, T* const*);                                                           \
  template double mlp_mse<T>(MatrixView<T>, const MlpLayer<T>*, int, MatrixView<T>, Reduction, T*, T* const*,        \
                             T* const*);
LINGRAD_INSTANTIATE(float)
LINGRAD_INSTANTIATE(double)
#undef LINGRAD_INSTANTIATE

}  // namespace lingrad
