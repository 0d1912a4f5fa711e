// lingrad._C's arguments (arrays.hpp): Call, DLPack, dtypes, views, messages and keyword, the one
// place that validates them.
#include "arrays.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>

namespace lingrad::bindings {

// ---------------------------------------------------------------------------------------------
// Descriptions for messages

namespace {
std::string shape_text(const py::ssize_t* shape, std::size_t ndim) {
  std::string s = "(";
  for (std::size_t d = 0; d < ndim; ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
  return s + (ndim == 1 ? ",)" : ")");
}
}  // namespace

std::string shape_of(const Array& a) { return shape_text(a.shape(), static_cast<std::size_t>(a.ndim())); }
std::string shape_of(const std::vector<py::ssize_t>& shape) { return shape_text(shape.data(), shape.size()); }

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
// Array

Array::Array(py::object object, void* data, std::optional<DType> dtype, py::ssize_t itemsize, int ndim,
             const py::ssize_t* shape, const py::ssize_t* byte_strides, bool writeable)
    : object_(std::move(object)),
      data_(static_cast<char*>(data)),
      dtype_(dtype),
      itemsize_(itemsize),
      ndim_(ndim),
      writeable_(writeable) {
  std::copy(shape, shape + ndim, shape_);
  std::copy(byte_strides, byte_strides + ndim, strides_);
}

py::ssize_t Array::size() const {
  py::ssize_t n = 1;
  for (int d = 0; d < ndim_; ++d) n *= shape_[d];
  return n;
}

// NumPy's C-contiguity: the strides of the dimensions longer than 1 are those of a dense row-major array.
bool Array::c_contiguous() const {
  if (size() == 0) return true;
  py::ssize_t expected = itemsize_;
  for (int d = ndim_ - 1; d >= 0; --d) {
    if (shape_[d] != 1 && strides_[d] != expected) return false;
    expected *= shape_[d];
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Inputs

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

namespace {

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

void require_rank(int ndim, const char* name) {
  if (ndim > Array::kMaxDims)
    throw py::value_error(std::string(name) + " has " + std::to_string(ndim) +
                          " dimensions; lingrad's arrays have at most 3");
}

// The array of a DLPack tensor: its memory, shape and strides, kept alive by `object`. With
// `integers`, an int64 tensor (class indices) and nothing else; its Array has no float dtype.
Array array_of(const DLTensor& t, py::object object, const char* name, bool integers = false) {
  if (t.device.device_type != 1)
    throw py::type_error(std::string(name) + " is a DLPack tensor on a device other than the CPU");
  if (integers && (t.dtype.code != 0 || t.dtype.bits != 64 || t.dtype.lanes != 1))
    throw py::type_error(std::string(name) + " must hold int64 class indices (torch.long), got DLPack dtype code " +
                         std::to_string(t.dtype.code) + " with " + std::to_string(t.dtype.bits) + " bits");
  const bool bf16 = t.dtype.code == 4 && t.dtype.bits == 16 && t.dtype.lanes == 1;
  if (bf16 && !bf16_offered())
    throw py::type_error(
        std::string(name) +
        " has dtype bfloat16, which lingrad reads through the ml_dtypes package: " + "pip install ml_dtypes");
  if (!integers && !bf16 && (t.dtype.code != 2 || t.dtype.lanes != 1 || (t.dtype.bits != 32 && t.dtype.bits != 64))) {
    const char* kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
    const std::string kind = t.dtype.code < 7 ? kinds[t.dtype.code] : "code " + std::to_string(t.dtype.code);
    throw py::type_error(std::string(name) + " has dtype " + kind + std::to_string(t.dtype.bits) +
                         "; lingrad computes in float32, float64 or (the Linear layer's products) bfloat16 "
                         "(convert explicitly)");
  }
  require_rank(t.ndim, name);
  const py::ssize_t itemsize = t.dtype.bits / 8;
  py::ssize_t shape[Array::kMaxDims], strides[Array::kMaxDims];
  for (int d = t.ndim - 1; d >= 0; --d) {
    shape[d] = t.shape[d];
    strides[d] = t.strides ? t.strides[d] * itemsize : (d + 1 < t.ndim ? strides[d + 1] * shape[d + 1] : itemsize);
  }
  const std::optional<DType> dtype = integers        ? std::nullopt
                                     : bf16          ? std::optional(DType::bfloat16)
                                     : itemsize == 4 ? std::optional(DType::float32)
                                                     : std::optional(DType::float64);
  return Array(std::move(object), static_cast<char*>(t.data) + t.byte_offset, dtype, itemsize, t.ndim, shape, strides,
               /*writeable=*/true);
}

Array from_ndarray(const py::array& a, const char* name);

// The array of a DLPack capsule, which it consumes: a NumPy view (what a binding returns for an
// `out` capsule) that keeps the producer's tensor alive.
Array from_dlpack(py::handle capsule, const char* name, bool integers) {
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (!managed) throw py::error_already_set();
  PyCapsule_SetName(capsule.ptr(), "used_dltensor");  // consumed: its own destructor leaves the tensor alone
  py::capsule owner(managed, [](void* p) {
    auto* m = static_cast<DLManagedTensor*>(p);
    if (m->deleter) m->deleter(m);
  });
  const Array a = array_of(managed->dl_tensor, owner, name, integers);
  const py::dtype dtype = integers                       ? py::dtype::of<std::int64_t>()
                          : a.dtype() == DType::bfloat16 ? py::reinterpret_borrow<py::dtype>(bf16_dtype())
                          : a.dtype() == DType::float32  ? py::dtype::of<float>()
                                                         : py::dtype::of<double>();
  const std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
  std::vector<py::ssize_t> strides(a.ndim());
  for (int d = 0; d < a.ndim(); ++d) strides[d] = a.strides(d);
  return from_ndarray(py::array(dtype, shape, strides, a.data(), owner), name);
}

Array from_ndarray(const py::array& a, const char* name) {
  require_rank(static_cast<int>(a.ndim()), name);
  const py::dtype dt = a.dtype();
  std::optional<DType> dtype;
  if (dt.equal(py::dtype::of<float>()))
    dtype = DType::float32;
  else if (dt.equal(py::dtype::of<double>()))
    dtype = DType::float64;
  else if (is_bf16(dt))
    dtype = DType::bfloat16;
  return Array(a, const_cast<void*>(a.data()), dtype, a.itemsize(), static_cast<int>(a.ndim()), a.shape(), a.strides(),
               a.writeable());
}

// DLPack's C exchange API (DLPack 1.3's DLPackExchangeAPI, of which only the view function is
// used): a table of C functions that a tensor type publishes as a capsule named
// "dlpack_exchange_api" in its attribute __dlpack_c_exchange_api__ (torch.Tensor from torch 2.10).
// Its dltensor_from_py_object_no_sync fills a non-owning DLTensor view of a tensor, valid while the
// tensor lives: 48 ns (torch 2.13, Zen 4), against 0.2 us for torch.utils.dlpack.to_dlpack's
// capsule and the capsule's own consumption here. lingrad's PyTorch layer then hands the tensors
// themselves to the kernels; the array keeps the tensor alive.
struct DLPackVersion {
  std::uint32_t major, minor;
};
struct DLPackExchangeAPIHeader {
  DLPackVersion version;
  DLPackExchangeAPIHeader* prev_api;
};
struct DLPackExchangeAPI {
  DLPackExchangeAPIHeader header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, DLTensor* out);  // 0, or -1 with an exception set
  void* current_work_stream;
};

// The exchange API of obj's type (major version 1, with the view function), or null. Looked up
// once per type: the types seen are remembered (with a reference, so that their addresses stay theirs).
const DLPackExchangeAPI* exchange_api(py::handle obj) {
  static std::vector<std::pair<PyTypeObject*, const DLPackExchangeAPI*>> known;
  PyTypeObject* type = Py_TYPE(obj.ptr());
  for (const auto& [t, api] : known)
    if (t == type) return api;
  const DLPackExchangeAPI* api = nullptr;
  if (PyObject* capsule = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), "__dlpack_c_exchange_api__")) {
    api = static_cast<const DLPackExchangeAPI*>(PyCapsule_GetPointer(capsule, "dlpack_exchange_api"));
    Py_DECREF(capsule);
  }
  PyErr_Clear();  // (no such attribute, or not that capsule: not an exchange tensor)
  if (api && (api->header.version.major != 1 || !api->dltensor_from_py_object_no_sync)) api = nullptr;
  Py_INCREF(type);
  known.emplace_back(type, api);
  return api;
}

// A tensor's view through its type's exchange API. PyTorch's negative bit (a lazily negated view)
// is not in the DLTensor: such an input is read through its resolve_neg() copy, and an output refused.
Array exchange_view(const DLPackExchangeAPI* api, py::handle obj, const char* name, bool writable, bool integers) {
  static PyObject* const is_neg = PyUnicode_InternFromString("is_neg");
  py::object tensor = py::reinterpret_borrow<py::object>(obj);
  if (PyObject* neg = PyObject_CallMethodNoArgs(obj.ptr(), is_neg)) {
    const bool negative = neg == Py_True;
    Py_DECREF(neg);
    if (negative && writable)
      throw py::value_error(std::string(name) + " is a negative view (PyTorch's is_neg()); pass a tensor of its own");
    if (negative) tensor = tensor.attr("resolve_neg")();
  } else {
    PyErr_Clear();  // (a tensor type without the bit)
  }
  DLTensor t;
  if (api->dltensor_from_py_object_no_sync(tensor.ptr(), &t) != 0) throw py::error_already_set();
  return array_of(t, std::move(tensor), name, integers);
}

}  // namespace

Array as_array(py::handle obj, const char* name, bool writable, bool integers) {
  if (PyCapsule_CheckExact(obj.ptr())) {
    const char* capsule_name = PyCapsule_GetName(obj.ptr());
    if (capsule_name && std::strcmp(capsule_name, "dltensor") == 0) return from_dlpack(obj, name, integers);
  }
  if (!py::isinstance<py::array>(obj)) {
    if (const DLPackExchangeAPI* api = exchange_api(obj)) return exchange_view(api, obj, name, writable, integers);
    throw py::type_error(std::string(name) + " must be a numpy.ndarray, got " + type_name(obj));
  }
  // A subclass is read as the plain array it is, except a masked array: its mask would be
  // silently ignored. (Only subclasses pay for this check; numpy.ma is already imported then.)
  if (!py::type::handle_of(obj).is(py::handle(reinterpret_cast<PyObject*>(py::detail::npy_api::get().PyArray_Type_))) &&
      py::isinstance(obj, py::module_::import("numpy.ma").attr("MaskedArray")))
    throw py::type_error(std::string(name) + " is a numpy.ma.MaskedArray, whose mask lingrad would ignore; pass " +
                         name + ".filled(value) or " + name + ".data");
  const py::array a = py::reinterpret_borrow<py::array>(obj);
  if (integers && !a.dtype().equal(py::dtype::of<std::int64_t>()))
    throw py::type_error(std::string(name) + " must hold int64 class indices, got dtype " +
                         std::string(py::str(a.dtype())));
  return from_ndarray(a, name);
}

Array class_indices(py::handle obj, const char* name, py::ssize_t batch, py::ssize_t classes,
                    std::vector<std::int64_t>& out) {
  const Array a = as_array(obj, name, /*writable=*/false, /*integers=*/true);
  if (a.ndim() != 1 || a.shape(0) != batch)
    throw py::value_error(std::string(name) + " has shape " + shape_of(a) + " but must be (batch,) = (" +
                          std::to_string(batch) + ",): one class index per row of x");
  if (a.size() > 0 && (reinterpret_cast<std::uintptr_t>(a.data()) % 8 || (batch > 1 && a.strides(0) % 8)))
    throw py::value_error(std::string(name) + " is not aligned to its 8-byte elements");
  out.resize(static_cast<std::size_t>(batch));
  const auto* data = static_cast<const char*>(a.data());
  for (py::ssize_t b = 0; b < batch; ++b) {
    std::int64_t c;
    std::memcpy(&c, data + b * a.strides(0), sizeof c);
    if (c < 0 || c >= classes)
      throw py::value_error(std::string(name) + "[" + std::to_string(b) + "] is " + std::to_string(c) +
                            ", not a class index in [0, " + std::to_string(classes) + ")");
    out[static_cast<std::size_t>(b)] = c;
  }
  return a;
}

DType dtype_of(const Array& a, const char* name) {
  if (a.dtype()) return *a.dtype();
  const py::dtype dt = py::reinterpret_borrow<py::array>(a.object()).dtype();  // (only NumPy arrays get here)
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

// ---------------------------------------------------------------------------------------------
// Call

namespace {

// Data and strides are multiples of the element size. The stride of a dimension of length 1
// is never used (NumPy may leave any value there), so it is not checked.
bool is_aligned(const Array& a) {
  const py::ssize_t size = a.itemsize();
  if (reinterpret_cast<std::uintptr_t>(a.data()) % size) return false;
  for (int d = 0; d < a.ndim(); ++d)
    if (a.shape(d) > 1 && a.strides(d) % size) return false;
  return true;
}

void require_aligned(const Array& a, const char* name) {
  if (a.size() > 0 && !is_aligned(a))
    throw py::value_error(std::string(name) + " is not aligned to its " + std::to_string(a.itemsize()) +
                          "-byte elements (data or strides); copy it with numpy.ascontiguousarray");
}

// [first byte, one past the last byte] that the array can touch; empty for no elements.
std::pair<std::uintptr_t, std::uintptr_t> extent(const Array& a) {
  if (a.size() == 0) return {0, 0};
  std::intptr_t lo = reinterpret_cast<std::intptr_t>(a.data()), hi = lo;
  for (int d = 0; d < a.ndim(); ++d) {
    const std::intptr_t span = static_cast<std::intptr_t>(a.shape(d) - 1) * a.strides(d);
    (span < 0 ? lo : hi) += span;
  }
  return {static_cast<std::uintptr_t>(lo), static_cast<std::uintptr_t>(hi + a.itemsize())};
}

}  // namespace

bool overlap(const Array& a, const Array& b) {
  const auto [a_lo, a_hi] = extent(a);
  const auto [b_lo, b_hi] = extent(b);
  return a_lo < a_hi && b_lo < b_hi && a_lo < b_hi && b_lo < a_hi;
}

Array Call::input(py::handle obj, const char* name, int ndim, const char* meaning, bool allow_1d, int other_ndim) {
  Array a = as_array(obj, name);
  const DType d = dtype_of(a, name);
  if (d == DType::bfloat16 && !bf16_ok_)
    throw py::type_error(std::string(name) +
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

Array Call::output(py::handle obj, const char* name, const std::vector<py::ssize_t>& shape,
                   std::optional<DType> dtype) {
  Array a;
  if (obj.is_none()) {
    a = allocate(name, shape, dtype ? *dtype : result_dtype());
  } else {
    a = as_array(obj, name, /*writable=*/true);
    auto expect = [&] { return shape_of(shape); };
    // (its dtype as NumPy or DLPack names it)
    auto dtype_text = [&] {
      return a.dtype() ? dtype_name(*a.dtype()) : std::string(py::str(a.object().attr("dtype")));
    };
    if (dtype_ == DType::bfloat16) {
      const bool f32 = a.dtype() == DType::float32, bf16 = a.dtype() == DType::bfloat16;
      if (dtype ? !(*dtype == DType::float32 ? f32 : bf16) : !(f32 || bf16))
        throw py::value_error(std::string(name) + " has dtype " + dtype_text() + " but must be " +
                              (dtype ? dtype_name(*dtype) : "float32 or bfloat16") + " (a bfloat16 product's result)");
    } else if (a.dtype() != dtype_) {
      throw py::value_error(std::string(name) + " has dtype " + dtype_text() + " but must be " + dtype_name(dtype_) +
                            " like the inputs");
    }
    if (a.ndim() != static_cast<int>(shape.size()) || !std::equal(shape.begin(), shape.end(), a.shape()))
      throw py::value_error(std::string(name) + " has shape " + shape_of(a) + " but must be " + expect());
    if (!a.c_contiguous() || (a.size() > 0 && !is_aligned(a)))
      throw py::value_error(std::string(name) + " must be C-contiguous and aligned (shape " + expect() + ")");
    if (!a.writeable()) throw py::value_error(std::string(name) + " is read-only");
    for (const auto* arrays : {&inputs_, &outputs_})  // the inputs first, then the outputs before this one
      for (const auto& [other_name, other] : *arrays)
        if (overlap(a, other))
          throw py::value_error(std::string(name) + " overlaps " + other_name + " in memory; pass a separate array");
  }
  outputs_.emplace_back(name, a);
  return a;
}

Array Call::allocate(const char* name, const std::vector<py::ssize_t>& shape, DType dtype) const {
  double bytes = dtype == DType::float32 ? 4.0 : dtype == DType::float64 ? 8.0 : 2.0;  // (double: never overflows)
  for (py::ssize_t n : shape) bytes *= static_cast<double>(n);
  // (the message is built only when needed: it costs more than a small kernel)
  auto what = [&] { return std::string(name) + " of shape " + shape_of(shape) + " (" + byte_count(bytes) + ")"; };
  if (bytes > static_cast<double>(PY_SSIZE_T_MAX))
    throw py::value_error(what() + " would be larger than the address space");
  try {
    if (dtype == DType::bfloat16)
      return from_ndarray(py::array(py::reinterpret_borrow<py::dtype>(bf16_dtype()), shape), name);
    return from_ndarray(
        dtype == DType::float32 ? py::array(py::array_t<float>(shape)) : py::array(py::array_t<double>(shape)), name);
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_MemoryError)) throw;
    throw_memory_error("cannot allocate " + what());
  }
}

// ---------------------------------------------------------------------------------------------
// Views, checks and parsers

Bf16Matrix bf16_matrix(const Array& a) {
  if (is_f32(a)) {
    const MatrixView<float> m = matrix<float>(a);
    return {m.data, nullptr, m.rows, m.cols, m.rs, m.cs};
  }
  const MatrixView<bfloat16> m = matrix<bfloat16>(a);
  return {nullptr, m.data, m.rows, m.cols, m.rs, m.cs};
}

Bf16Output bf16_output(Array& a) {
  if (is_f32(a)) return {mutable_data<float>(a), nullptr};
  return {nullptr, mutable_data<bfloat16>(a)};
}

VectorView<float> float_vector(const std::optional<Array>& v, std::vector<float>& buffer) {
  if (!v) return {};
  if (is_f32(*v)) return vector<float>(*v);
  const VectorView<bfloat16> h = vector<bfloat16>(*v);
  buffer.resize(static_cast<std::size_t>(h.size));
  for (index_t i = 0; i < h.size; ++i) buffer[i] = lingrad::bf16_to_float(h.data[i * h.stride]);
  return {buffer.data(), h.size, 1};
}

void round_into(const std::vector<float>& buffer, Array& out) {
  bfloat16* o = mutable_data<bfloat16>(out);
  for (std::size_t i = 0; i < buffer.size(); ++i) o[i] = lingrad::float_to_bf16(buffer[i]);
}

void require_same_extent(const Array& a, const char* a_name, int a_dim, const Array& b, const char* b_name, int b_dim,
                         const char* what) {
  if (a.shape(a_dim) != b.shape(b_dim))
    throw py::value_error(std::string(a_name) + " has shape " + shape_of(a) + " but " + b_name + " has shape " +
                          shape_of(b) + ": " + what);
}

void require_same_shape(const Array& a, const char* a_name, const Array& b, const char* b_name) {
  if (a.ndim() != b.ndim() || !std::equal(a.shape(), a.shape() + a.ndim(), b.shape()))
    throw py::value_error(std::string(a_name) + " has shape " + shape_of(a) + " but " + b_name + " has shape " +
                          shape_of(b) + "; they must match");
}

std::optional<Array> optional_bias(Call& call, py::handle bias, const char* name, const Array& weight) {
  if (bias.is_none()) return std::nullopt;
  Array b = call.input(bias, name, 1, "(out_features,)");
  if (b.shape(0) != weight.shape(0))
    throw py::value_error(std::string(name) + " has shape " + shape_of(b) + " but weight has shape " +
                          shape_of(weight) + ": " + name + " must be (" + std::to_string(weight.shape(0)) + ",)");
  return b;
}

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

py::arg keyword(const char* name) {
  PyUnicode_InternFromString(name);
  return py::arg(name);
}

}  // namespace lingrad::bindings
