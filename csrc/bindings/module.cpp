// lingrad._C: the Python face of the kernel library.
//
// The one place that validates arguments: every check of type, dtype, rank, shape, layout and
// aliasing is here, with messages that name the argument and the shapes. Inputs are used in
// place through their strides (never copied, never cast); outputs are new arrays or caller's
// `out` arrays that must be exactly right. The GIL is released while a kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lingrad.hpp"

namespace py = pybind11;
using lingrad::index_t;
using lingrad::MatrixView;
using lingrad::Reduction;
using lingrad::VectorView;

namespace {

// ---------------------------------------------------------------------------------------------
// Descriptions for messages

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

std::string byte_count(double bytes) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"};
  int u = 0;
  for (; bytes >= 1024 && u < 8; ++u) bytes /= 1024;
  char text[32];
  std::snprintf(text, sizeof text, u ? "%.1f %s" : "%.0f %s", bytes, units[u]);
  return text;
}

[[noreturn]] void throw_memory_error(const std::string& message) {
  PyErr_SetString(PyExc_MemoryError, message.c_str());
  throw py::error_already_set();
}

// ---------------------------------------------------------------------------------------------
// Inputs

enum class DType { float32, float64, bfloat16 };

// NumPy's bfloat16 is ml_dtypes.bfloat16 (an optional dependency): its dtype, or None without it.
py::object bf16_dtype() {
  static py::object dtype = [] {
    try {
      return py::object(py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16")));
    } catch (py::error_already_set&) {
      return py::object(py::none());
    }
  }();
  return dtype;
}

// Whether ml_dtypes is there, without importing it (its import takes about half a second, which
// `import lingrad` and build_info() should not cost a user who never asks for bfloat16).
bool bf16_offered() {
  static const bool found = [] {
    try {
      return !py::module_::import("importlib.util").attr("find_spec")("ml_dtypes").is_none();
    } catch (py::error_already_set&) {  // (ml_dtypes in sys.modules without a spec: ask it)
      return !bf16_dtype().is_none();
    }
  }();
  return found;
}

bool is_bf16(const py::dtype& dt) { return dt.kind() == 'V' && dt.itemsize() == 2 && dt.equal(bf16_dtype()); }

// DLPack (the unversioned ABI that torch.utils.dlpack.to_dlpack exports, as a capsule named
// "dltensor"): lingrad's PyTorch layer hands tensors over this way. Tensor.numpy() would mark the
// tensor's storage as not resizable for good, which nn.Linear never does to its inputs and outputs.
struct DLDevice {
  std::int32_t device_type;  // 1: CPU
  std::int32_t device_id;
};
struct DLDataType {
  std::uint8_t code;  // 2: IEEE float
  std::uint8_t bits;
  std::uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  std::int32_t ndim;
  DLDataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; null means C-contiguous
  std::uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

// The array view of a DLPack capsule, which it consumes: the producer's tensor stays alive as
// long as the array (or a view of it) does.
py::array from_dlpack(py::handle capsule, const char* name) {
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (!managed) throw py::error_already_set();
  const DLTensor& t = managed->dl_tensor;
  if (t.device.device_type != 1)
    throw py::type_error(std::string(name) + " is a DLPack tensor on a device other than the CPU");
  const bool bf16 = t.dtype.code == 4 && t.dtype.bits == 16 && t.dtype.lanes == 1;
  if (bf16 && bf16_dtype().is_none())
    throw py::type_error(
        std::string(name) +
        " has dtype bfloat16, which lingrad reads through the ml_dtypes package: " + "pip install ml_dtypes");
  if (!bf16 && (t.dtype.code != 2 || t.dtype.lanes != 1 || (t.dtype.bits != 32 && t.dtype.bits != 64))) {
    const char* kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
    const std::string kind = t.dtype.code < 7 ? kinds[t.dtype.code] : "code " + std::to_string(t.dtype.code);
    throw py::type_error(std::string(name) + " has dtype " + kind + std::to_string(t.dtype.bits) +
                         "; lingrad computes in float32, float64 or (the Linear layer's products) bfloat16 "
                         "(convert explicitly)");
  }
  const py::ssize_t itemsize = t.dtype.bits / 8;
  std::vector<py::ssize_t> shape(t.shape, t.shape + t.ndim), strides(t.ndim);
  for (int d = t.ndim - 1; d >= 0; --d)
    strides[d] = t.strides ? t.strides[d] * itemsize : (d + 1 < t.ndim ? strides[d + 1] * shape[d + 1] : itemsize);
  PyCapsule_SetName(capsule.ptr(), "used_dltensor");  // consumed: its own destructor leaves the tensor alone
  py::capsule owner(managed, [](void* p) {
    auto* m = static_cast<DLManagedTensor*>(p);
    if (m->deleter) m->deleter(m);
  });
  const py::dtype dtype = bf16            ? py::reinterpret_borrow<py::dtype>(bf16_dtype())
                          : itemsize == 4 ? py::dtype::of<float>()
                                          : py::dtype::of<double>();
  return py::array(dtype, shape, strides, static_cast<char*>(t.data) + t.byte_offset, owner);
}

py::array as_ndarray(py::handle obj, const char* name) {
  if (PyCapsule_CheckExact(obj.ptr())) {
    const char* capsule_name = PyCapsule_GetName(obj.ptr());
    if (capsule_name && std::strcmp(capsule_name, "dltensor") == 0) return from_dlpack(obj, name);
  }
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy.ndarray, got " + type_name(obj));
  // A subclass is read as the plain array it is, except a masked array: its mask would be
  // silently ignored. (Only subclasses pay for this check; numpy.ma is already imported then.)
  if (!py::type::handle_of(obj).is(py::handle(reinterpret_cast<PyObject*>(py::detail::npy_api::get().PyArray_Type_))) &&
      py::isinstance(obj, py::module_::import("numpy.ma").attr("MaskedArray")))
    throw py::type_error(std::string(name) + " is a numpy.ma.MaskedArray, whose mask lingrad would ignore; pass " +
                         name + ".filled(value) or " + name + ".data");
  return py::reinterpret_borrow<py::array>(obj);
}

DType dtype_of(const py::array& a, const char* name) {
  const py::dtype dt = a.dtype();
  if (dt.equal(py::dtype::of<float>())) return DType::float32;
  if (dt.equal(py::dtype::of<double>())) return DType::float64;
  if (is_bf16(dt)) return DType::bfloat16;
  const std::string dts = py::str(dt);
  if (dt.kind() == 'f' && (dt.itemsize() == 4 || dt.itemsize() == 8))
    throw py::type_error(std::string(name) + " has non-native byte order (dtype " + dts +
                         "); convert it with .astype(its dtype.newbyteorder('='))");
  throw py::type_error(std::string(name) + " has dtype " + dts +
                       "; lingrad computes in float32, float64 or (the Linear layer's products) bfloat16 "
                       "(convert explicitly with .astype)");
}

const char* dtype_name(DType d) {
  return d == DType::float32 ? "float32" : d == DType::float64 ? "float64" : "bfloat16";
}

// The arguments of one call: the dtype set by the first array, every input remembered so that
// outputs can be checked for overlap.
//
// A call of a function with bfloat16 products (the Linear layer's) may mix float32 and bfloat16
// inputs: its dtype is then bfloat16, and a new result is bfloat16 if every input is, else float32.
class Call {
 public:
  explicit Call(bool bf16_products = false) : bf16_ok_(bf16_products) {}

  // An input array of rank `ndim` (or 1 when allow_1d), of the call's dtype.
  // other_ndim: a second rank that is also accepted (3 for per-sample arrays with a sequence dimension).
  py::array input(py::handle obj, const char* name, int ndim, const char* meaning, bool allow_1d = false,
                  int other_ndim = -1) {
    py::array a = as_ndarray(obj, name);
    const DType d = dtype_of(a, name);
    if (d == DType::bfloat16 && !bf16_ok_)
      throw py::type_error(
          std::string(name) +
          " has dtype bfloat16; of lingrad's kernels, linear_forward, linear_backward_input, "
          "linear_backward_weight and linear_mse compute in bfloat16 (convert explicitly with .astype)");
    if (inputs_.empty()) {
      dtype_ = d;
    } else if (d != dtype_) {
      const DType first = dtype_of(inputs_[0].second, inputs_[0].first);
      if (!bf16_ok_ || d == DType::float64 || dtype_ == DType::float64)
        throw py::type_error(std::string(name) + " has dtype " + dtype_name(d) + " but " + inputs_[0].first +
                             " has dtype " + dtype_name(first) + "; all arrays must share one dtype" +
                             (bf16_ok_ ? " (or mix float32 and bfloat16)" : ""));
      dtype_ = DType::bfloat16;  // float32 with bfloat16: bfloat16 products
    }
    all_bf16_ = all_bf16_ && d == DType::bfloat16;
    if (a.ndim() != ndim && !(allow_1d && a.ndim() == 1) && a.ndim() != other_ndim)
      throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D " + meaning + ", got shape " +
                            shape_of(a));
    require_aligned(a, name);
    inputs_.emplace_back(name, a);
    return a;
  }

  // A new output, or the caller's `out` checked to be exactly what a new one would be. In a
  // bfloat16 call, `out` may be float32 or bfloat16 (unless `dtype` fixes it), and a new one is
  // `dtype` if given, else the call's result dtype.
  py::array output(py::handle obj, const char* name, const std::vector<py::ssize_t>& shape,
                   std::optional<DType> dtype = std::nullopt) {
    py::array a;
    if (obj.is_none()) {
      a = allocate(name, shape, dtype ? *dtype : result_dtype());
    } else {
      a = as_ndarray(obj, name);
      auto expect = [&] { return shape_string(shape); };
      if (dtype_ == DType::bfloat16) {
        const bool f32 = a.dtype().equal(py::dtype::of<float>()), bf16 = is_bf16(a.dtype());
        if (dtype ? !(*dtype == DType::float32 ? f32 : bf16) : !(f32 || bf16))
          throw py::value_error(std::string(name) + " has dtype " + std::string(py::str(a.dtype())) + " but must be " +
                                (dtype ? dtype_name(*dtype) : "float32 or bfloat16") +
                                " (a bfloat16 product's result)");
      } else if (!a.dtype().equal(dtype_ == DType::float32 ? py::dtype::of<float>() : py::dtype::of<double>())) {
        throw py::value_error(std::string(name) + " has dtype " + std::string(py::str(a.dtype())) + " but must be " +
                              dtype_name(dtype_) + " like the inputs");
      }
      if (a.ndim() != static_cast<py::ssize_t>(shape.size()) || !std::equal(shape.begin(), shape.end(), a.shape()))
        throw py::value_error(std::string(name) + " has shape " + shape_of(a) + " but must be " + expect());
      if (!(a.flags() & py::array::c_style) || (a.size() > 0 && !is_aligned(a)))
        throw py::value_error(std::string(name) + " must be C-contiguous and aligned (shape " + expect() + ")");
      if (!a.writeable()) throw py::value_error(std::string(name) + " is read-only");
      for (const auto& [other_name, other] : inputs_)
        if (overlap(a, other))
          throw py::value_error(std::string(name) + " overlaps " + other_name + " in memory; pass a separate array");
      for (const auto& [other_name, other] : outputs_)
        if (overlap(a, other))
          throw py::value_error(std::string(name) + " overlaps " + other_name + " in memory; pass a separate array");
    }
    outputs_.emplace_back(name, a);
    return a;
  }

  DType dtype() const { return dtype_; }
  // A new result's dtype: the call's, except a bfloat16 call with a float32 input makes float32.
  DType result_dtype() const { return dtype_ == DType::bfloat16 && !all_bf16_ ? DType::float32 : dtype_; }

 private:
  // A new output array. One that cannot exist is an error naming it: ValueError if it is larger
  // than the address space, MemoryError if it cannot be allocated.
  py::array allocate(const char* name, const std::vector<py::ssize_t>& shape, DType dtype) const {
    double bytes = dtype == DType::float32 ? 4.0 : dtype == DType::float64 ? 8.0 : 2.0;  // (double: never overflows)
    for (py::ssize_t n : shape) bytes *= static_cast<double>(n);
    // (the message is built only when needed: it costs more than a small kernel)
    auto what = [&] { return std::string(name) + " of shape " + shape_string(shape) + " (" + byte_count(bytes) + ")"; };
    if (bytes > static_cast<double>(PY_SSIZE_T_MAX))
      throw py::value_error(what() + " would be larger than the address space");
    try {
      if (dtype == DType::bfloat16) return py::array(py::reinterpret_borrow<py::dtype>(bf16_dtype()), shape);
      return dtype == DType::float32 ? py::array(py::array_t<float>(shape)) : py::array(py::array_t<double>(shape));
    } catch (py::error_already_set& e) {
      if (!e.matches(PyExc_MemoryError)) throw;
      throw_memory_error("cannot allocate " + what());
    }
  }

  static std::string shape_string(const std::vector<py::ssize_t>& shape) {
    std::string s = "(";
    for (std::size_t d = 0; d < shape.size(); ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
    return s + (shape.size() == 1 ? ",)" : ")");
  }

  // Data and strides are multiples of the element size. The stride of a dimension of length 1
  // is never used (NumPy may leave any value there), so it is not checked.
  static bool is_aligned(const py::array& a) {
    const py::ssize_t size = a.itemsize();
    if (reinterpret_cast<std::uintptr_t>(a.data()) % size) return false;
    for (py::ssize_t d = 0; d < a.ndim(); ++d)
      if (a.shape(d) > 1 && a.strides(d) % size) return false;
    return true;
  }

  static void require_aligned(const py::array& a, const char* name) {
    if (a.size() > 0 && !is_aligned(a))
      throw py::value_error(std::string(name) + " is not aligned to its " + std::to_string(a.itemsize()) +
                            "-byte elements (data or strides); copy it with numpy.ascontiguousarray");
  }

  // [first byte, one past the last byte] that the array can touch; empty for no elements.
  static std::pair<std::uintptr_t, std::uintptr_t> extent(const py::array& a) {
    if (a.size() == 0) return {0, 0};
    std::intptr_t lo = reinterpret_cast<std::intptr_t>(a.data()), hi = lo;
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
      const std::intptr_t span = static_cast<std::intptr_t>(a.shape(d) - 1) * a.strides(d);
      (span < 0 ? lo : hi) += span;
    }
    return {static_cast<std::uintptr_t>(lo), static_cast<std::uintptr_t>(hi + a.itemsize())};
  }

  static bool overlap(const py::array& a, const py::array& b) {
    const auto [a_lo, a_hi] = extent(a);
    const auto [b_lo, b_hi] = extent(b);
    return a_lo < a_hi && b_lo < b_hi && a_lo < b_hi && b_lo < a_hi;
  }

  bool bf16_ok_ = false, all_bf16_ = true;
  DType dtype_ = DType::float32;
  std::vector<std::pair<const char*, py::array>> inputs_;
  std::vector<std::pair<const char*, py::array>> outputs_;
};

// Views of validated arrays (strides in elements; 0 for a dimension of length 1, whose stride
// NumPy leaves unspecified). A 1-D array is one row.
template <typename T>
index_t stride(const py::array& a, py::ssize_t d) {
  return a.shape(d) > 1 ? static_cast<index_t>(a.strides(d)) / static_cast<index_t>(sizeof(T)) : 0;
}

template <typename T>
MatrixView<T> matrix(const py::array& a) {
  const T* data = static_cast<const T*>(a.data());
  if (a.ndim() == 1) return {data, 1, a.shape(0), 0, stride<T>(a, 0)};
  return {data, a.shape(0), a.shape(1), stride<T>(a, 0), stride<T>(a, 1)};
}

template <typename T>
VectorView<T> vector(const py::array& a) {
  return {static_cast<const T*>(a.data()), a.shape(0), stride<T>(a, 0)};
}

template <typename T>
T* mutable_data(py::array& a) {
  return static_cast<T*>(a.mutable_data());
}

// Runs f with a value of the call's element type (float or double).
template <typename F>
decltype(auto) with_dtype(DType d, F&& f) {
  if (d == DType::float32) return f(float{});
  return f(double{});
}

// bfloat16 products' operands and results: float32 or bfloat16 arrays, by their dtype.
using lingrad::Bf16Matrix;
using lingrad::Bf16Output;
using lingrad::bfloat16;

bool is_f32(const py::array& a) { return a.dtype().equal(py::dtype::of<float>()); }

Bf16Matrix bf16_matrix(const py::array& a) {
  if (is_f32(a)) {
    const MatrixView<float> m = matrix<float>(a);
    return {m.data, nullptr, m.rows, m.cols, m.rs, m.cs};
  }
  const MatrixView<bfloat16> m = matrix<bfloat16>(a);
  return {nullptr, m.data, m.rows, m.cols, m.rs, m.cs};
}

Bf16Output bf16_output(py::array& a) {
  if (is_f32(a)) return {mutable_data<float>(a), nullptr};
  return {nullptr, mutable_data<bfloat16>(a)};
}

// A float32 vector's view, or a bfloat16 one widened into `buffer` (a bias: out_features values).
VectorView<float> float_vector(const std::optional<py::array>& v, std::vector<float>& buffer) {
  if (!v) return {};
  if (is_f32(*v)) return vector<float>(*v);
  const VectorView<bfloat16> h = vector<bfloat16>(*v);
  buffer.resize(static_cast<std::size_t>(h.size));
  for (index_t i = 0; i < h.size; ++i) buffer[i] = lingrad::bf16_to_float(h.data[i * h.stride]);
  return {buffer.data(), h.size, 1};
}

// A float32 result computed into `buffer` and rounded into the bfloat16 array `out` (a bias gradient).
void round_into(const std::vector<float>& buffer, py::array& out) {
  bfloat16* o = mutable_data<bfloat16>(out);
  for (std::size_t i = 0; i < buffer.size(); ++i) o[i] = lingrad::float_to_bf16(buffer[i]);
}

void require_same_columns(const py::array& a, const char* a_name, py::ssize_t a_dim, const py::array& b,
                          const char* b_name, py::ssize_t b_dim, const char* what) {
  if (a.shape(a_dim) != b.shape(b_dim))
    throw py::value_error(std::string(a_name) + " has shape " + shape_of(a) + " but " + b_name + " has shape " +
                          shape_of(b) + ": " + what);
}

void require_same_shape(const py::array& a, const char* a_name, const py::array& b, const char* b_name) {
  if (a.ndim() != b.ndim() || !std::equal(a.shape(), a.shape() + a.ndim(), b.shape()))
    throw py::value_error(std::string(a_name) + " has shape " + shape_of(a) + " but " + b_name + " has shape " +
                          shape_of(b) + "; they must match");
}

std::optional<py::array> optional_bias(Call& call, py::handle bias, const char* name, const py::array& weight) {
  if (bias.is_none()) return std::nullopt;
  py::array b = call.input(bias, name, 1, "(out_features,)");
  if (b.shape(0) != weight.shape(0))
    throw py::value_error(std::string(name) + " has shape " + shape_of(b) + " but weight has shape " +
                          shape_of(weight) + ": " + name + " must be (" + std::to_string(weight.shape(0)) + ",)");
  return b;
}

// A switch: True or False (Python or NumPy bools; None is False). Anything else, an array given
// for linear_backward_weight's bias= for instance, is a TypeError rather than its truth value.
bool parse_flag(py::handle obj, const char* name) {
  if (obj.is_none()) return false;
  if (py::isinstance<py::bool_>(obj) || py::isinstance(obj, py::module_::import("numpy").attr("bool_")))
    return PyObject_IsTrue(obj.ptr()) == 1;
  throw py::type_error(std::string(name) + " must be True or False, got " + type_name(obj));
}

Reduction parse_reduction(py::handle obj, bool allow_none) {
  if (!py::isinstance<py::str>(obj))
    throw py::type_error("reduction must be a str ('mean' or 'sum'" + std::string(allow_none ? " or 'none'" : "") +
                         "), got " + type_name(obj));
  const std::string r = py::str(obj);
  if (r == "mean") return Reduction::mean;
  if (r == "sum") return Reduction::sum;
  if (r == "none" && allow_none) return Reduction::none;
  throw py::value_error("reduction must be 'mean' or 'sum'" + std::string(allow_none ? " or 'none'" : "") + ", got '" +
                        r + "'");
}

// ---------------------------------------------------------------------------------------------
// The functions

py::object or_none(const std::optional<py::array>& a) { return a ? py::object(*a) : py::object(py::none()); }

py::array linear_forward(py::handle x_obj, py::handle weight_obj, py::handle bias_obj, py::handle out_obj) {
  Call call(/*bf16_products=*/true);
  const py::array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  const py::array w = call.input(weight_obj, "weight", 2, "(out_features, in_features)");
  require_same_columns(w, "weight", 1, x, "x", 1, "weight must be (out_features, in_features) with x's in_features");
  const std::optional<py::array> b = optional_bias(call, bias_obj, "bias", w);
  py::array y = call.output(out_obj, "out", {x.shape(0), w.shape(0)});
  if (call.dtype() == DType::bfloat16) {
    std::vector<float> bias_buffer;
    const VectorView<float> bias = float_vector(b, bias_buffer);
    const Bf16Output out = bf16_output(y);
    const Bf16Matrix xm = bf16_matrix(x), wm = bf16_matrix(w);  // (with the GIL: they read dtypes)
    py::gil_scoped_release release;
    lingrad::linear_forward_bf16(xm, wm, bias, out);
    return y;
  }
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const VectorView<T> bias = b ? vector<T>(*b) : VectorView<T>{};
    py::gil_scoped_release release;
    lingrad::linear_forward<T>(matrix<T>(x), matrix<T>(w), bias, mutable_data<T>(y));
  });
  return y;
}

