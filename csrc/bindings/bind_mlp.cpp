// Whole networks in one call (lingrad.kernels: mlp_forward, mlp_backward, mlp_mse): weights W_l
// (out_l, in_l), biases b_l (out_l,) or None, one activation each.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <deque>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "arrays.hpp"

namespace lingrad::bindings {
namespace {

using lingrad::Activation;

// An activation by its name in kActivationNames (lingrad.hpp, beside the enum).
Activation parse_activation(py::handle obj, const std::string& name) {
  if (py::isinstance<py::str>(obj)) {
    const std::string a = py::str(obj);
    for (std::size_t i = 0; i < kActivationCount; ++i)
      if (a == kActivationNames[i]) return static_cast<Activation>(i);
  }
  std::string options;
  for (const char* n : kActivationNames) options += (options.empty() ? "'" : ", '") + std::string(n) + "'";
  throw py::value_error(name + " must be one of " + options + ", got " + std::string(py::repr(obj)));
}

// A network's arrays, validated: shapes chain from x, one dtype, names like "weights[1]" in messages.
struct Network {
  std::deque<std::string> names;  // (stable addresses for Call's messages)
  std::vector<Array> weights;
  std::vector<std::optional<Array>> biases;
  std::vector<Activation> activations;
  std::vector<double> slopes;

  Network(Call& call, const Array& x, py::handle weights_obj, py::handle biases_obj, py::handle activations_obj,
          py::handle slopes_obj) {
    auto sequence = [](py::handle obj, const char* what) {
      if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
        throw py::type_error(std::string(what) + " must be a list, got " + type_name(obj));
      return py::reinterpret_borrow<py::sequence>(obj);
    };
    const py::sequence ws = sequence(weights_obj, "weights");
    const std::size_t n = ws.size();
    if (n == 0) throw py::value_error("weights must hold at least one layer's weight");
    const py::sequence acts = sequence(activations_obj, "activations");
    if (acts.size() != n)
      throw py::value_error("activations has " + std::to_string(acts.size()) + " entries but there are " +
                            std::to_string(n) + " layers (weights)");
    std::optional<py::sequence> bs, ss;
    if (!biases_obj.is_none()) bs = sequence(biases_obj, "biases");
    if (bs && bs->size() != n)
      throw py::value_error("biases has " + std::to_string(bs->size()) + " entries but there are " + std::to_string(n) +
                            " layers (weights)");
    if (!slopes_obj.is_none()) ss = sequence(slopes_obj, "negative_slopes");
    if (ss && ss->size() != n)
      throw py::value_error("negative_slopes has " + std::to_string(ss->size()) + " entries but there are " +
                            std::to_string(n) + " layers (weights)");
    py::ssize_t width = x.shape(1);
    for (std::size_t l = 0; l < n; ++l) {
      const std::string index = "[" + std::to_string(l) + "]";
      const char* w_name = names.emplace_back("weights" + index).c_str();
      Array w = call.input(ws[l], w_name, 2, "(out_features, in_features)");
      if (w.shape(1) != width)
        throw py::value_error(std::string(w_name) + " has shape " + shape_of(w) + " but its layer's input has " +
                              std::to_string(width) + " features (" +
                              (l == 0
                                   ? "x has shape " + shape_of(x)
                                   : "weights[" + std::to_string(l - 1) + "] has shape " + shape_of(weights.back())) +
                              ")");
      width = w.shape(0);
      weights.push_back(w);
      std::optional<Array> b;
      if (bs && !(*bs)[l].is_none()) b = optional_bias(call, (*bs)[l], names.emplace_back("biases" + index).c_str(), w);
      biases.push_back(b);
      activations.push_back(parse_activation(acts[l], "activations" + index));
      double slope = 0.01;  // torch.nn.LeakyReLU's default
      if (ss) {
        if (!py::isinstance<py::float_>((*ss)[l]) && !py::isinstance<py::int_>((*ss)[l]))
          throw py::type_error("negative_slopes" + index + " must be a number, got " + type_name((*ss)[l]));
        slope = (*ss)[l].cast<double>();
      }
      slopes.push_back(slope);
    }
  }

  std::size_t size() const { return weights.size(); }
  py::ssize_t out(std::size_t l) const { return weights[l].shape(0); }
  bool needs_pre(std::size_t l) const { return lingrad::activation_needs_pre(activations[l], slopes[l]); }

