// The Linear layer's products, the MSE loss and the fused step (lingrad.kernels: linear_forward,
// linear_backward_input, linear_backward_weight, mse_loss, mse_backward, linear_mse), in float32,
// float64 and (the products and the step) bfloat16.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <new>
#include <optional>
#include <string>
#include <vector>

#include "arrays.hpp"

namespace lingrad::bindings {
namespace {

py::array linear_forward(py::handle x_obj, py::handle weight_obj, py::handle bias_obj, py::handle out_obj) {
  Call call(/*bf16_products=*/true);
  const Array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  const Array w = call.input(weight_obj, "weight", 2, "(out_features, in_features)");
  require_same_extent(w, "weight", 1, x, "x", 1, "weight must be (out_features, in_features) with x's in_features");
  const std::optional<Array> b = optional_bias(call, bias_obj, "bias", w);
  Array y = call.output(out_obj, "out", {x.shape(0), w.shape(0)});
  if (call.dtype() == DType::bfloat16) {
    std::vector<float> bias_buffer;
    const VectorView<float> bias = float_vector(b, bias_buffer);
    const Bf16Output out = bf16_output(y);
    const Bf16Matrix xm = bf16_matrix(x), wm = bf16_matrix(w);  // (with the GIL: they read dtypes)
    py::gil_scoped_release release;
    lingrad::linear_forward_bf16(xm, wm, bias, out);
    return result(y);
  }
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const VectorView<T> bias = b ? vector<T>(*b) : VectorView<T>{};
    py::gil_scoped_release release;
    lingrad::linear_forward<T>(matrix<T>(x), matrix<T>(w), bias, mutable_data<T>(y));
  });
  return result(y);
}

py::array linear_backward_input(py::handle grad_obj, py::handle weight_obj, py::handle out_obj) {
  Call call(/*bf16_products=*/true);
  const Array dy = call.input(grad_obj, "grad_out", 2, "(batch, out_features)");
  const Array w = call.input(weight_obj, "weight", 2, "(out_features, in_features)");
  require_same_extent(w, "weight", 0, dy, "grad_out", 1,
                      "weight must be (out_features, in_features) with grad_out's out_features");
  Array dx = call.output(out_obj, "out", {dy.shape(0), w.shape(1)});
  if (call.dtype() == DType::bfloat16) {
    const Bf16Output out = bf16_output(dx);
    const Bf16Matrix dym = bf16_matrix(dy), wm = bf16_matrix(w);
    py::gil_scoped_release release;
    lingrad::linear_backward_input_bf16(dym, wm, out);
    return result(dx);
  }
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    py::gil_scoped_release release;
    lingrad::linear_backward_input<T>(matrix<T>(dy), matrix<T>(w), mutable_data<T>(dx));
  });
  return result(dx);
}

py::tuple linear_backward_weight(py::handle grad_obj, py::handle x_obj, py::handle sample_weights_obj,
                                 py::handle bias_obj, py::handle out_obj, py::handle bias_out_obj) {
  Call call(/*bf16_products=*/true);
  const bool bias = parse_flag(bias_obj, "bias");
  const Array dy = call.input(grad_obj, "grad_out", 2, "(batch, out_features)");
  const Array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  require_same_extent(x, "x", 0, dy, "grad_out", 0, "both need the same batch size");
  std::optional<Array> s;
  if (!sample_weights_obj.is_none()) {
    s = call.input(sample_weights_obj, "sample_weights", 1, "(batch,)");
    require_same_extent(*s, "sample_weights", 0, dy, "grad_out", 0, "sample_weights must be (batch,)");
  }
  if (!bias && !bias_out_obj.is_none()) throw py::value_error("bias_out was given but bias=False");
  Array dw = call.output(out_obj, "out", {dy.shape(1), x.shape(1)});
  std::optional<Array> db;
  if (bias) db = call.output(bias_out_obj, "bias_out", {dy.shape(1)});
  if (call.dtype() == DType::bfloat16) {
    if (s)
      throw py::type_error("sample_weights are for float32 and float64 products; these arrays make a bfloat16 product");
    const Bf16Output out = bf16_output(dw);
    std::vector<float> db_buffer(db && !is_f32(*db) ? static_cast<std::size_t>(dy.shape(1)) : 0);
    float* db_data = !db ? nullptr : is_f32(*db) ? mutable_data<float>(*db) : db_buffer.data();
    const Bf16Matrix dym = bf16_matrix(dy), xm = bf16_matrix(x);
    {
      py::gil_scoped_release release;
      lingrad::linear_backward_weight_bf16(dym, xm, out, db_data);
    }
    if (!db_buffer.empty()) round_into(db_buffer, *db);
    return py::make_tuple(result(dw), or_none(db));
  }
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    T* db_data = db ? mutable_data<T>(*db) : nullptr;
    const VectorView<T> weights = s ? vector<T>(*s) : VectorView<T>{};
    py::gil_scoped_release release;
    if (s)
      lingrad::linear_backward_weight_weighted<T>(matrix<T>(dy), matrix<T>(x), weights, mutable_data<T>(dw), db_data);
    else
      lingrad::linear_backward_weight<T>(matrix<T>(dy), matrix<T>(x), mutable_data<T>(dw), db_data);
  });
  return py::make_tuple(result(dw), or_none(db));
}

