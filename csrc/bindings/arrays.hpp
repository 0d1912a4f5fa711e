// lingrad._C's arguments: the one place that validates them and hands arrays to the kernels.
//
// Every check of type, dtype, rank, shape, layout and aliasing is here (arrays.cpp), with messages
// that name the argument and the shapes; the bind_*.cpp files use it for their functions. Inputs
// are used in place through their strides (never copied, never cast); outputs are new arrays or
// caller's `out` arrays that must be exactly right. The GIL is released while a kernel runs.
//
//   module.cpp        PYBIND11_MODULE: calls the four init_* below
//   arrays.hpp/.cpp   Array (an argument read in place), Call (inputs and outputs of one call), DLPack,
//                     dtypes, views, messages, keyword
//   bind_linear.cpp   linear_forward ... linear_mse, mse_loss, mse_backward
//   bind_mlp.cpp      mlp_forward, mlp_backward, mlp_mse, MlpTrainStep
//   bind_privacy.cpp  linear_per_sample_grad_norms, linear_per_sample_grads
//   bind_config.cpp   threads, ISAs, build_info, _gemm_plan
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lingrad.hpp"

namespace lingrad::bindings {

namespace py = pybind11;

// Each group of functions, defined in its bind_*.cpp.
void init_linear(py::module_& m);
void init_mlp(py::module_& m);
void init_privacy(py::module_& m);
void init_config(py::module_& m);

// ---------------------------------------------------------------------------------------------
// Arrays

enum class DType { float32, float64, bfloat16 };

// An argument array, read in place: a numpy.ndarray, a tensor viewed through DLPack's C exchange
// API, or the tensor of a consumed DLPack capsule. It holds what the checks and the kernels read
// (data, dtype, shape, strides in bytes) and keeps its memory alive through `object()`: the
// ndarray, the tensor, or the capsule's owner. No NumPy object is made for a tensor (0.2 us each).
class Array {
 public:
  static constexpr int kMaxDims = 8;

  Array() = default;
  // dtype: empty for a NumPy dtype lingrad does not compute in (an `out` of the wrong dtype is named
  // in its message; an input is refused by Call::input).
  Array(py::object object, void* data, std::optional<DType> dtype, py::ssize_t itemsize, int ndim,
        const py::ssize_t* shape, const py::ssize_t* byte_strides, bool writeable);

  int ndim() const { return ndim_; }
  py::ssize_t shape(int d) const { return shape_[d]; }
  const py::ssize_t* shape() const { return shape_; }
  py::ssize_t strides(int d) const { return strides_[d]; }  // bytes
  py::ssize_t itemsize() const { return itemsize_; }
  py::ssize_t size() const;
  const void* data() const { return data_; }
  void* mutable_data() { return data_; }
  std::optional<DType> dtype() const { return dtype_; }
  bool writeable() const { return writeable_; }
  bool c_contiguous() const;
  // What the array is (its memory's owner): the result a binding returns for an output.
  const py::object& object() const { return object_; }

 private:
  py::object object_;
  char* data_ = nullptr;
  std::optional<DType> dtype_;
  py::ssize_t itemsize_ = 0;
  int ndim_ = 0;
  py::ssize_t shape_[kMaxDims] = {}, strides_[kMaxDims] = {};
  bool writeable_ = false;
};

// An output's result as a binding returns it: the array `out` was, or the new ndarray (typed as
// numpy.ndarray for the signatures; with lingrad's PyTorch layer, `out` is the tensor it passed).
inline py::array result(const Array& a) { return py::reinterpret_borrow<py::array>(a.object()); }
inline py::object or_none(const std::optional<Array>& a) {
  return a ? py::object(a->object()) : py::object(py::none());
}

// ---------------------------------------------------------------------------------------------
// Descriptions for messages

// "(2, 3)", "(3,)", "()": an array's shape, or the one an output must have, as NumPy prints it.
std::string shape_of(const Array& a);
std::string shape_of(const std::vector<py::ssize_t>& shape);
std::string type_name(py::handle obj);
std::string byte_count(double bytes);
[[noreturn]] void throw_memory_error(const std::string& message);

// ---------------------------------------------------------------------------------------------
// Inputs

// NumPy's bfloat16 is ml_dtypes.bfloat16 (an optional dependency): its dtype, or None without it.
py::object bf16_dtype();
// Whether ml_dtypes is there, without importing it (its import takes about half a second, which
// `import lingrad` and build_info() should not cost a user who never asks for bfloat16).
bool bf16_offered();

// The array `obj` is (a numpy.ndarray, a tensor whose type publishes DLPack's C exchange API, or a
// DLPack capsule from lingrad's PyTorch layer on older torch), or a TypeError naming it. A tensor
// with PyTorch's negative bit is read through its resolve_neg() copy (DLPack carries no such bit);
// an output (`writable`) cannot be one. With `integers`: an int64 array or tensor, and nothing else
// (class indices; its Array has no float dtype).
Array as_array(py::handle obj, const char* name, bool writable = false, bool integers = false);
// Class indices (a cross-entropy's target): `obj` an int64 array or tensor of shape (batch,), each
// index in [0, classes), else a TypeError or ValueError naming it (and the first bad index). The
// indices are copied into `out` (any strides); returns the array.
Array class_indices(py::handle obj, const char* name, py::ssize_t batch, py::ssize_t classes,
                    std::vector<std::int64_t>& out);
// Whether two arrays may touch the same bytes.
bool overlap(const Array& a, const Array& b);
// a's dtype, or a TypeError naming it and saying what lingrad computes in.
DType dtype_of(const Array& a, const char* name);
const char* dtype_name(DType d);

// The arguments of one call: the dtype set by the first array, every input remembered so that
// outputs can be checked for overlap.
//
// A call of a function with bfloat16 products (the Linear layer's) may mix float32 and bfloat16
// inputs: its dtype is then bfloat16, and a new result is bfloat16 if every input is, else float32.
class Call {
 public:
  explicit Call(bool bf16_products = false) : bf16_ok_(bf16_products) {
    inputs_.reserve(4);  // (a Linear call's arrays without reallocation)
    outputs_.reserve(4);
  }

