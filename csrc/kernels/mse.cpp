// The standalone MSE loss and its gradient (the fused step does both in the GEMM epilogue).
// The residual is formed in T, its square summed in double: per row, then the rows in order,
// so the loss does not depend on the thread count.
#include <algorithm>
#include <limits>
#include <vector>

#include "lingrad.hpp"
#include "team.hpp"

namespace lingrad {
namespace {
constexpr index_t kParallelMinElements = 1 << 15;  // below this a thread team costs more than it saves
constexpr index_t kBlockElements = 1 << 16;        // rows are summed in blocks of this many elements,
constexpr index_t kBlockMinRows = 1024;            // or of this many rows, whichever is more

// body(i) for each of n rows holding `elements` in all: split over the threads from
// kParallelMinElements on, else in this thread (run_team starts no team for one).
template <typename Body>
void for_each_row(index_t n, index_t elements, const Body& body) {
  const int threads = get_num_threads();
  run_team(elements >= kParallelMinElements ? threads : 1, [&](int thread, int team) {
    const Share rows = share(n, thread, team);
    for (index_t i = rows.first; i < rows.last; ++i) body(i);
  });
}
}  // namespace

template <typename T>
double mse_loss(MatrixView<T> pred, MatrixView<T> target, Reduction reduction, T* out_none) {
  const index_t rows = pred.rows, cols = pred.cols;
  const double count = static_cast<double>(rows) * static_cast<double>(cols);
  if (rows == 0 || cols == 0)  // nothing to read (a zero-stride view may still have 2^40 empty rows)
    return reduction == Reduction::mean ? std::numeric_limits<double>::quiet_NaN() : 0.0;  // mean of nothing
  if (reduction == Reduction::none) {
    for_each_row(rows, rows * cols, [&](index_t r) {
      const T* p = pred.data + r * pred.rs;
      const T* t = target.data + r * target.rs;
      for (index_t c = 0; c < cols; ++c) {
        const T d = p[c * pred.cs] - t[c * target.cs];
        out_none[r * cols + c] = d * d;
      }
    });
    return 0;
  }
  // Row sums for a block of rows at a time (in parallel), added to the total in row order: the
  // scratch memory stays bounded whatever the number of rows (a zero-stride view may have 2^40).
  const index_t block_rows = std::min(rows, std::max(kBlockMinRows, kBlockElements / cols));
  std::vector<double> row_squares(static_cast<std::size_t>(block_rows));
  double total = 0;
  for (index_t r0 = 0; r0 < rows; r0 += block_rows) {
    const index_t block = std::min(block_rows, rows - r0);
    for_each_row(block, block * cols, [&](index_t i) {
      const T* p = pred.data + (r0 + i) * pred.rs;
      const T* t = target.data + (r0 + i) * target.rs;
      double s = 0;
      for (index_t c = 0; c < cols; ++c) {
        const T d = p[c * pred.cs] - t[c * target.cs];
        s += static_cast<double>(d) * static_cast<double>(d);
      }
      row_squares[i] = s;
    });
    total = ordered_sum(row_squares.data(), block, total);
  }
  return mse_of_squares(reduction, total, count);
}

template <typename T>
void mse_backward(MatrixView<T> pred, MatrixView<T> target, Reduction reduction, T* grad) {
  const index_t rows = pred.rows, cols = pred.cols;
  const double count = static_cast<double>(rows) * static_cast<double>(cols);
  const T scale = static_cast<T>(mse_grad_scale(reduction, count));
  if (rows == 0 || cols == 0) return;  // nothing to write (and a zero-stride view may have 2^40 empty rows)
  for_each_row(rows, rows * cols, [&](index_t r) {
    const T* p = pred.data + r * pred.rs;
    const T* t = target.data + r * target.rs;
    for (index_t c = 0; c < cols; ++c) grad[r * cols + c] = scale * (p[c * pred.cs] - t[c * target.cs]);
  });
}

template double mse_loss<float>(MatrixView<float>, MatrixView<float>, Reduction, float*);
template double mse_loss<double>(MatrixView<double>, MatrixView<double>, Reduction, double*);
template void mse_backward<float>(MatrixView<float>, MatrixView<float>, Reduction, float*);
template void mse_backward<double>(MatrixView<double>, MatrixView<double>, Reduction, double*);

}  // namespace lingrad