py::array linear_backward_input(py::handle grad_obj, py::handle weight_obj, py::handle out_obj) {
  Call call(/*bf16_products=*/true);
  const py::array dy = call.input(grad_obj, "grad_out", 2, "(batch, out_features)");
  const py::array w = call.input(weight_obj, "weight", 2, "(out_features, in_features)");
  require_same_columns(w, "weight", 0, dy, "grad_out", 1,
                       "weight must be (out_features, in_features) with grad_out's out_features");
  py::array dx = call.output(out_obj, "out", {dy.shape(0), w.shape(1)});
  if (call.dtype() == DType::bfloat16) {
    const Bf16Output out = bf16_output(dx);
    const Bf16Matrix dym = bf16_matrix(dy), wm = bf16_matrix(w);
    py::gil_scoped_release release;
    lingrad::linear_backward_input_bf16(dym, wm, out);
    return dx;
  }
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    py::gil_scoped_release release;
    lingrad::linear_backward_input<T>(matrix<T>(dy), matrix<T>(w), mutable_data<T>(dx));
  });
  return dx;
}

py::tuple linear_backward_weight(py::handle grad_obj, py::handle x_obj, py::handle sample_weights_obj,
                                 py::handle bias_obj, py::handle out_obj, py::handle bias_out_obj) {
  Call call(/*bf16_products=*/true);
  const bool bias = parse_flag(bias_obj, "bias");
  const py::array dy = call.input(grad_obj, "grad_out", 2, "(batch, out_features)");
  const py::array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  require_same_columns(x, "x", 0, dy, "grad_out", 0, "both need the same batch size");
  std::optional<py::array> s;
  if (!sample_weights_obj.is_none()) {
    s = call.input(sample_weights_obj, "sample_weights", 1, "(batch,)");
    require_same_columns(*s, "sample_weights", 0, dy, "grad_out", 0, "sample_weights must be (batch,)");
  }
  if (!bias && !bias_out_obj.is_none()) throw py::value_error("bias_out was given but bias=False");
  py::array dw = call.output(out_obj, "out", {dy.shape(1), x.shape(1)});
  std::optional<py::array> db;
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
    return py::make_tuple(dw, or_none(db));
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
  return py::make_tuple(dw, or_none(db));
}

