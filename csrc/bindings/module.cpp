// lingrad._C: the Python face of the kernel library, one group of functions per file (as
// pybind11's FAQ splits binding code); arrays.hpp validates every argument and describes the files.
#include <pybind11/pybind11.h>

#include "arrays.hpp"

PYBIND11_MODULE(_C, m) {
  m.doc() = "lingrad's compiled kernels; use them through lingrad.kernels.";
  lingrad::bindings::init_linear(m);
  lingrad::bindings::init_mlp(m);
  lingrad::bindings::init_privacy(m);
  lingrad::bindings::init_config(m);
}
