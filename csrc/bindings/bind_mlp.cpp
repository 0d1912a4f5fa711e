// Whole networks in one call (lingrad.kernels: mlp_forward, mlp_backward, mlp_mse): weights W_l
// (out_l, in_l), biases b_l (out_l,) or None, one activation each.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "arrays.hpp"

namespace lingrad::bindings {
namespace {

using lingrad::Activation;
using lingrad::Loss;
using lingrad::LossSpec;
using lingrad::OptimizerHyper;
using lingrad::OptimizerKind;
using lingrad::ParamState;
using lingrad::TrainWorkspace;

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

  // x: the input whose features the first layer takes, or null (a train step: checked at each call).
  Network(Call& call, const Array* x, py::handle weights_obj, py::handle biases_obj, py::handle activations_obj,
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
    py::ssize_t width = x ? x->shape(1) : -1;
    for (std::size_t l = 0; l < n; ++l) {
      const std::string index = "[" + std::to_string(l) + "]";
      const char* w_name = names.emplace_back("weights" + index).c_str();
      Array w = call.input(ws[l], w_name, 2, "(out_features, in_features)");
      if (l == 0 && !x) width = w.shape(1);
      if (w.shape(1) != width)
        throw py::value_error(std::string(w_name) + " has shape " + shape_of(w) + " but its layer's input has " +
                              std::to_string(width) + " features (" +
                              (l == 0
                                   ? "x has shape " + shape_of(*x)
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
  const Network net(call, &x, weights_obj, biases_obj, activations_obj, slopes_obj);
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
  const Network net(call, &x, weights_obj, biases_obj, activations_obj, slopes_obj);
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
  const Network net(call, &x, weights_obj, biases_obj, activations_obj, slopes_obj);
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

// ---------------------------------------------------------------------------------------------
// The training step (MlpTrainStep): a network, its loss and its optimizer's state, validated once
// when the step is made; each call checks only the batch (x, target) and the hyperparameters, then
// runs lingrad::mlp_train_step. Everything is checked before the kernel starts: a bad call changes
// nothing.

// The hyperparameters each group gives at a call, by optimizer, in order.
constexpr const char* kSgdHyper[] = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"};
constexpr const char* kAdamHyper[] = {"lr",           "beta1",   "beta2",    "eps",
                                      "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"};

class MlpTrainStep {
 public:
  MlpTrainStep(py::handle weights_obj, py::handle biases_obj, py::handle activations_obj, py::handle slopes_obj,
               py::handle loss_obj, py::handle reduction_obj, py::handle optimizer_obj, py::handle weight_states_obj,
               py::handle bias_states_obj, py::handle delta_obj)
      : net_(call_, nullptr, weights_obj, biases_obj, activations_obj, slopes_obj) {
    dtype_ = call_.dtype();
    const std::string loss = py::isinstance<py::str>(loss_obj) ? std::string(py::str(loss_obj)) : std::string();
    std::size_t kind = std::size(lingrad::kLossNames);
    for (std::size_t i = 0; i < std::size(lingrad::kLossNames); ++i)
      if (loss == lingrad::kLossNames[i]) kind = i;
    if (kind == std::size(lingrad::kLossNames))
      throw py::value_error("loss must be 'mse', 'cross_entropy', 'huber' or 'bce_with_logits', got " +
                            std::string(py::repr(loss_obj)));
    loss_.kind = static_cast<Loss>(kind);
    loss_.reduction = parse_reduction(reduction_obj, /*allow_none=*/false);
    if (!py::isinstance<py::float_>(delta_obj) && !py::isinstance<py::int_>(delta_obj))
      throw py::type_error("delta must be a number, got " + type_name(delta_obj));
    loss_.delta = delta_obj.cast<double>();
    if (!(loss_.delta > 0)) throw py::value_error("delta (Huber's) must be > 0, got " + std::to_string(loss_.delta));
    const std::string optimizer =
        py::isinstance<py::str>(optimizer_obj) ? std::string(py::str(optimizer_obj)) : std::string();
    if (optimizer == "sgd")
      kind_ = OptimizerKind::sgd;
    else if (optimizer == "adam")
      kind_ = OptimizerKind::adam;
    else
      throw py::value_error("optimizer must be 'sgd' or 'adam' (AdamW: 'adam' with decoupled_weight_decay), got " +
                            std::string(py::repr(optimizer_obj)));
    // The arrays the step writes: parameters and state, each dense, writable and apart from the others.
    Call writes;
    writes.expect(dtype_);
    const std::size_t n = net_.size();
    for (std::size_t l = 0; l < n; ++l) {
      writes.output(net_.weights[l].object(), name("weights[" + std::to_string(l) + "]"), shape(net_.weights[l]));
      if (net_.biases[l])
        writes.output(net_.biases[l]->object(), name("biases[" + std::to_string(l) + "]"), shape(*net_.biases[l]));
    }
    weight_states_ = parse_states(writes, weight_states_obj, "weight_states", false);
    bias_states_ = parse_states(writes, bias_states_obj, "bias_states", true);
    if (dtype_ == DType::float32)
      f_ = typed<float>();
    else
      d_ = typed<double>();
  }

  double operator()(py::handle x_obj, py::handle target_obj, py::handle hyper_obj) {
    // One call at a time (the workspace and hyperparameters are the step's own). The lock is taken
    // without the GIL, so that a call waiting for it never holds the GIL that the running call needs
    // back after its kernel.
    std::unique_lock<std::mutex> lock(mutex_, std::defer_lock);
    {
      py::gil_scoped_release release;
      lock.lock();
    }
    parse_hyperparameters(hyper_obj);
    Call call;
    const Array x = call.input(x_obj, "input", 2, "(batch, in_features)");
    if (call.dtype() != dtype_)
      throw py::type_error(std::string("input has dtype ") + dtype_name(call.dtype()) + " but the network's is " +
                           dtype_name(dtype_));
    const py::ssize_t batch = x.shape(0), out = net_.out(net_.size() - 1);
    if (x.shape(1) != net_.weights[0].shape(1))
      throw py::value_error("input has shape " + shape_of(x) + " but the first layer takes " +
                            std::to_string(net_.weights[0].shape(1)) + " features (weights[0] has shape " +
                            shape_of(net_.weights[0]) + ")");
    std::optional<Array> target;
    if (loss_.kind != Loss::cross_entropy) {
      target = call.input(target_obj, "target", 2, "(batch, out_features)");
      if (target->shape(0) != batch || target->shape(1) != out)
        throw py::value_error("target has shape " + shape_of(*target) + " but must be (batch, out_features) = (" +
                              std::to_string(batch) + ", " + std::to_string(out) + ")");
    }
    if (loss_.kind == Loss::cross_entropy) class_indices(target_obj, "target", batch, out, classes_);
    const double loss = with_dtype(dtype_, [&](auto zero) {
      using T = decltype(zero);
      Typed<T>& t = typed_of<T>();
      for (std::size_t i = 0; i < t.weights.size(); ++i) {
        t.weights[i].fresh_buffer = weight_states_[i].fresh;
        t.biases[i].fresh_buffer = bias_states_[i].fresh;
      }
      const MatrixView<T> target_view = target ? matrix<T>(*target) : MatrixView<T>{nullptr, 0, 0, 0, 0};
      const MatrixView<T> x_view = matrix<T>(x);
      py::gil_scoped_release release;
      return lingrad::mlp_train_step<T>(x_view, t.layers.data(), static_cast<int>(t.layers.size()), loss_, target_view,
                                        classes_.data(), t.weights.data(), t.biases.data(), t.workspace);
    });
    for (auto* states : {&weight_states_, &bias_states_})
      for (State& s : *states) s.fresh = false;  // the momentum buffers hold the first step's now
    return loss;
  }

  // Elements of the step's workspace (activations, dZ, gradients): it grows with the batch, once.
  py::ssize_t workspace_elements() const { return f_ ? f_->workspace.capacity : d_->workspace.capacity; }

 private:
  struct State {  // one parameter's optimizer state as given (kept alive here), or frozen (group -1)
    int group = -1;
    std::optional<Array> momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq, step;
    bool fresh = false;
  };
  template <typename T>
  struct Typed {
    std::vector<MlpLayer<T>> layers;
    std::vector<ParamState<T>> weights, biases;
    TrainWorkspace<T> workspace;
  };

  const char* name(std::string text) { return names_.emplace_back(std::move(text)).c_str(); }
  static std::vector<py::ssize_t> shape(const Array& a) { return {a.shape(), a.shape() + a.ndim()}; }

  std::vector<State> parse_states(Call& writes, py::handle obj, const char* what, bool biases) {
    if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
      throw py::type_error(std::string(what) + " must be a list (one dict or None per layer), got " + type_name(obj));
    const py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
    const std::size_t n = net_.size();
    if (seq.size() != n)
      throw py::value_error(std::string(what) + " has " + std::to_string(seq.size()) + " entries but there are " +
                            std::to_string(n) + " layers");
    std::vector<State> states(n);
    for (std::size_t l = 0; l < n; ++l) {
      const std::string entry = std::string(what) + "[" + std::to_string(l) + "]";
      if (seq[l].is_none()) continue;  // frozen
      if (biases && !net_.biases[l])
        throw py::value_error(entry + " is given but layer " + std::to_string(l) + " has no bias (pass None)");
      if (!py::isinstance<py::dict>(seq[l]))
        throw py::type_error(entry + " must be a dict of the optimizer's state (or None: frozen), got " +
                             type_name(seq[l]));
      const py::dict d = py::reinterpret_borrow<py::dict>(seq[l]);
      const Array& param = biases ? *net_.biases[l] : net_.weights[l];
      State& s = states[l];
      const bool sgd = kind_ == OptimizerKind::sgd;
      for (auto item : d) {
        const std::string key = py::isinstance<py::str>(item.first) ? std::string(py::str(item.first)) : "";
        const bool known = key == "group" ||
                           (sgd ? key == "momentum_buffer" || key == "fresh"
                                : key == "exp_avg" || key == "exp_avg_sq" || key == "max_exp_avg_sq" || key == "step");
        if (!known)
          throw py::value_error(
              entry + " has the key " + std::string(py::repr(item.first)) + ", which " +
              (sgd ? "SGD's state does not have (group, momentum_buffer, fresh)"
                   : "Adam's state does not have (group, exp_avg, exp_avg_sq, max_exp_avg_sq, step)"));
      }
      if (!d.contains("group") || !py::isinstance<py::int_>(d["group"]) || d["group"].cast<long long>() < 0)
        throw py::value_error(entry + "['group'] must be the index (an int >= 0) of its hyperparameters' group");
      s.group = static_cast<int>(d["group"].cast<long long>());
      groups_ = std::max(groups_, s.group + 1);
      auto array = [&](const char* key, bool required) -> std::optional<Array> {
        if (!d.contains(key) || d[key].is_none()) {
          if (required) throw py::value_error(entry + " needs '" + key + "', an array of the parameter's shape");
          return std::nullopt;
        }
        return writes.output(d[key], name(entry + "['" + key + "']"), shape(param));
      };
      if (sgd) {
        s.momentum_buffer = array("momentum_buffer", false);
        if (d.contains("fresh")) s.fresh = parse_flag(d["fresh"], name(entry + "['fresh']"));
      } else {
        s.exp_avg = array("exp_avg", true);
        s.exp_avg_sq = array("exp_avg_sq", true);
        s.max_exp_avg_sq = array("max_exp_avg_sq", false);
        if (!d.contains("step")) throw py::value_error(entry + " needs 'step', a 0-d float32 or float64 array");
        const char* step_name = name(entry + "['step']");
        Array step = as_array(d["step"], step_name);
        if (step.size() != 1 || !(step.dtype() == DType::float32 || step.dtype() == DType::float64))
          throw py::value_error(
              std::string(step_name) + " must hold one float32 or float64 value (torch's step), got " +
              std::to_string(step.size()) + " of dtype " +
              (step.dtype() ? dtype_name(*step.dtype()) : std::string(py::str(step.object().attr("dtype")))));
        if (!step.writeable()) throw py::value_error(std::string(step_name) + " is read-only");
        for (const State& other : states)
          if (other.step && overlap(*other.step, step))
            throw py::value_error(std::string(step_name) + " is another parameter's step too; each needs its own");
        s.step = step;
      }
    }
    return states;
  }

  template <typename T>
  std::unique_ptr<Typed<T>> typed() {
    auto t = std::make_unique<Typed<T>>();
    t->layers = net_.layers<T>();
    const std::size_t n = net_.size();
    t->weights.resize(n);
    t->biases.resize(n);
    hyper_.resize(static_cast<std::size_t>(groups_));
    for (std::size_t l = 0; l < n; ++l) {
      for (int b = 0; b < 2; ++b) {
        const State& s = (b ? bias_states_ : weight_states_)[l];
        ParamState<T>& p = (b ? t->biases : t->weights)[l];
        if (s.group < 0) continue;
        Array param = b ? *net_.biases[l] : net_.weights[l];
        p.value = mutable_data<T>(param);
        p.size = param.size();
        p.hyper = &hyper_[static_cast<std::size_t>(s.group)];
        auto data = [](std::optional<Array> a) { return a ? mutable_data<T>(*a) : nullptr; };
        p.momentum_buffer = data(s.momentum_buffer);
        p.exp_avg = data(s.exp_avg);
        p.exp_avg_sq = data(s.exp_avg_sq);
        p.max_exp_avg_sq = data(s.max_exp_avg_sq);
        if (s.step) {
          Array step = *s.step;
          if (step.dtype() == DType::float32)
            p.step_f32 = mutable_data<float>(step);
          else
            p.step_f64 = mutable_data<double>(step);
        }
      }
    }
    return t;
  }

  template <typename T>
  Typed<T>& typed_of() {
    if constexpr (std::is_same_v<T, float>)
      return *f_;
    else
      return *d_;
  }

  // hyper (one tuple per group, kSgdHyper's or kAdamHyper's values in order) into hyper_, and that
  // every parameter has the state its group's options need.
  void parse_hyperparameters(py::handle obj) {
    if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
      throw py::type_error("hyperparameters must be a list of tuples (one per group), got " + type_name(obj));
    const py::sequence groups = py::reinterpret_borrow<py::sequence>(obj);
    if (static_cast<int>(groups.size()) < groups_)
      throw py::value_error("hyperparameters has " + std::to_string(groups.size()) +
                            " groups but the states name group " + std::to_string(groups_ - 1));
    const bool sgd = kind_ == OptimizerKind::sgd;
    const std::size_t count = sgd ? std::size(kSgdHyper) : std::size(kAdamHyper);
    for (int g = 0; g < groups_; ++g) {
      const py::handle item = groups[static_cast<std::size_t>(g)];
      const std::string where = "hyperparameters[" + std::to_string(g) + "]";
      if (!py::isinstance<py::tuple>(item) || py::len(item) != count)
        throw py::type_error(where + " must be a tuple of " + std::to_string(count) + " values (" +
                             (sgd ? "lr, momentum, dampening, weight_decay, nesterov, maximize"
                                  : "lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay") +
                             "), got " + std::string(py::repr(item)));
      double v[8];
      for (std::size_t i = 0; i < count; ++i) {
        PyObject* value = PyTuple_GET_ITEM(item.ptr(), static_cast<py::ssize_t>(i));
        v[i] = PyFloat_AsDouble(value);
        if (v[i] == -1.0 && PyErr_Occurred()) {
          PyErr_Clear();
          throw py::type_error(where + " (" + (sgd ? kSgdHyper[i] : kAdamHyper[i]) + ") must be a number, got " +
                               type_name(value));
        }
      }
      OptimizerHyper& h = hyper_[static_cast<std::size_t>(g)];
      h.kind = kind_;
      h.lr = v[0];
      if (sgd) {
        h.momentum = v[1], h.dampening = v[2], h.weight_decay = v[3], h.nesterov = v[4] != 0, h.maximize = v[5] != 0;
      } else {
        h.beta1 = v[1], h.beta2 = v[2], h.eps = v[3], h.weight_decay = v[4], h.amsgrad = v[5] != 0,
        h.maximize = v[6] != 0, h.decoupled = v[7] != 0;
      }
    }
    for (auto* states : {&weight_states_, &bias_states_})
      for (std::size_t l = 0; l < states->size(); ++l) {
        const State& s = (*states)[l];
        if (s.group < 0) continue;
        const OptimizerHyper& h = hyper_[static_cast<std::size_t>(s.group)];
        const std::string entry =
            std::string(states == &weight_states_ ? "weight_states[" : "bias_states[") + std::to_string(l) + "]";
        if (sgd && h.momentum != 0 && !s.momentum_buffer)
          throw py::value_error(entry + " has no momentum_buffer but its group's momentum is " +
                                std::to_string(h.momentum));
        if (!sgd && h.amsgrad && !s.max_exp_avg_sq)
          throw py::value_error(entry + " has no max_exp_avg_sq but its group has amsgrad=True");
      }
  }

  Call call_;  // (the network's arrays, read at construction)
  Network net_;
  DType dtype_ = DType::float32;
  lingrad::LossSpec loss_;
  OptimizerKind kind_ = OptimizerKind::sgd;
  std::deque<std::string> names_;
  std::vector<State> weight_states_, bias_states_;
  int groups_ = 0;
  std::vector<OptimizerHyper> hyper_;  // (ParamState::hyper points here: sized once)
  std::vector<std::int64_t> classes_;
  std::unique_ptr<Typed<float>> f_;
  std::unique_ptr<Typed<double>> d_;
  std::mutex mutex_;
};

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

  py::class_<MlpTrainStep>(
      m, "MlpTrainStep",
      R"doc(MlpTrainStep(weights, biases, activations, *, negative_slopes=None, loss="mse", reduction="mean",
             optimizer="sgd", weight_states, bias_states, delta=1.0)

A network's whole training step, made once and called per batch: step(x, target, hyperparameters)
runs the forward pass, the loss ("mse", "huber" (with delta) or "bce_with_logits" against target
(batch, out), or "cross_entropy" against int64 class indices (batch,); as torch.nn.functional's;
"mean" or "sum"), the backward pass and
the optimizer's update of every trained weight and bias in place, each layer's as soon as its
gradients are complete, and returns the loss before the update. The rules are torch.optim's, with
its roundings: optimizer="sgd" (SGD) or "adam" (Adam, and AdamW with decoupled_weight_decay).

weights, biases, activations, negative_slopes: as mlp_forward; the weights and biases are updated
in place (C-contiguous, writable). weight_states[l], bias_states[l]: None (frozen: not updated) or a
dict of the optimizer's state in torch.optim's layout, each array of the parameter's shape, updated
in place: {"group": g, "momentum_buffer": array or None, "fresh": bool} for SGD ("fresh": the buffer
holds nothing yet and the first step sets it to the gradient, as torch's first step does); for Adam
{"group": g, "exp_avg", "exp_avg_sq", "max_exp_avg_sq" (amsgrad), "step": a 1-element float32 or
float64 array, the step count}. "group" indexes hyperparameters.

hyperparameters: one tuple per group, read at every call: SGD (lr, momentum, dampening,
weight_decay, nesterov, maximize); Adam (lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
decoupled_weight_decay). Every argument is checked before anything is computed: an error changes
nothing. The step keeps its buffers between calls (they grow with the batch, once); one call at a
time per step.)doc")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
                    py::handle, py::handle>(),
           keyword("weights"), keyword("biases"), keyword("activations"), py::kw_only(),
           keyword("negative_slopes") = py::none(), keyword("loss") = "mse", keyword("reduction") = "mean",
           keyword("optimizer") = "sgd", keyword("weight_states"), keyword("bias_states"), keyword("delta") = 1.0)
      .def("__call__", &MlpTrainStep::operator(), keyword("x"), keyword("target"), keyword("hyperparameters"),
           "step(x, target, hyperparameters) -> the loss before the update (see the class)")
      .def_property_readonly("workspace_elements", &MlpTrainStep::workspace_elements,
                             "Elements of the buffers the step keeps between calls (they grow with the batch).");
}

}  // namespace lingrad::bindings