// Per-sample arrays: grad_out (batch, out_features) and x (batch, in_features), or both with a
// sequence dimension, (batch, steps, out_features) and (batch, steps, in_features).
std::pair<py::array, py::array> per_sample_inputs(Call& call, py::handle grad_obj, py::handle x_obj) {
  const py::array dy =
      call.input(grad_obj, "grad_out", 2, "(batch, out_features) or 3-D (batch, steps, out_features)", false, 3);
  const py::array x = call.input(x_obj, "x", 2, "(batch, in_features) or 3-D (batch, steps, in_features)", false, 3);
  if (dy.ndim() != x.ndim() || dy.shape(0) != x.shape(0) || (dy.ndim() == 3 && dy.shape(1) != x.shape(1)))
    throw py::value_error("grad_out has shape " + shape_of(dy) + " but x has shape " + shape_of(x) +
                          ": both must be (batch, features) or both (batch, steps, features), with the same batch" +
                          (dy.ndim() == 3 ? " and steps" : ""));
  return {dy, x};
}

template <typename T>
lingrad::SampleView<T> samples(const py::array& a) {
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
  py::array g = call.output(out_obj, "out", {dy.shape(0), dy.shape(last), x.shape(last)});
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    T* data = mutable_data<T>(g);
    py::gil_scoped_release release;
    lingrad::linear_per_sample_grads<T>(samples<T>(dy), samples<T>(x), data);
  });
  return g;
}

