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

// ---------------------------------------------------------------------------------------------
// bfloat16 products: the float32 engine with GemmArgs::bf16 set, each operand read as float32 or
// bfloat16 (see gemm.hpp); a bfloat16 result is rounded in the epilogue, from float32 sums that the
// engine keeps where it needs them (GemmArgs::c null).

namespace {

MatrixView<float> float_view(const Bf16Matrix& m) { return {m.f32, m.rows, m.cols, m.rs, m.cs}; }

// The product A B of two bfloat16-product operands into C (a.rows x b.cols): out.f32, or out.bf16
// rounded by the epilogue.
GemmArgs<float> bf16_product_args(const Bf16Matrix& a, const Bf16Matrix& b, Bf16Output out) {
  GemmArgs<float> g = product_args(float_view(a), float_view(b), out.f32);
  g.bf16 = true;
  g.a16 = a.bf16;
  g.b16 = b.bf16;
  if (!out.f32) {
    g.epilogue.out16 = out.bf16;
    g.epilogue.out16_ld = b.cols;
  }
  return g;
}

Bf16Matrix transposed(Bf16Matrix m) {
  std::swap(m.rows, m.cols);
  std::swap(m.rs, m.cs);
  return m;
}

}  // namespace

void linear_forward_bf16(Bf16Matrix x, Bf16Matrix w, VectorView<float> bias, Bf16Output y) {
  GemmArgs<float> g = bf16_product_args(x, transposed(w), y);
  g.epilogue.bias = bias;
  gemm(g);
}

void linear_backward_input_bf16(Bf16Matrix dy, Bf16Matrix w, Bf16Output dx) { gemm(bf16_product_args(dy, w, dx)); }

void linear_backward_weight_bf16(Bf16Matrix dy, Bf16Matrix x, Bf16Output dw, float* db) {
  GemmArgs<float> g = bf16_product_args(transposed(dy), x, dw);
  g.a_row_sums = db;
  gemm(g);
}

// ---------------------------------------------------------------------------------------------
// The fused training step, one template over the operands' view: MatrixView<T> (float32, float64)
// or Bf16Matrix (bfloat16 products, whose bias, target, dY and db are float32: S = float).

namespace {

// Per operand view: the forward product into dense S values, dY's view as an operand of dX's and
// dW's products, and those two products.
template <typename T>
GemmArgs<T> forward_product(MatrixView<T> x, MatrixView<T> w, T* y) {
  return forward_args(x, w, y);
}
GemmArgs<float> forward_product(const Bf16Matrix& x, const Bf16Matrix& w, float* y) {
  return bf16_product_args(x, transposed(w), Bf16Output{y, nullptr});
}

template <typename T>
MatrixView<T> dense_operand(MatrixView<T>, const T* data, index_t rows, index_t cols) {
  return {data, rows, cols, cols, 1};
}
Bf16Matrix dense_operand(const Bf16Matrix&, const float* data, index_t rows, index_t cols) {
  return {data, nullptr, rows, cols, cols, 1};
}

template <typename T>
bool wanted(T* out) {
  return out != nullptr;
}
bool wanted(Bf16Output out) { return out.f32 || out.bf16; }

template <typename T>
void backward_input(MatrixView<T> dy, MatrixView<T> w, T* dx) {
  linear_backward_input<T>(dy, w, dx);
}
void backward_input(const Bf16Matrix& dy, const Bf16Matrix& w, Bf16Output dx) { linear_backward_input_bf16(dy, w, dx); }

template <typename T>
void backward_weight(MatrixView<T> dy, MatrixView<T> x, T* dw, T* db) {
  linear_backward_weight<T>(dy, x, dw, db);
}
void backward_weight(const Bf16Matrix& dy, const Bf16Matrix& x, Bf16Output dw, float* db) {
  linear_backward_weight_bf16(dy, x, dw, db);
}

// The forward pass with the loss in its epilogue (each tile of Y becomes dY = 2 (Y - T) / N while in
// cache; a bfloat16 product's float32 Y becomes float32 dY), then dX and dW from dY (rounded to
// bfloat16 as a bfloat16 product packs it).
template <typename View, typename Out, typename S>
double fused_step(View x, View w, VectorView<S> bias, MatrixView<S> target, Reduction reduction, Out dx, Out dw, S* db,
                  S* dy) {
  const index_t batch = x.rows, out = w.rows;
  const double count = static_cast<double>(batch) * static_cast<double>(out);
  std::unique_ptr<S[]> dy_buffer;
  dy = dy ? dy : own_buffer(dy_buffer, batch * out);

  double squares = 0;
  GemmArgs<S> fwd = forward_product(x, w, dy);
  fwd.epilogue.bias = bias;
  set_mse_epilogue(fwd.epilogue, target, reduction, count, &squares);
  gemm(fwd);

  const View dy_view = dense_operand(x, dy, batch, out);
  if (wanted(dx)) backward_input(dy_view, w, dx);
  backward_weight(dy_view, x, dw, db);
  return mse_of_squares(reduction, squares, count);
}

}  // namespace

template <typename T>
double linear_mse(MatrixView<T> x, MatrixView<T> w, VectorView<T> bias, MatrixView<T> target, Reduction reduction,
                  T* dx, T* dw, T* db, T* dy) {
  return fused_step(x, w, bias, target, reduction, dx, dw, db, dy);
}

double linear_mse_bf16(Bf16Matrix x, Bf16Matrix w, VectorView<float> bias, MatrixView<float> target,
                       Reduction reduction, Bf16Output dx, Bf16Output dw, float* db, float* dy) {
  return fused_step(x, w, bias, target, reduction, dx, dw, db, dy);
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
