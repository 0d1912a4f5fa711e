// The Linear layer's three products and the fused training step, as calls of the GEMM engine.
#include <memory>

#include "products.hpp"

namespace lingrad {

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