py::object mse_loss(py::handle pred_obj, py::handle target_obj, py::handle reduction_obj, py::handle out_obj) {
  Call call;
  const py::array p = call.input(pred_obj, "pred", 2, "(batch, features)", /*allow_1d=*/true);
  const py::array t = call.input(target_obj, "target", 2, "(batch, features)", /*allow_1d=*/true);
  require_same_shape(t, "target", p, "pred");
  const Reduction reduction = parse_reduction(reduction_obj, /*allow_none=*/true);
  if (reduction != Reduction::none && !out_obj.is_none())
    throw py::value_error("out was given but reduction is not 'none' (the mean and the sum are Python floats)");
  std::vector<py::ssize_t> shape(p.shape(), p.shape() + p.ndim());
  std::optional<py::array> out;
  if (reduction == Reduction::none) out = call.output(out_obj, "out", shape);
  const double loss = with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    T* out_data = out ? mutable_data<T>(*out) : nullptr;
    py::gil_scoped_release release;
    return lingrad::mse_loss<T>(matrix<T>(p), matrix<T>(t), reduction, out_data);
  });
  if (out) return *out;
  return py::float_(loss);
}

py::array mse_backward(py::handle pred_obj, py::handle target_obj, py::handle reduction_obj, py::handle out_obj) {
  Call call;
  const py::array p = call.input(pred_obj, "pred", 2, "(batch, features)", /*allow_1d=*/true);
  const py::array t = call.input(target_obj, "target", 2, "(batch, features)", /*allow_1d=*/true);
  require_same_shape(t, "target", p, "pred");
  const Reduction reduction = parse_reduction(reduction_obj, /*allow_none=*/true);
  py::array grad = call.output(out_obj, "out", std::vector<py::ssize_t>(p.shape(), p.shape() + p.ndim()));
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    py::gil_scoped_release release;
    lingrad::mse_backward<T>(matrix<T>(p), matrix<T>(t), reduction, mutable_data<T>(grad));
  });
  return grad;
}

