// Registration of lens_fast._C's functions. Each component .cpp defines
//   static void register_foo(py::module_& m) { m.def(...); }
//   LENS_FAST_REGISTER(register_foo)
// and module.cpp calls every registered function when Python imports the module, so adding a
// component never means editing a shared file.
#pragma once

#include <pybind11/pybind11.h>

namespace lens_fast {
namespace py = pybind11;

using Registrar = void (*)(py::module_&);
int add_registrar(Registrar registrar);

}  // namespace lens_fast

#define LENS_FAST_REGISTER(fn) \
  static const int fn##_registered_ [[maybe_unused]] = ::lens_fast::add_registrar(&fn);
