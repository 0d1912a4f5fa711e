// The Linear layer's three products and the fused training step, as calls of the GEMM engine.
#include <memory>

#include "gemm.hpp"

namespace lingrad {
namespace {

// A view of the transpose: the same memory, rows and columns swapped.
template <typename T>
MatrixView<T> transposed(MatrixView<T> v) {
  return {v.data, v.cols, v.rows, v.cs, v.rs};
}

// C (a.rows x b.cols, dense) = A B for strided A and B.
template <typename T>
GemmArgs<T> product_args(MatrixView<T> a, MatrixView<T> b, T* c) {
  GemmArgs<T> g;
  g.m = a.rows;
  g.n = b.cols;
  g.k = a.cols;
  g.a = a.data;
  g.a_rs = a.rs;
  g.a_cs = a.cs;
  g.b = b.data;
  g.b_rs = b.rs;
  g.b_cs = b.cs;
  g.c = c;
  g.ldc = b.cols;
  g.num_threads = get_num_threads();
  return g;
}

// Y (B, out) = X (B, in) W^T.
template <typename T>
GemmArgs<T> forward_args(MatrixView<T> x, MatrixView<T> w, T* y) {
  return product_args(x, transposed(w), y);
}

// dX (B, in) = dY (B, out) W (out, in).
template <typename T>
GemmArgs<T> input_grad_args(MatrixView<T> dy, MatrixView<T> w, T* dx) {
  return product_args(dy, w, dx);
}

// dW (out, in) = dY^T X, a reduction over the batch. The row sums of dY^T are the bias gradient,
// taken while it is packed.
template <typename T>
GemmArgs<T> weight_grad_args(MatrixView<T> dy, MatrixView<T> x, T* dw, T* db) {
  GemmArgs<T> g = product_args(transposed(dy), x, dw);
  g.a_row_sums = db;
  return g;
}

}  // namespace

template <typename T>
void linear_forward(MatrixView<T> x, MatrixView<T> w, VectorView<T> bias, T* y) {
  GemmArgs<T> g = forward_args(x, w, y);
  g.epilogue.bias = bias;
  gemm(g);
}

template <typename T>
void linear_backward_input(MatrixView<T> dy, MatrixView<T> w, T* dx) {
  gemm(input_grad_args(dy, w, dx));
}

template <typename T>
void linear_backward_weight(MatrixView<T> dy, MatrixView<T> x, T* dw, T* db) {
  gemm(weight_grad_args(dy, x, dw, db));
}

template <typename T>
double linear_mse(MatrixView<T> x, MatrixView<T> w, VectorView<T> bias, MatrixView<T> target, Reduction reduction,
                  T* dx, T* dw, T* db, T* dy) {
  const index_t batch = x.rows, out = w.rows;
  const double count = static_cast<double>(batch) * static_cast<double>(out);
  std::unique_ptr<T[]> dy_buffer;
  if (!dy) {
    dy_buffer.reset(new T[batch * out > 0 ? batch * out : 1]);
    dy = dy_buffer.get();
  }

  // Forward with the loss in the epilogue: each tile of Y becomes dY = 2 (Y - T) / N in cache.
  double squares = 0;
  GemmArgs<T> fwd = forward_args(x, w, dy);
  fwd.epilogue.bias = bias;
  fwd.epilogue.target = target.data;
  fwd.epilogue.target_rs = target.rs;
  fwd.epilogue.target_cs = target.cs;
  fwd.epilogue.grad_scale = static_cast<T>(reduction == Reduction::mean ? 2.0 / count : 2.0);
  fwd.epilogue.loss = &squares;
  gemm(fwd);

  const MatrixView<T> dy_view{dy, batch, out, out, 1};
  if (dx) gemm(input_grad_args(dy_view, w, dx));
  gemm(weight_grad_args(dy_view, x, dw, db));
  return reduction == Reduction::mean ? squares / count : squares;  // mean of nothing is NaN, as in torch
}

#define LINGRAD_INSTANTIATE(T)                                                      \
  template void linear_forward<T>(MatrixView<T>, MatrixView<T>, VectorView<T>, T*); \
  template void linear_backward_input<T>(MatrixView<T>, MatrixView<T>, T*);         \
  template void linear_backward_weight<T>(MatrixView<T>, MatrixView<T>, T*, T*);    \
  template double linear_mse<T>(MatrixView<T>, MatrixView<T>, VectorView<T>, MatrixView<T>, Reduction, T*, T*, T*, T*);
LINGRAD_INSTANTIATE(float)
LINGRAD_INSTANTIATE(double)
#undef LINGRAD_INSTANTIATE

}  // namespace lingrad
