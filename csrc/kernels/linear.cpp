// The Linear layer's three products and the fused training step, as calls of the GEMM engine.
#include <memory>
#include <utility>

#include "products.hpp"

namespace lingrad {

namespace {

// A buffer of `size` elements (at least one) owned by `holder`: the fused step's dY when the caller keeps none.
template <typename T>
T* own_buffer(std::unique_ptr<T[]>& holder, index_t size) {
  holder.reset(new T[size > 0 ? size : 1]);
  return holder.get();
}

// The forward product's epilogue of the fused step: each tile of Y becomes dY = 2 (Y - T) / N (N = count
// for "mean", 1 for "sum"), and the squared residuals are summed into *squares.
template <typename T>
void set_mse_epilogue(Epilogue<T>& e, MatrixView<T> target, Reduction reduction, double count, double* squares) {
  e.target = target.data;
  e.target_rs = target.rs;
  e.target_cs = target.cs;
  e.grad_scale = static_cast<T>(reduction == Reduction::mean ? 2.0 / count : 2.0);
  e.loss = squares;
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
  dy = dy ? dy : own_buffer(dy_buffer, batch * out);

  // Forward with the loss in the epilogue: each tile of Y becomes dY = 2 (Y - T) / N in cache.
  double squares = 0;
  GemmArgs<T> fwd = forward_args(x, w, dy);
  fwd.epilogue.bias = bias;
  set_mse_epilogue(fwd.epilogue, target, reduction, count, &squares);
  gemm(fwd);

  const MatrixView<T> dy_view{dy, batch, out, out, 1};
  if (dx) gemm(input_grad_args(dy_view, w, dx));
  gemm(weight_grad_args(dy_view, x, dw, db));
  return reduction == Reduction::mean ? squares / count : squares;  // mean of nothing is NaN, as in torch
}

// ---------------------------------------------------------------------------------------------
// bfloat16 products: the float32 engine with GemmArgs::bf16 set, each operand read as float32 or
// bfloat16 (see gemm.hpp); a bfloat16 result is rounded in the epilogue, from float32 sums that the
// engine keeps where it needs them (GemmArgs::c null).

namespace {

MatrixView<float> float_view(const Bf16Matrix& m) { return {m.f32, m.rows, m.cols, m.rs, m.cs}; }

// The product A B of two bfloat16-product operands into C (a.rows x b.cols): out.f32, or out.bf16
// rounded by the epilogue.
struct Bf16Product {
  GemmArgs<float> g;

  Bf16Product(const Bf16Matrix& a, const Bf16Matrix& b, Bf16Output out) {
    g = product_args(float_view(a), float_view(b), out.f32);
    g.bf16 = true;
    g.a16 = a.bf16;
    g.b16 = b.bf16;
    if (!out.f32) {
      g.epilogue.out16 = out.bf16;
      g.epilogue.out16_ld = b.cols;
    }
  }
};

Bf16Matrix transposed(Bf16Matrix m) {
  std::swap(m.rows, m.cols);
  std::swap(m.rs, m.cs);
  return m;
}

}  // namespace

void linear_forward_bf16(Bf16Matrix x, Bf16Matrix w, VectorView<float> bias, Bf16Output y) {
  Bf16Product p(x, transposed(w), y);
  p.g.epilogue.bias = bias;
  gemm(p.g);
}

void linear_backward_input_bf16(Bf16Matrix dy, Bf16Matrix w, Bf16Output dx) {
  Bf16Product p(dy, w, dx);
  gemm(p.g);
}

void linear_backward_weight_bf16(Bf16Matrix dy, Bf16Matrix x, Bf16Output dw, float* db) {
  Bf16Product p(transposed(dy), x, dw);
  p.g.a_row_sums = db;
  gemm(p.g);
}

double linear_mse_bf16(Bf16Matrix x, Bf16Matrix w, VectorView<float> bias, MatrixView<float> target,
                       Reduction reduction, Bf16Output dx, Bf16Output dw, float* db, float* dy) {
  const index_t batch = x.rows, out = w.rows;
  const double count = static_cast<double>(batch) * static_cast<double>(out);
  std::unique_ptr<float[]> dy_buffer;
  dy = dy ? dy : own_buffer(dy_buffer, batch * out);
  // Forward with the loss in the epilogue (float32 Y becomes float32 dY in cache), then dX and dW
  // with dY rounded to bfloat16 as they pack it.
  double squares = 0;
  Bf16Product fwd(x, transposed(w), Bf16Output{dy, nullptr});
  fwd.g.epilogue.bias = bias;
  set_mse_epilogue(fwd.g.epilogue, target, reduction, count, &squares);
  gemm(fwd.g);

  const Bf16Matrix dy_view{dy, nullptr, batch, out, out, 1};
  if (dx.f32 || dx.bf16) linear_backward_input_bf16(dy_view, w, dx);
  linear_backward_weight_bf16(dy_view, x, dw, db);
  return reduction == Reduction::mean ? squares / count : squares;
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