  template <typename T>
  std::vector<lingrad::MlpLayer<T>> layers() const {
    std::vector<lingrad::MlpLayer<T>> result(size());
    for (std::size_t l = 0; l < size(); ++l) {
      result[l].weight = matrix<T>(weights[l]);
      if (biases[l]) result[l].bias = vector<T>(*biases[l]);
      result[l].act = activations[l];
      result[l].slope = static_cast<T>(slopes[l]);
    }
    return result;
  }
};

py::object mlp_forward(py::handle x_obj, py::handle weights_obj, py::handle biases_obj, py::handle activations_obj,
                       py::handle slopes_obj, py::handle save_obj, py::handle out_obj) {
  Call call;
  const bool save = parse_flag(save_obj, "save");
  const Array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  const Network net(call, x, weights_obj, biases_obj, activations_obj, slopes_obj);
  const std::size_t n = net.size();
  const py::ssize_t batch = x.shape(0);
  Array y = call.output(out_obj, "out", {batch, net.out(n - 1)});
  std::vector<Array> hidden;                 // H_l for l < n - 1
  std::vector<std::optional<Array>> pre(n);  // Z_l where layer l's activation needs it
  if (save)
    for (std::size_t l = 0; l < n; ++l) {
      if (l + 1 < n) hidden.push_back(call.output(py::none(), "hidden", {batch, net.out(l)}));
      if (net.needs_pre(l)) pre[l] = call.output(py::none(), "pre", {batch, net.out(l)});
    }
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const std::vector<lingrad::MlpLayer<T>> layers = net.layers<T>();
    std::vector<lingrad::MlpSaved<T>> saved(n);
    if (save)
      for (std::size_t l = 0; l < n; ++l) {
        if (l + 1 < n) saved[l].h = mutable_data<T>(hidden[l]);
        if (pre[l]) saved[l].z = mutable_data<T>(*pre[l]);
      }
    T* y_data = mutable_data<T>(y);
    py::gil_scoped_release release;
    lingrad::mlp_forward<T>(matrix<T>(x), layers.data(), static_cast<int>(n), y_data, save ? saved.data() : nullptr);
  });
  if (!save) return result(y);
  py::list hidden_list, pre_list;
  for (const Array& h : hidden) hidden_list.append(h.object());
  for (const std::optional<Array>& z : pre) pre_list.append(or_none(z));
  return py::make_tuple(result(y), hidden_list, pre_list);
}

// The gradients' arrays: grad_weights[l] (out_l, in_l), grad_biases[l] (out_l,) where the layer has a bias.
struct NetworkGrads {
  std::vector<Array> weights;
  std::vector<std::optional<Array>> biases;
  NetworkGrads(Call& call, const Network& net) {
    for (std::size_t l = 0; l < net.size(); ++l) {
      weights.push_back(call.output(py::none(), "grad_weights", {net.weights[l].shape(0), net.weights[l].shape(1)}));
      biases.push_back(net.biases[l] ? std::optional<Array>(call.output(py::none(), "grad_biases", {net.out(l)}))
                                     : std::nullopt);
    }
  }
  template <typename T>
  std::pair<std::vector<T*>, std::vector<T*>> pointers() {
    std::vector<T*> dw, db;
    for (std::size_t l = 0; l < weights.size(); ++l) {
      dw.push_back(mutable_data<T>(weights[l]));
      db.push_back(biases[l] ? mutable_data<T>(*biases[l]) : nullptr);
    }
    return {dw, db};
  }
  // (grad_weights, grad_biases) as the bindings return them: lists of arrays (None for no bias).
  std::pair<py::list, py::list> lists() const {
    py::list w, b;
    for (const Array& a : weights) w.append(a.object());
    for (const std::optional<Array>& a : biases) b.append(or_none(a));
    return {w, b};
  }
};