  // An input array of rank `ndim` (or 1 when allow_1d), of the call's dtype.
  // other_ndim: a second rank that is also accepted (3 for per-sample arrays with a sequence dimension).
  Array input(py::handle obj, const char* name, int ndim, const char* meaning, bool allow_1d = false,
              int other_ndim = -1);

  // A new output, or the caller's `out` checked to be exactly what a new one would be. In a
  // bfloat16 call, `out` may be float32 or bfloat16 (unless `dtype` fixes it), and a new one is
  // `dtype` if given, else the call's result dtype.
  Array output(py::handle obj, const char* name, const std::vector<py::ssize_t>& shape,
               std::optional<DType> dtype = std::nullopt);

  DType dtype() const { return dtype_; }
  // The dtype of a call whose first array is an `out` (nothing read yet): the arrays a step updates.
  void expect(DType d) { dtype_ = d; }
  // A new result's dtype: the call's, except a bfloat16 call with a float32 input makes float32.
  DType result_dtype() const { return dtype_ == DType::bfloat16 && !all_bf16_ ? DType::float32 : dtype_; }

 private:
  // A new output array. One that cannot exist is an error naming it: ValueError if it is larger
  // than the address space, MemoryError if it cannot be allocated.
  Array allocate(const char* name, const std::vector<py::ssize_t>& shape, DType dtype) const;

  bool bf16_ok_ = false, all_bf16_ = true;
  DType dtype_ = DType::float32;
  std::vector<std::pair<const char*, Array>> inputs_;
  std::vector<std::pair<const char*, Array>> outputs_;
};

// ---------------------------------------------------------------------------------------------
// Views of validated arrays (strides in elements; 0 for a dimension of length 1, whose stride
// NumPy leaves unspecified). A 1-D array is one row.

template <typename T>
index_t stride(const Array& a, int d) {
  return a.shape(d) > 1 ? static_cast<index_t>(a.strides(d)) / static_cast<index_t>(sizeof(T)) : 0;
}

template <typename T>
MatrixView<T> matrix(const Array& a) {
  const T* data = static_cast<const T*>(a.data());
  if (a.ndim() == 1) return {data, 1, a.shape(0), 0, stride<T>(a, 0)};
  return {data, a.shape(0), a.shape(1), stride<T>(a, 0), stride<T>(a, 1)};
}

template <typename T>
VectorView<T> vector(const Array& a) {
  return {static_cast<const T*>(a.data()), a.shape(0), stride<T>(a, 0)};
}

template <typename T>
T* mutable_data(Array& a) {
  return static_cast<T*>(a.mutable_data());
}

// Runs f with a value of the call's element type (float or double).
template <typename F>
decltype(auto) with_dtype(DType d, F&& f) {
  if (d == DType::float32) return f(float{});
  return f(double{});
}

// bfloat16 products' operands and results: float32 or bfloat16 arrays, by their dtype.
inline bool is_f32(const Array& a) { return a.dtype() == DType::float32; }
Bf16Matrix bf16_matrix(const Array& a);
Bf16Output bf16_output(Array& a);
// A float32 vector's view, or a bfloat16 one widened into `buffer` (a bias: out_features values).
VectorView<float> float_vector(const std::optional<Array>& v, std::vector<float>& buffer);
// A float32 result computed into `buffer` and rounded into the bfloat16 array `out` (a bias gradient).
void round_into(const std::vector<float>& buffer, Array& out);

// ---------------------------------------------------------------------------------------------
// Checks and parsers shared by the functions

// a's extent in dimension a_dim is b's in b_dim, else a ValueError with both shapes and `what`.
void require_same_extent(const Array& a, const char* a_name, int a_dim, const Array& b, const char* b_name, int b_dim,
                         const char* what);
void require_same_shape(const Array& a, const char* a_name, const Array& b, const char* b_name);
std::optional<Array> optional_bias(Call& call, py::handle bias, const char* name, const Array& weight);

// A switch: True or False (Python or NumPy bools; None is False). Anything else, an array given
// for linear_backward_weight's bias= for instance, is a TypeError rather than its truth value.
bool parse_flag(py::handle obj, const char* name);
Reduction parse_reduction(py::handle obj, bool allow_none);

// An argument of a binding. pybind11 interns each argument's name to look it up in a call's
// keyword arguments; a name that nothing else keeps alive would be interned and released again on
// every such call (and the churn makes CPython rebuild its interned-string table now and then,
// which the memory tests see). So the name is interned here once, for good (a deliberate reference).
py::arg keyword(const char* name);

}  // namespace lingrad::bindings