// linear_mse's bfloat16 step, its arrays validated: a bfloat16 target is widened to float32 first
// (a (batch, out) copy; the loss compares in float32).
py::tuple linear_mse_bf16(const py::array& x, const py::array& w, const std::optional<py::array>& b, const py::array& t,
                          Reduction reduction, std::optional<py::array>& dx, py::array& dw,
                          std::optional<py::array>& db, std::optional<py::array>& dy) {
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
  return py::make_tuple(loss, or_none(dx), dw, or_none(db));
}

py::tuple linear_mse(py::handle x_obj, py::handle weight_obj, py::handle bias_obj, py::handle target_obj,
                     py::handle reduction_obj, py::handle input_grad_obj, py::handle grad_output_obj) {
  Call call(/*bf16_products=*/true);
  const bool input_grad = parse_flag(input_grad_obj, "input_grad");
  const py::array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  const py::array w = call.input(weight_obj, "weight", 2, "(out_features, in_features)");
  require_same_columns(w, "weight", 1, x, "x", 1, "weight must be (out_features, in_features) with x's in_features");
  const std::optional<py::array> b = optional_bias(call, bias_obj, "bias", w);
  const py::array t = call.input(target_obj, "target", 2, "(batch, out_features)");
  if (t.shape(0) != x.shape(0) || t.shape(1) != w.shape(0))
    throw py::value_error("target has shape " + shape_of(t) + " but must be (batch, out_features) = (" +
                          std::to_string(x.shape(0)) + ", " + std::to_string(w.shape(0)) + ") for x " + shape_of(x) +
                          " and weight " + shape_of(w));
  const Reduction reduction = parse_reduction(reduction_obj, /*allow_none=*/false);
  // Each gradient has its input's dtype (in a bfloat16 call: a float32 weight gets a float32
  // gradient); grad_output is float32 there (dY is summed and kept in float32).
  const bool bf16 = call.dtype() == DType::bfloat16;
  auto like = [&](const py::array& a) { return bf16 ? std::optional<DType>(dtype_of(a, "")) : std::nullopt; };
  std::optional<py::array> dx, db;
  if (input_grad) dx = call.output(py::none(), "grad_input", {x.shape(0), x.shape(1)}, like(x));
  py::array dw = call.output(py::none(), "grad_weight", {w.shape(0), w.shape(1)}, like(w));
  if (b) db = call.output(py::none(), "grad_bias", {w.shape(0)}, like(*b));
  std::optional<py::array> dy;
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
  return py::make_tuple(loss, or_none(dx), dw, or_none(db));
}