py::object mse_loss(py::handle pred_obj, py::handle target_obj, py::handle reduction_obj, py::handle out_obj) {
  Call call;
  const Array p = call.input(pred_obj, "pred", 2, "(batch, features)", /*allow_1d=*/true);
  const Array t = call.input(target_obj, "target", 2, "(batch, features)", /*allow_1d=*/true);
  require_same_shape(t, "target", p, "pred");
  const Reduction reduction = parse_reduction(reduction_obj, /*allow_none=*/true);
  if (reduction != Reduction::none && !out_obj.is_none())
    throw py::value_error("out was given but reduction is not 'none' (the mean and the sum are Python floats)");
  std::vector<py::ssize_t> shape(p.shape(), p.shape() + p.ndim());
  std::optional<Array> out;
  if (reduction == Reduction::none) out = call.output(out_obj, "out", shape);
  const double loss = with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    T* out_data = out ? mutable_data<T>(*out) : nullptr;
    py::gil_scoped_release release;
    return lingrad::mse_loss<T>(matrix<T>(p), matrix<T>(t), reduction, out_data);
  });
  if (out) return out->object();
  return py::float_(loss);
}

py::array mse_backward(py::handle pred_obj, py::handle target_obj, py::handle reduction_obj, py::handle out_obj) {
  Call call;
  const Array p = call.input(pred_obj, "pred", 2, "(batch, features)", /*allow_1d=*/true);
  const Array t = call.input(target_obj, "target", 2, "(batch, features)", /*allow_1d=*/true);
  require_same_shape(t, "target", p, "pred");
  const Reduction reduction = parse_reduction(reduction_obj, /*allow_none=*/true);
  Array grad = call.output(out_obj, "out", std::vector<py::ssize_t>(p.shape(), p.shape() + p.ndim()));
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    py::gil_scoped_release release;
    lingrad::mse_backward<T>(matrix<T>(p), matrix<T>(t), reduction, mutable_data<T>(grad));
  });
  return result(grad);
}

// linear_mse's bfloat16 step, its arrays validated: a bfloat16 target is widened to float32 first
// (a (batch, out) copy; the loss compares in float32).
py::tuple linear_mse_bf16(const Array& x, const Array& w, const std::optional<Array>& b, const Array& t,
                          Reduction reduction, std::optional<Array>& dx, Array& dw, std::optional<Array>& db,
                          std::optional<Array>& dy) {
  std::vector<float> bias_buffer, target_buffer, db_buffer;
  const VectorView<float> bias = float_vector(b, bias_buffer);
  MatrixView<float> target{nullptr, t.shape(0), t.shape(1), 0, 0};
  if (is_f32(t)) {
    target = matrix<float>(t);
  } else {
    const MatrixView<bfloat16> h = matrix<bfloat16>(t);
    target_buffer.resize(static_cast<std::size_t>(h.rows * h.cols));
    for (index_t r = 0; r < h.rows; ++r)
      for (index_t c = 0; c < h.cols; ++c)
        target_buffer[r * h.cols + c] = lingrad::bf16_to_float(h.data[r * h.rs + c * h.cs]);
    target = {target_buffer.data(), h.rows, h.cols, h.cols, 1};
  }
  const Bf16Output dx_out = dx ? bf16_output(*dx) : Bf16Output{}, dw_out = bf16_output(dw);
  if (db && !is_f32(*db)) db_buffer.resize(static_cast<std::size_t>(w.shape(0)));
  float* db_data = !db ? nullptr : is_f32(*db) ? mutable_data<float>(*db) : db_buffer.data();
  float* dy_data = dy ? mutable_data<float>(*dy) : nullptr;
  const Bf16Matrix xm = bf16_matrix(x), wm = bf16_matrix(w);
  double loss = 0;
  try {
    py::gil_scoped_release release;
    loss = lingrad::linear_mse_bf16(xm, wm, bias, target, reduction, dx_out, dw_out, db_data, dy_data);
  } catch (const std::bad_alloc&) {
    throw_memory_error("linear_mse cannot allocate its float32 buffers for (batch, out_features) = (" +
                       std::to_string(x.shape(0)) + ", " + std::to_string(w.shape(0)) + ")");
  }
  if (!db_buffer.empty()) round_into(db_buffer, *db);
  return py::make_tuple(loss, or_none(dx), result(dw), or_none(db));
}