py::tuple mlp_backward(py::handle grad_obj, py::handle x_obj, py::handle weights_obj, py::handle biases_obj,
                       py::handle activations_obj, py::handle y_obj, py::handle hidden_obj, py::handle pre_obj,
                       py::handle slopes_obj, py::handle input_grad_obj) {
  Call call;
  const bool input_grad = parse_flag(input_grad_obj, "input_grad");
  const Array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  const Network net(call, x, weights_obj, biases_obj, activations_obj, slopes_obj);
  const std::size_t n = net.size();
  const py::ssize_t batch = x.shape(0);
  const std::vector<py::ssize_t> out_shape = {batch, net.out(n - 1)};
  auto require_shape = [&](const Array& a, const char* name, const std::vector<py::ssize_t>& shape) {
    if (a.shape(0) != shape[0] || a.shape(1) != shape[1])
      throw py::value_error(std::string(name) + " has shape " + shape_of(a) + " but must be (" +
                            std::to_string(shape[0]) + ", " + std::to_string(shape[1]) + ")");
  };
  const Array dy = call.input(grad_obj, "grad_out", 2, "(batch, out_features)");
  require_shape(dy, "grad_out", out_shape);
  const Array y = call.input(y_obj, "y", 2, "(batch, out_features)");
  require_shape(y, "y", out_shape);
  auto saved_list = [](py::handle obj, const char* what, std::size_t size) {
    if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
      throw py::type_error(std::string(what) + " must be the list mlp_forward(save=True) returned, got " +
                           type_name(obj));
    const py::sequence s = py::reinterpret_borrow<py::sequence>(obj);
    if (s.size() != size)
      throw py::value_error(std::string(what) + " has " + std::to_string(s.size()) + " entries but must have " +
                            std::to_string(size) + " (what mlp_forward(save=True) returned)");
    return s;
  };
  const py::sequence hidden_seq = saved_list(hidden_obj, "hidden", n - 1), pre_seq = saved_list(pre_obj, "pre", n);
  std::deque<std::string> names;
  std::vector<Array> hidden;
  std::vector<std::optional<Array>> pre(n);
  for (std::size_t l = 0; l < n; ++l) {
    const std::vector<py::ssize_t> shape = {batch, net.out(l)};
    if (l + 1 < n) {
      const char* name = names.emplace_back("hidden[" + std::to_string(l) + "]").c_str();
      hidden.push_back(call.input(hidden_seq[l], name, 2, "(batch, out_features)"));
      require_shape(hidden.back(), name, shape);
    }
    if (net.needs_pre(l)) {
      const char* name = names.emplace_back("pre[" + std::to_string(l) + "]").c_str();
      if (pre_seq[l].is_none())
        throw py::value_error(std::string(name) + " is None but its layer's activation needs the pre-activation");
      pre[l] = call.input(pre_seq[l], name, 2, "(batch, out_features)");
      require_shape(*pre[l], name, shape);
    }
  }
  for (const Array& a : hidden)
    if (!a.c_contiguous()) throw py::value_error("hidden arrays must be C-contiguous");
  for (std::size_t l = 0; l < n; ++l)
    if (pre[l] && !pre[l]->c_contiguous()) throw py::value_error("pre arrays must be C-contiguous");
  if (!y.c_contiguous()) throw py::value_error("y must be C-contiguous");
  std::optional<Array> dx;
  if (input_grad) dx = call.output(py::none(), "grad_input", {batch, x.shape(1)});
  NetworkGrads grads(call, net);
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const std::vector<lingrad::MlpLayer<T>> layers = net.layers<T>();
    std::vector<lingrad::MlpSaved<T>> saved(n);
    for (std::size_t l = 0; l < n; ++l) {
      if (l + 1 < n) saved[l].h = const_cast<T*>(static_cast<const T*>(hidden[l].data()));
      if (pre[l]) saved[l].z = const_cast<T*>(static_cast<const T*>(pre[l]->data()));
    }
    auto [dw, db] = grads.pointers<T>();
    T* dx_data = dx ? mutable_data<T>(*dx) : nullptr;
    const T* y_data = static_cast<const T*>(y.data());
    py::gil_scoped_release release;
    lingrad::mlp_backward<T>(matrix<T>(x), layers.data(), static_cast<int>(n), saved.data(), y_data, matrix<T>(dy),
                             dx_data, dw.data(), db.data());
  });
  const auto [grad_weights, grad_biases] = grads.lists();
  return py::make_tuple(or_none(dx), grad_weights, grad_biases);
}

