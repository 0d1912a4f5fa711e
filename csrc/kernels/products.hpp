// The Linear layer's three products as arguments of the GEMM engine (linear.cpp, mlp.cpp,
// privacy.cpp), and the fused MSE loss of a forward product. Only baseline code: nothing here is
// compiled per instruction set.
#pragma once
#include "gemm/gemm.hpp"

namespace lingrad {

// A view of the transpose: the same memory, rows and columns swapped.
template <typename T>
inline MatrixView<T> transposed(MatrixView<T> v) {
  return {v.data, v.cols, v.rows, v.cs, v.rs};
}

// C (a.rows x b.cols, dense) = A B for strided A and B.
template <typename T>
inline GemmArgs<T> product_args(MatrixView<T> a, MatrixView<T> b, T* c) {
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
inline GemmArgs<T> forward_args(MatrixView<T> x, MatrixView<T> w, T* y) {
  return product_args(x, transposed(w), y);
}

// dX (B, in) = dY (B, out) W (out, in).
template <typename T>
inline GemmArgs<T> input_grad_args(MatrixView<T> dy, MatrixView<T> w, T* dx) {
  return product_args(dy, w, dx);
}

// dW (out, in) = dY^T X, a reduction over the batch. The row sums of dY^T are the bias gradient,
// taken while it is packed.
template <typename T>
inline GemmArgs<T> weight_grad_args(MatrixView<T> dy, MatrixView<T> x, T* dw, T* db) {
  GemmArgs<T> g = product_args(transposed(dy), x, dw);
  g.a_row_sums = db;
  return g;
}

// A forward product's epilogue in a fused training step (linear.cpp's linear_mse, mlp.cpp's mlp_mse):
// each tile of the output becomes dY = 2 (Y - T) / N (N = count for "mean", 1 for "sum"; times the
// activation's derivative, if any), and the squared residuals are summed into *squares.
template <typename T>
inline void set_mse_epilogue(Epilogue<T>& e, MatrixView<T> target, Reduction reduction, double count, double* squares) {
  e.target = target.data;
  e.target_rs = target.rs;
  e.target_cs = target.cs;
  e.grad_scale = static_cast<T>(mse_grad_scale(reduction, count));
  e.loss = squares;
}

}  // namespace lingrad