py::tuple linear_mse(py::handle x_obj, py::handle weight_obj, py::handle bias_obj, py::handle target_obj,
                     py::handle reduction_obj, py::handle input_grad_obj, py::handle grad_output_obj) {
  Call call(/*bf16_products=*/true);
  const bool input_grad = parse_flag(input_grad_obj, "input_grad");
  const Array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  const Array w = call.input(weight_obj, "weight", 2, "(out_features, in_features)");
  require_same_extent(w, "weight", 1, x, "x", 1, "weight must be (out_features, in_features) with x's in_features");
  const std::optional<Array> b = optional_bias(call, bias_obj, "bias", w);
  const Array t = call.input(target_obj, "target", 2, "(batch, out_features)");
  if (t.shape(0) != x.shape(0) || t.shape(1) != w.shape(0))
    throw py::value_error("target has shape " + shape_of(t) + " but must be (batch, out_features) = (" +
                          std::to_string(x.shape(0)) + ", " + std::to_string(w.shape(0)) + ") for x " + shape_of(x) +
                          " and weight " + shape_of(w));
  const Reduction reduction = parse_reduction(reduction_obj, /*allow_none=*/false);
  // Each gradient has its input's dtype (in a bfloat16 call: a float32 weight gets a float32
  // gradient); grad_output is float32 there (dY is summed and kept in float32).
  const bool bf16 = call.dtype() == DType::bfloat16;
  auto like = [&](const Array& a) { return bf16 ? std::optional<DType>(dtype_of(a, "")) : std::nullopt; };
  std::optional<Array> dx, db;
  if (input_grad) dx = call.output(py::none(), "grad_input", {x.shape(0), x.shape(1)}, like(x));
  Array dw = call.output(py::none(), "grad_weight", {w.shape(0), w.shape(1)}, like(w));
  if (b) db = call.output(py::none(), "grad_bias", {w.shape(0)}, like(*b));
  std::optional<Array> dy;
  if (!grad_output_obj.is_none())
    dy = call.output(grad_output_obj, "grad_output", {x.shape(0), w.shape(0)},
                     bf16 ? std::optional<DType>(DType::float32) : std::nullopt);
  if (bf16) return linear_mse_bf16(x, w, b, t, reduction, dx, dw, db, dy);
  double loss = 0;
  try {
    loss = with_dtype(call.dtype(), [&](auto zero) {
      using T = decltype(zero);
      const VectorView<T> bias = b ? vector<T>(*b) : VectorView<T>{};
      T* dx_data = dx ? mutable_data<T>(*dx) : nullptr;
      T* db_data = db ? mutable_data<T>(*db) : nullptr;
      T* dw_data = mutable_data<T>(dw);
      T* dy_data = dy ? mutable_data<T>(*dy) : nullptr;
      py::gil_scoped_release release;
      return lingrad::linear_mse<T>(matrix<T>(x), matrix<T>(w), bias, matrix<T>(t), reduction, dx_data, dw_data,
                                    db_data, dy_data);
    });
  } catch (const std::bad_alloc&) {  // the step's one large buffer is dY; the GEMM's scratch is small
    const double bytes = static_cast<double>(x.shape(0)) * static_cast<double>(w.shape(0)) * x.itemsize();
    throw_memory_error("linear_mse cannot allocate its buffer for the output gradient, (batch, out_features) = (" +
                       std::to_string(x.shape(0)) + ", " + std::to_string(w.shape(0)) + ") elements (" +
                       byte_count(bytes) + ")");
  }
  return py::make_tuple(loss, or_none(dx), result(dw), or_none(db));
}

}  // namespace

