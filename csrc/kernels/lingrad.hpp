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
// Python bindings do, in csrc/bindings/module.cpp). Inputs are strided views (any strides, in
// elements, zero and negative included); outputs are dense row-major arrays that do not overlap
// the inputs. Results are bitwise identical for any number of threads: threads split the
// outputs, never a reduction, and no block size depends on the thread count.
#pragma once
#include <cstdint>

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
// Threads and instruction sets (process-wide, thread-safe).
int get_num_threads();
void set_num_threads(int n);  // n >= 1; ignored (stays 1) in a build without OpenMP
bool has_openmp();

const char* get_isa();                                 // the micro-kernel set in use: "avx512", "avx2" or "generic"
bool set_isa(const char* name);                        // false if unknown or not supported by this CPU
int available_isas(const char** names, int capacity);  // supported by this build and CPU, best first
// The block sizes of the GEMM engine in use (Goto/BLIS names): an MR x NR register tile, MC rows
// of A and KC of the reduction per packed block, NC columns of B per packed panel.
struct GemmBlocking {
  int mr, nr, mc, kc, nc;
};
GemmBlocking get_blocking(bool double_);  // for float (double_=false) or double
double gemm_serial_work();                // multiply-adds below which a product runs on one thread
index_t gemm_slab_bytes();                // the packed B panels' scratch: at most this, or one KC x NC slice

// The machine's float32 FMA peak in GFLOP/s with the given threads, measured with the active
// build's instructions (12 independent FMA chains per thread, best of repeats over ~seconds).
double measure_fma_peak(int threads, double seconds);

}  // namespace lingrad