// ---------------------------------------------------------------------------------------------
// Whole networks: weights W_l (out_l, in_l), biases b_l (out_l,) or None, one activation each.

using lingrad::Activation;

Activation parse_activation(py::handle obj, const std::string& name) {
  const char* names[] = {"identity", "relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu"};
  if (py::isinstance<py::str>(obj)) {
    const std::string a = py::str(obj);
    for (int i = 0; i < 8; ++i)
      if (a == names[i]) return static_cast<Activation>(i);
  }
  std::string options;
  for (const char* n : names) options += (options.empty() ? "'" : ", '") + std::string(n) + "'";
  throw py::value_error(name + " must be one of " + options + ", got " + std::string(py::repr(obj)));
}

// A network's arrays, validated: shapes chain from x, one dtype, names like "weights[1]" in messages.
struct Network {
  std::deque<std::string> names;  // (stable addresses for Call's messages)
  std::vector<py::array> weights;
  std::vector<std::optional<py::array>> biases;
  std::vector<Activation> activations;
  std::vector<double> slopes;

  Network(Call& call, const py::array& x, py::handle weights_obj, py::handle biases_obj, py::handle activations_obj,
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
      py::array w = call.input(ws[l], w_name, 2, "(out_features, in_features)");
      if (w.shape(1) != width)
        throw py::value_error(std::string(w_name) + " has shape " + shape_of(w) + " but its layer's input has " +
                              std::to_string(width) + " features (" +
                              (l == 0
                                   ? "x has shape " + shape_of(x)
                                   : "weights[" + std::to_string(l - 1) + "] has shape " + shape_of(weights.back())) +
                              ")");
      width = w.shape(0);
      weights.push_back(w);
      std::optional<py::array> b;
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
  const py::array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  const Network net(call, x, weights_obj, biases_obj, activations_obj, slopes_obj);
  const std::size_t n = net.size();
  const py::ssize_t batch = x.shape(0);
  py::array y = call.output(out_obj, "out", {batch, net.out(n - 1)});
  py::list hidden, pre;  // hidden: H_l for l < n - 1; pre: Z_l or None for every l
  std::vector<py::array> keep;
  if (save)
    for (std::size_t l = 0; l < n; ++l) {
      if (l + 1 < n) hidden.append(call.output(py::none(), "hidden", {batch, net.out(l)}));
      if (net.needs_pre(l))
        pre.append(call.output(py::none(), "pre", {batch, net.out(l)}));
      else
        pre.append(py::none());
    }
  with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const std::vector<lingrad::MlpLayer<T>> layers = net.layers<T>();
    std::vector<lingrad::MlpSaved<T>> saved(n);
    if (save)
      for (std::size_t l = 0; l < n; ++l) {
        if (l + 1 < n) saved[l].h = static_cast<T*>(py::array(hidden[l]).mutable_data());
        if (!pre[l].is_none()) saved[l].z = static_cast<T*>(py::array(pre[l]).mutable_data());
      }
    T* y_data = mutable_data<T>(y);
    py::gil_scoped_release release;
    lingrad::mlp_forward<T>(matrix<T>(x), layers.data(), static_cast<int>(n), y_data, save ? saved.data() : nullptr);
  });
  if (!save) return y;
  return py::make_tuple(y, hidden, pre);
}

// The gradients' arrays: grad_weights[l] (out_l, in_l), grad_biases[l] (out_l,) where the layer has a bias.
struct NetworkGrads {
  py::list weights, biases;
  NetworkGrads(Call& call, const Network& net) {
    for (std::size_t l = 0; l < net.size(); ++l) {
      weights.append(call.output(py::none(), "grad_weights", {net.weights[l].shape(0), net.weights[l].shape(1)}));
      if (net.biases[l])
        biases.append(call.output(py::none(), "grad_biases", {net.out(l)}));
      else
        biases.append(py::none());
    }
  }
  template <typename T>
  std::pair<std::vector<T*>, std::vector<T*>> pointers() const {
    std::vector<T*> dw, db;
    for (std::size_t l = 0; l < weights.size(); ++l) {
      dw.push_back(static_cast<T*>(py::array(weights[l]).mutable_data()));
      db.push_back(biases[l].is_none() ? nullptr : static_cast<T*>(py::array(biases[l]).mutable_data()));
    }
    return {dw, db};
  }
};