void init_linear(py::module_& m) {
  m.def("linear_forward", &linear_forward, keyword("x"), keyword("weight"), keyword("bias") = py::none(), py::kw_only(),
        keyword("out") = py::none(),
        R"doc(linear_forward(x, weight, bias=None, *, out=None) -> y

Forward pass of a Linear layer: y = x @ weight.T + bias.

x (batch, in_features), weight (out_features, in_features), bias (out_features,) or None;
returns y (batch, out_features). All arrays float32 or all float64.
Inputs may have any strides (transposed, sliced, broadcast views): they are read in place, never
copied. out, if given, must be a C-contiguous, writeable array of y's shape and dtype that does
not overlap an input. Raises TypeError for a wrong type or dtype, ValueError for a wrong rank,
shape, layout or out.)doc");

  m.def("linear_backward_input", &linear_backward_input, keyword("grad_out"), keyword("weight"), py::kw_only(),
        keyword("out") = py::none(),
        R"doc(linear_backward_input(grad_out, weight, *, out=None) -> grad_input

Input gradient of a Linear layer: grad_input = grad_out @ weight.

grad_out (batch, out_features), weight (out_features, in_features); returns (batch, in_features).
Inputs and out follow the rules of linear_forward.)doc");

  m.def(
      "linear_backward_weight", &linear_backward_weight, keyword("grad_out"), keyword("x"), py::kw_only(),
      keyword("sample_weights") = py::none(), keyword("bias") = true, keyword("out") = py::none(),
      keyword("bias_out") = py::none(),
      R"doc(linear_backward_weight(grad_out, x, *, sample_weights=None, bias=True, out=None, bias_out=None) -> (grad_weight, grad_bias)

Weight and bias gradients of a Linear layer:
  grad_weight = grad_out.T @ x    (out_features, in_features), the sum over the batch of one outer
                                  product per sample, computed as a blocked reduction (no
                                  (batch, out, in) temporary)
  grad_bias   = grad_out.sum(0)   (out_features,), taken in the same pass; None when bias=False.

grad_out (batch, out_features), x (batch, in_features). sample_weights, if given, is a (batch,)
array of the inputs' dtype: each sample's contribution is scaled by its weight,
grad_weight = (s[:, None] * grad_out).T @ x and grad_bias = s @ grad_out (DP-SGD's clipped sum),
in the same pass and memory (the weights scale grad_out.T as the GEMM engine packs it, one rounding
of s * grad_out per element). out and bias_out, if given, receive the results and follow the rules
of linear_forward. The batch reduction is never split across threads, so the result is bitwise
identical for any thread count.)doc");

  m.def("mse_loss", &mse_loss, keyword("pred"), keyword("target"), keyword("reduction") = "mean", py::kw_only(),
        keyword("out") = py::none(),
        R"doc(mse_loss(pred, target, reduction="mean", *, out=None) -> float or array

Mean-squared-error loss, as torch.nn.functional.mse_loss: "mean" averages (pred - target)**2
over all elements, "sum" adds them (both return a Python float accumulated in double; the mean of
an empty array is nan), "none" returns the elementwise squares as a new array (or in out, which
follows the rules of linear_forward; out is only for "none").
pred and target: 1-D or 2-D arrays of one shape and dtype.)doc");

  m.def("mse_backward", &mse_backward, keyword("pred"), keyword("target"), keyword("reduction") = "mean", py::kw_only(),
        keyword("out") = py::none(),
        R"doc(mse_backward(pred, target, reduction="mean", *, out=None) -> grad

Gradient of mse_loss with respect to pred: 2 * (pred - target) / N, where N is the number of
elements for "mean" and 1 for "sum" and "none" (the gradient of each element's own square).)doc");

  m.def("linear_mse", &linear_mse, keyword("x"), keyword("weight"), keyword("bias"), keyword("target"),
        keyword("reduction") = "mean", py::kw_only(), keyword("input_grad") = true, keyword("grad_output") = py::none(),
        R"doc(linear_mse(x, weight, bias, target, reduction="mean", *, input_grad=True, grad_output=None)
    -> (loss, grad_input or None, grad_weight, grad_bias or None)

One fused training step of Linear + MSE: y = x @ weight.T + bias, loss = mse(y, target), and
the gradients of loss with respect to x, weight and bias. The residual, the loss and
grad_y = 2 (y - target) / N are computed while each tile of y is produced; y is never stored.

x (batch, in_features), weight (out_features, in_features), bias (out_features,) or None,
target (batch, out_features); reduction "mean" or "sum". The loss is a Python float accumulated
in double. grad_bias is None when bias is None; grad_input is None when input_grad=False.
grad_output, if given, is a (batch, out_features) array (the rules of linear_forward's out) that
receives grad_y, the gradient of the loss with respect to y (that of the target is -grad_y).)doc");
}

}  // namespace lingrad::bindings
