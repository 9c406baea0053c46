// Each component of lens_fast._C registers its functions here; module.cpp calls every register_*.
#pragma once

#include <pybind11/pybind11.h>

namespace lens_fast {
namespace py = pybind11;

void register_runtime(py::module_& m);
}  // namespace lens_fast