py::tuple mlp_backward(py::handle grad_obj, py::handle x_obj, py::handle weights_obj, py::handle biases_obj,
                       py::handle activations_obj, py::handle y_obj, py::handle hidden_obj, py::handle pre_obj,
                       py::handle slopes_obj, py::handle input_grad_obj) {
  Call call;
  const bool input_grad = parse_flag(input_grad_obj, "input_grad");
  const py::array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  const Network net(call, x, weights_obj, biases_obj, activations_obj, slopes_obj);
  const std::size_t n = net.size();
  const py::ssize_t batch = x.shape(0);
  const std::vector<py::ssize_t> out_shape = {batch, net.out(n - 1)};
  auto require_shape = [&](const py::array& a, const char* name, const std::vector<py::ssize_t>& shape) {
    if (a.shape(0) != shape[0] || a.shape(1) != shape[1])
      throw py::value_error(std::string(name) + " has shape " + shape_of(a) + " but must be (" +
                            std::to_string(shape[0]) + ", " + std::to_string(shape[1]) + ")");
  };
  const py::array dy = call.input(grad_obj, "grad_out", 2, "(batch, out_features)");
  require_shape(dy, "grad_out", out_shape);
  const py::array y = call.input(y_obj, "y", 2, "(batch, out_features)");
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
  std::vector<py::array> hidden;
  std::vector<std::optional<py::array>> pre(n);
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
  for (const py::array& a : hidden)
    if (!(a.flags() & py::array::c_style)) throw py::value_error("hidden arrays must be C-contiguous");
  for (std::size_t l = 0; l < n; ++l)
    if (pre[l] && !(pre[l]->flags() & py::array::c_style)) throw py::value_error("pre arrays must be C-contiguous");
  if (!(y.flags() & py::array::c_style)) throw py::value_error("y must be C-contiguous");
  std::optional<py::array> dx;
  if (input_grad) dx = call.output(py::none(), "grad_input", {batch, x.shape(1)});
  const NetworkGrads grads(call, net);
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
  return py::make_tuple(or_none(dx), grads.weights, grads.biases);
}

py::tuple mlp_mse(py::handle x_obj, py::handle weights_obj, py::handle biases_obj, py::handle activations_obj,
                  py::handle target_obj, py::handle reduction_obj, py::handle slopes_obj, py::handle input_grad_obj) {
  Call call;
  const bool input_grad = parse_flag(input_grad_obj, "input_grad");
  const py::array x = call.input(x_obj, "x", 2, "(batch, in_features)");
  const Network net(call, x, weights_obj, biases_obj, activations_obj, slopes_obj);
  const std::size_t n = net.size();
  const py::array t = call.input(target_obj, "target", 2, "(batch, out_features)");
  if (t.shape(0) != x.shape(0) || t.shape(1) != net.out(n - 1))
    throw py::value_error("target has shape " + shape_of(t) + " but must be (batch, out_features) = (" +
                          std::to_string(x.shape(0)) + ", " + std::to_string(net.out(n - 1)) + ")");
  const Reduction reduction = parse_reduction(reduction_obj, /*allow_none=*/false);
  std::optional<py::array> dx;
  if (input_grad) dx = call.output(py::none(), "grad_input", {x.shape(0), x.shape(1)});
  const NetworkGrads grads(call, net);
  const double loss = with_dtype(call.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const std::vector<lingrad::MlpLayer<T>> layers = net.layers<T>();
    auto [dw, db] = grads.pointers<T>();
    T* dx_data = dx ? mutable_data<T>(*dx) : nullptr;
    py::gil_scoped_release release;
    return lingrad::mlp_mse<T>(matrix<T>(x), layers.data(), static_cast<int>(n), matrix<T>(t), reduction, dx_data,
                               dw.data(), db.data());
  });
  return py::make_tuple(loss, or_none(dx), grads.weights, grads.biases);
}

// ---------------------------------------------------------------------------------------------
// Configuration

std::vector<std::string> available_isas() {
  const char* names[8];
  const int n = lingrad::available_isas(names, 8);
  return std::vector<std::string>(names, names + n);
}

void set_isa(const std::string& name) {
  if (!lingrad::set_isa(name.c_str())) {
    std::string options;
    for (const auto& isa : available_isas()) options += (options.empty() ? "'" : ", '") + isa + "'";
    throw py::value_error("isa '" + name + "' is not available on this CPU and build; choose one of " + options);
  }
}

void set_num_threads(py::handle n_obj) {
  // Any integer (int, numpy.int64, anything with __index__), but not a bool.
  if (py::isinstance<py::bool_>(n_obj) || !PyIndex_Check(n_obj.ptr()))
    throw py::type_error("n must be an int, got " + type_name(n_obj));
  const long long n = py::reinterpret_steal<py::int_>(PyNumber_Index(n_obj.ptr())).cast<long long>();
  if (n < 1 || n > 4096) throw py::value_error("n must be between 1 and 4096, got " + std::to_string(n));
  lingrad::set_num_threads(static_cast<int>(n));
}

py::dict build_info() {
  py::dict info;
  info["version"] = LINGRAD_VERSION;
  info["compiler"] = LINGRAD_COMPILER;
  info["build_type"] = LINGRAD_BUILD_TYPE;
  info["cxx_flags"] = LINGRAD_CXX_FLAGS;
  info["openmp"] = lingrad::has_openmp();
#if defined(_OPENMP)
  info["openmp_version"] = _OPENMP;
#else
  info["openmp_version"] = py::none();
#endif
  info["isa"] = lingrad::get_isa();
  info["available_isas"] = available_isas();
  // The GEMM engine's block sizes for the active ISA, per dtype, and the choices shared by all.
  for (const bool double_ : {false, true}) {
    const lingrad::GemmBlocking b = lingrad::get_blocking(double_);
    info[double_ ? "tile_float64" : "tile_float32"] = py::make_tuple(b.mr, b.nr);
    info[double_ ? "blocking_float64" : "blocking_float32"] =
        py::dict(py::arg("mr") = b.mr, py::arg("nr") = b.nr, py::arg("mc") = b.mc, py::arg("kc") = b.kc,
                 py::arg("nc") = b.nc, py::arg("vl") = b.vl);
  }
  info["gemm_serial_work"] = lingrad::gemm_serial_work();
  info["gemm_slab_bytes"] = lingrad::gemm_slab_bytes();
  info["gemm_small_m"] = lingrad::gemm_small_m();
  info["gemm_small_min_k"] = lingrad::gemm_small_min_k();
  info["bf16_kernel"] = lingrad::bf16_kernel();
  info["bf16_numpy"] = bf16_offered();  // ml_dtypes installed: bfloat16 arrays are accepted
  info["num_threads"] = lingrad::get_num_threads();
  return info;
}