py::tuple mlp_mse(py::handle x_obj, py::handle weights_obj, py::handle biases_obj, py::handle activations_obj,
                  py::handle target_obj, py::handle reduction_obj, py::handle slopes_obj, py::handle input_grad_obj) {
  Call call;
  const bool input_grad = parse_flag(input_grad_obj, "input_grad");
  const Array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  const Network net(call, x, weights_obj, biases_obj, activations_obj, slopes_obj);
  const std::size_t n = net.size();
  const Array t = call.input(target_obj, "target", 2, "(batch, out_features)");
  if (t.shape(0) != x.shape(0) || t.shape(1) != net.out(n - 1))
    throw py::value_error("target has shape " + shape_of(t) + " but must be (batch, out_features) = (" +
                          std::to_string(x.shape(0)) + ", " + std::to_string(net.out(n - 1)) + ")");
  const Reduction reduction = parse_reduction(reduction_obj, /*allow_none=*/false);
  std::optional<Array> dx;
  if (input_grad) dx = call.output(py::none(), "grad_input", {x.shape(0), x.shape(1)});
  NetworkGrads grads(call, net);
  const double loss = with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const std::vector<lingrad::MlpLayer<T>> layers = net.layers<T>();
    auto [dw, db] = grads.pointers<T>();
    T* dx_data = dx ? mutable_data<T>(*dx) : nullptr;
    py::gil_scoped_release release;
    return lingrad::mlp_mse<T>(matrix<T>(x), layers.data(), static_cast<int>(n), matrix<T>(t), reduction, dx_data,
                               dw.data(), db.data());
  });
  const auto [grad_weights, grad_biases] = grads.lists();
  return py::make_tuple(loss, or_none(dx), grad_weights, grad_biases);
}

}  // namespace

void init_mlp(py::module_& m) {
  // The activations' names, in the kernels' order: what `activations` accepts.
  py::tuple names(kActivationCount);
  for (std::size_t i = 0; i < kActivationCount; ++i) names[i] = py::str(kActivationNames[i]);
  m.attr("ACTIVATIONS") = names;

  m.def(
      "mlp_forward", &mlp_forward, keyword("x"), keyword("weights"), keyword("biases"), keyword("activations"),
      py::kw_only(), keyword("negative_slopes") = py::none(), keyword("save") = false, keyword("out") = py::none(),
      R"doc(mlp_forward(x, weights, biases, activations, *, negative_slopes=None, save=False, out=None) -> y or (y, hidden, pre)

A whole network's forward pass in one call: for each layer l, h = act_l(h @ weights[l].T + biases[l]),
starting from x (batch, in_features). weights[l] (out_l, in_l) with in_l the previous layer's out;
biases: a list of (out_l,) arrays or None per layer (or None for no biases at all); activations: one
name per layer, "identity", "relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh" (GELU's tanh
approximation) or "silu"; negative_slopes: LeakyReLU's slope per layer (default 0.01). Bias and
activation run in each product's epilogue. With save=True also returns what mlp_backward needs:
hidden (each hidden layer's output, n - 1 arrays) and pre (each layer's pre-activation where its
activation's derivative needs it, else None). out, if given, receives y (the rules of
linear_forward's out).)doc");

  m.def(
      "mlp_backward", &mlp_backward, keyword("grad_out"), keyword("x"), keyword("weights"), keyword("biases"),
      keyword("activations"), keyword("y"), keyword("hidden"), keyword("pre"), py::kw_only(),
      keyword("negative_slopes") = py::none(), keyword("input_grad") = true,
      R"doc(mlp_backward(grad_out, x, weights, biases, activations, y, hidden, pre, *, negative_slopes=None, input_grad=True)
    -> (grad_input or None, grad_weights, grad_biases)

The gradients of a forward pass made by mlp_forward(..., save=True), which returned y, hidden and pre,
for grad_out (batch, out) = dL/dy: every layer's weight and bias gradient (None where it has no
bias) and, if input_grad, the input's. Each activation's derivative runs in the epilogue of the
product that makes its layer's output gradient.)doc");

  m.def(
      "mlp_mse", &mlp_mse, keyword("x"), keyword("weights"), keyword("biases"), keyword("activations"),
      keyword("target"), keyword("reduction") = "mean", py::kw_only(), keyword("negative_slopes") = py::none(),
      keyword("input_grad") = true,
      R"doc(mlp_mse(x, weights, biases, activations, target, reduction="mean", *, negative_slopes=None, input_grad=True)
    -> (loss, grad_input or None, grad_weights, grad_biases)

A whole network's training step with the MSE loss on its output (mean or sum), in one call: the
forward pass keeps what backward needs, the last product's epilogue makes the loss and its output
gradient, then every gradient. Arguments as in mlp_forward; target (batch, out).)doc");
}

}  // namespace lingrad::bindings
