// The standalone MSE loss and its gradient (the fused step does both in the GEMM epilogue).
// The residual is formed in T, its square summed in double: per row, then the rows in order,
// so the loss does not depend on the thread count.
#include <vector>

#include "lingrad.hpp"

namespace lingrad {
namespace {
constexpr index_t kParallelMinElements = 1 << 15;  // below this a thread team costs more than it saves
}

template <typename T>
double mse_loss(MatrixView<T> pred, MatrixView<T> target, Reduction reduction, T* out_none) {
  const index_t rows = pred.rows, cols = pred.cols;
  const int threads = get_num_threads();
  const bool parallel = threads > 1 && rows * cols >= kParallelMinElements;
  if (reduction == Reduction::none) {
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
    for (index_t r = 0; r < rows; ++r) {
      const T* p = pred.data + r * pred.rs;
      const T* t = target.data + r * target.rs;
      for (index_t c = 0; c < cols; ++c) {
        const T d = p[c * pred.cs] - t[c * target.cs];
        out_none[r * cols + c] = d * d;
      }
    }
    return 0;
  }
  std::vector<double> row_squares(static_cast<std::size_t>(rows));
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
  for (index_t r = 0; r < rows; ++r) {
    const T* p = pred.data + r * pred.rs;
    const T* t = target.data + r * target.rs;
    double s = 0;
    for (index_t c = 0; c < cols; ++c) {
      const T d = p[c * pred.cs] - t[c * target.cs];
      s += static_cast<double>(d) * static_cast<double>(d);
    }
    row_squares[r] = s;
  }
  double total = 0;
  for (double s : row_squares) total += s;
  const double count = static_cast<double>(rows) * static_cast<double>(cols);
  return reduction == Reduction::mean ? total / count : total;
}

template <typename T>
void mse_backward(MatrixView<T> pred, MatrixView<T> target, Reduction reduction, T* grad) {
  const index_t rows = pred.rows, cols = pred.cols;
  const double count = static_cast<double>(rows) * static_cast<double>(cols);
  const T scale = static_cast<T>(reduction == Reduction::mean ? 2.0 / count : 2.0);
  const int threads = get_num_threads();
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows * cols >= kParallelMinElements)
  for (index_t r = 0; r < rows; ++r) {
    const T* p = pred.data + r * pred.rs;
    const T* t = target.data + r * target.rs;
    for (index_t c = 0; c < cols; ++c) grad[r * cols + c] = scale * (p[c * pred.cs] - t[c * target.cs]);
  }
}

template double mse_loss<float>(MatrixView<float>, MatrixView<float>, Reduction, float*);
template double mse_loss<double>(MatrixView<double>, MatrixView<double>, Reduction, double*);
template void mse_backward<float>(MatrixView<float>, MatrixView<float>, Reduction, float*);
template void mse_backward<double>(MatrixView<double>, MatrixView<double>, Reduction, double*);

}  // namespace lingrad