// The plan the engine makes for one product (a test-only view of gemm_plan in lingrad.hpp).
py::dict gemm_plan(index_t m, index_t n, index_t k, index_t a_rs, index_t a_cs, index_t b_rs, index_t b_cs,
                   const std::string& dtype, bool row_sums, bool loss, std::optional<int> threads) {
  if (dtype != "float32" && dtype != "float64")
    throw py::value_error("dtype must be 'float32' or 'float64', got '" + dtype + "'");
  if (m < 0 || n < 0 || k < 0) throw py::value_error("m, n and k must be >= 0");
  const lingrad::GemmPlan p = lingrad::gemm_plan(dtype == "float64", m, n, k, a_rs, a_cs, b_rs, b_cs, row_sums, loss,
                                                 threads ? *threads : lingrad::get_num_threads());
  const char* paths[] = {"empty", "narrow", "small_m", "packed"};
  py::dict d;
  d["path"] = paths[static_cast<int>(p.path)];
  d["threads"] = p.threads;
  d["items"] = p.items;
  d["scratch_bytes"] = p.scratch_bytes;
  if (p.path == lingrad::GemmPath::narrow || p.path == lingrad::GemmPath::small_m) {
    d["copy_a"] = p.copy_a;
    d["copy_b"] = p.copy_b;
  }
  if (p.path == lingrad::GemmPath::small_m) {
    d["form"] = p.dot ? "dot" : "axpy";
    d["lanes"] = p.lanes;
    d["chain"] = p.chain;
    d["strip"] = p.strip;
  }
  if (p.path == lingrad::GemmPath::packed) {
    d["tile"] = py::make_tuple(p.mr, p.nr);
    d["pack_a"] = p.pack_a;
    d["pack_b"] = p.pack_b;
    d["split_rows"] = p.split_rows;
    d["prefetch_c"] = p.prefetch_c;
    d["kc"] = p.kc;
    d["k_slices"] = p.k_slices;
    d["mc"] = p.mc;
    d["row_blocks"] = p.row_blocks;
    d["nc"] = p.nc;
    d["column_blocks"] = p.column_blocks;
    d["panels_per_item"] = p.panels_per_item;
    d["slices_per_slab"] = p.slices_per_slab;
    d["slabs"] = p.slabs;
    d["last_tile"] = p.last_tile;
  }
  return d;
}

// An argument of a binding. pybind11 interns each argument's name to look it up in a call's
// keyword arguments; a name that nothing else keeps alive would be interned and released again on
// every such call (and the churn makes CPython rebuild its interned-string table now and then,
// which the memory tests see). So the name is interned here once, for good (a deliberate reference).
py::arg keyword(const char* name) {
  PyUnicode_InternFromString(name);
  return py::arg(name);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lingrad's compiled kernels; use them through lingrad.kernels.";

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

  m.def("get_num_threads", &lingrad::get_num_threads, "Number of threads the kernels use.");
  m.def("set_num_threads", &set_num_threads, keyword("n"),
        "Set the number of threads the kernels use (n >= 1). Results do not depend on it.");
  m.def("get_isa", &lingrad::get_isa,
        "The micro-kernel instruction set in use ('amx_bf16', 'avx512_bf16', 'avx512', 'avx2' or 'generic').");
  m.def("set_isa", &set_isa, keyword("name"),
        "Choose the micro-kernel instruction set; ValueError if this CPU or build lacks it.");
  m.def("available_isas", &available_isas, "Instruction sets this CPU and build can run, best first.");
  m.def(
      "measure_fma_peak",
      [](int threads, double seconds) {
        py::gil_scoped_release release;
        return lingrad::measure_fma_peak(threads, seconds);
      },
      keyword("threads"), keyword("seconds") = 0.3,
      "The float32 FMA peak in GFLOP/s with `threads` threads, measured with the active SIMD code path.");
  m.def(
      "measure_bf16_peak",
      [](int threads, double seconds) {
        py::gil_scoped_release release;
        return lingrad::measure_bf16_peak(threads, seconds);
      },
      keyword("threads"), keyword("seconds") = 0.3,
      "The bfloat16 peak in GFLOP/s of the active ISA's bfloat16 instructions (AMX tiles or vdpbf16ps), or "
      "0.0 where it has none.");
  m.def("build_info", &build_info, "A dict describing the build and the run-time choices.");
  m.def("_gemm_plan", &gemm_plan, keyword("m"), keyword("n"), keyword("k"), keyword("a_rs"), keyword("a_cs"),
        keyword("b_rs"), keyword("b_cs"), keyword("dtype") = "float32", py::kw_only(), keyword("row_sums") = false,
        keyword("loss") = false, keyword("threads") = py::none(),
        R"doc(_gemm_plan(m, n, k, a_rs, a_cs, b_rs, b_cs, dtype="float32", *, row_sums=False, loss=False, threads=None)
    -> dict

For tests: the plan the GEMM engine (active ISA) makes for C (m x n) = A (m x k) B (k x n) with
A[i, p] at a[i*a_rs + p*a_cs] and B[p, j] at b[p*b_rs + j*b_cs] (strides in elements; 0 for a
dimension of length 1, as the kernels see them): its path ('empty', 'narrow', 'small_m',
'packed') and each decision of that path. row_sums: the row sums of A are wanted (dW's bias
gradient); loss: the epilogue sums squares; threads: the team asked for (default: get_num_threads()).)doc");
}
