// lens_fast._C: the pybind11 module. Functions take raw data pointers (ints) plus shapes and strides,
// validated by the Python layer (lens_fast.ops, lens_fast.rle), so the module never links libtorch and
// works with any torch version. Components register themselves (bindings.h).
#include <atomic>
#include <vector>

#include "bindings.h"
#include "cpu_features.h"
#include "parallel.h"

namespace lens_fast {

namespace {
std::atomic<int> g_num_threads{1};

std::vector<Registrar>& registrars() {
  static std::vector<Registrar> all;
  return all;
}
}  // namespace

int add_registrar(Registrar registrar) {
  registrars().push_back(registrar);
  return static_cast<int>(registrars().size());
}

int default_num_threads() { return g_num_threads.load(); }
void set_default_num_threads(int n) { g_num_threads.store(n < 1 ? 1 : n); }

}  // namespace lens_fast

PYBIND11_MODULE(_C, m) {
  m.doc() = "lens_fast native ops (C++ on the CPU, CUDA when built with it).";
  m.def("cpu_has_avx2", &lens_fast::cpu_has_avx2, "True when the AVX2 paths are in use on this CPU.");
  m.def("get_num_threads", &lens_fast::default_num_threads, "Default number of threads of the C++ ops.");
  m.def("set_num_threads", &lens_fast::set_default_num_threads, pybind11::arg("n"),
        "Set the default number of threads of the C++ ops (>= 1).");
#ifdef LENS_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  for (auto registrar : lens_fast::registrars()) registrar(m);
}
