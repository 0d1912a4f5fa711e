// Per-sample gradients of a Linear layer, for clipping and DP-SGD (lingrad.kernels:
// linear_per_sample_grad_norms, linear_per_sample_grads; the weighted sum is linear_backward_weight's
// sample_weights, in bind_linear.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <utility>

#include "arrays.hpp"

namespace lingrad::bindings {
namespace {

// Per-sample arrays: grad_out (batch, out_features) and x (batch, in_features), or both with a
// sequence dimension, (batch, steps, out_features) and (batch, steps, in_features).
std::pair<Array, Array> per_sample_inputs(Call& call, py::handle grad_obj, py::handle x_obj) {
  const Array dy =
      call.input(grad_obj, "grad_out", 2, "(batch, out_features) or 3-D (batch, steps, out_features)", false, 3);
  const Array x = call.input(x_obj, "x", 2, "(batch, in_features) or 3-D (batch, steps, in_features)", false, 3);
  if (dy.ndim() != x.ndim() || dy.shape(0) != x.shape(0) || (dy.ndim() == 3 && dy.shape(1) != x.shape(1)))
    throw py::value_error("grad_out has shape " + shape_of(dy) + " but x has shape " + shape_of(x) +
                          ": both must be (batch, features) or both (batch, steps, features), with the same batch" +
                          (dy.ndim() == 3 ? " and steps" : ""));
  return {dy, x};
}

template <typename T>
lingrad::SampleView<T> samples(const Array& a) {
  const T* data = static_cast<const T*>(a.data());
  if (a.ndim() == 2) return {{data, 1, a.shape(1), 0, stride<T>(a, 1)}, a.shape(0), stride<T>(a, 0)};
  return {{data, a.shape(1), a.shape(2), stride<T>(a, 1), stride<T>(a, 2)}, a.shape(0), stride<T>(a, 0)};
}

py::array linear_per_sample_grad_norms(py::handle grad_obj, py::handle x_obj, py::handle bias_obj) {
  Call call;
  const bool bias = parse_flag(bias_obj, "bias");
  const auto [dy, x] = per_sample_inputs(call, grad_obj, x_obj);
  py::array_t<double> norms(dy.shape(0));
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    double* data = norms.mutable_data();
    py::gil_scoped_release release;
    lingrad::linear_per_sample_grad_norms<T>(samples<T>(dy), samples<T>(x), bias, data);
  });
  return std::move(norms);
}

py::array linear_per_sample_grads(py::handle grad_obj, py::handle x_obj, py::handle out_obj) {
  Call call;
  const auto [dy, x] = per_sample_inputs(call, grad_obj, x_obj);
  const py::ssize_t last = dy.ndim() - 1;
  Array g = call.output(out_obj, "out", {dy.shape(0), dy.shape(last), x.shape(last)});
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    T* data = mutable_data<T>(g);
    py::gil_scoped_release release;
    lingrad::linear_per_sample_grads<T>(samples<T>(dy), samples<T>(x), data);
  });
  return result(g);
}

}  // namespace

void init_privacy(py::module_& m) {
  m.def("linear_per_sample_grad_norms", &linear_per_sample_grad_norms, keyword("grad_out"), keyword("x"), py::kw_only(),
        keyword("bias") = true,
        R"doc(linear_per_sample_grad_norms(grad_out, x, *, bias=True) -> norms (batch,) float64

The norm of each sample's gradient of a Linear layer, sqrt(||G_b||^2 + ||g_b||^2) with the weight
gradient G_b = grad_out[b].T @ x[b] (out_features, in_features) and the bias gradient g_b (left out
when bias=False), without materialising G_b; accumulated in double.

2-D: grad_out (batch, out_features), x (batch, in_features): ||G_b|| = ||grad_out[b]|| ||x[b]||,
g_b = grad_out[b]. 3-D (a sequence of `steps` per sample): grad_out (batch, steps, out_features),
x (batch, steps, in_features), G_b = sum_t outer(grad_out[b, t], x[b, t]), g_b = grad_out[b].sum(0).
Per shape, the cheaper of two exact forms (counted in multiply-adds, T = steps):
  Gram   ||G_b||^2 = sum_{t,s} <grad_out[b,t], grad_out[b,s]> <x[b,t], x[b,s]>   T (T + 1) / 2 (in + out)
  rows   G_b computed one row at a time in double, its squares summed        T in out
the Gram form when T (T + 1) / 2 (in + out) <= T in out (always for T = 1).
Inputs follow the rules of linear_forward; each sample is summed by one thread in a fixed order.)doc");

  m.def("linear_per_sample_grads", &linear_per_sample_grads, keyword("grad_out"), keyword("x"), py::kw_only(),
        keyword("out") = py::none(),
        R"doc(linear_per_sample_grads(grad_out, x, *, out=None) -> grads (batch, out_features, in_features)

Every sample's weight gradient G_b = grad_out[b].T @ x[b] (2-D: the outer product of grad_out[b]
and x[b]; 3-D inputs as in linear_per_sample_grad_norms, summed over the steps). This tensor is
batch times larger than the weight: call it on chunks of the batch you size yourself (grad_out[i:j],
x[i:j]), reusing one out array of (chunk, out_features, in_features). out follows the rules of
linear_forward.)doc");
}

}  // namespace lingrad::bindings
