// Configuration: threads, the instruction set, the build's description, peak measurements, and
// _gemm_plan (the test-only view of the GEMM engine's plan for one product).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "gemm/plan.hpp"  // (build_info and _gemm_plan: the engine's choices)

namespace lingrad::bindings {
namespace {

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
  py::dict d;
  d["path"] = lingrad::kGemmPathNames[static_cast<int>(p.path)];
  d["threads"] = p.threads;
  d["items"] = p.items;
  d["scratch_bytes"] = p.scratch_bytes;
  if (p.path == lingrad::GemmPath::narrow || p.path == lingrad::GemmPath::small_m ||
      p.path == lingrad::GemmPath::unpacked) {
    d["copy_a"] = p.copy_a;
    d["copy_b"] = p.copy_b;
  }
  if (p.path == lingrad::GemmPath::unpacked) {
    d["tile"] = py::make_tuple(p.mr, p.nr);
    d["strip"] = p.strip;
    d["pack_b"] = p.pack_b;  // B copied whole, once
  }
  if (p.path == lingrad::GemmPath::narrow) d["form"] = p.columns ? "columns" : "dot";
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

}  // namespace

void init_config(py::module_& m) {
  m.def("get_num_threads", &lingrad::get_num_threads, "Number of threads the kernels use.");
  m.def("set_num_threads", &set_num_threads, keyword("n"),
        "Set the number of threads the kernels use (n >= 1). Results do not depend on it.");
  m.def("get_isa", &lingrad::get_isa,
        "The micro-kernel instruction set in use ('amx_bf16', 'avx512_bf16', 'avx512', 'avx2' or 'generic').");
  m.def("set_isa", &set_isa, keyword("name"),
        "Choose the micro-kernel instruction set; ValueError if this CPU or build lacks it.");
  m.def("available_isas", &available_isas, "Instruction sets this CPU and build can run, best first.");
  // The rate probes (GFLOP/s with `threads` threads, about `seconds` of measuring), the GIL released.
  struct RateProbe {
    const char* name;
    double (*measure)(int threads, double seconds);
    const char* doc;
  };
  for (const RateProbe& probe : {
           RateProbe{
               "measure_fma_peak", &lingrad::measure_fma_peak,
               "The float32 FMA peak in GFLOP/s with `threads` threads, measured with the active SIMD code path."},
           RateProbe{"measure_tile_rate", &lingrad::measure_tile_rate,
                     "The float32 micro-kernel's rate in GFLOP/s with `threads` threads, on packed panels in L1: the "
                     "share of the FMA peak the register tile reaches before packing and cache misses."},
           RateProbe{"measure_bf16_peak", &lingrad::measure_bf16_peak,
                     "The bfloat16 peak in GFLOP/s of the active ISA's bfloat16 instructions (AMX tiles or "
                     "vdpbf16ps), or 0.0 where it has none."},
       })
    m.def(probe.name, probe.measure, keyword("threads"), keyword("seconds") = 0.3,
          py::call_guard<py::gil_scoped_release>(), probe.doc);
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

}  // namespace lingrad::bindings
