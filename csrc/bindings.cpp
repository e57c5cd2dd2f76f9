// pybind11 module definition for scalselect_fast._native.
//
// Only argument plumbing lives here; each concern (decode, leverage, top-k) gets its own .cpp.
// The Python-facing contract is documented in scalselect_fast/native.py, which is the only module
// that imports this extension.
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

namespace {

// Which instruction-set paths the running CPU allows; the hot loops pick theirs at run time, so the
// wheel itself is built for baseline x86-64 (no -march=native).
py::dict cpu_features() {
    py::dict d;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    d["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
    d["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
    d["f16c"] = static_cast<bool>(__builtin_cpu_supports("f16c"));
#else
    d["avx2"] = false;
    d["fma"] = false;
    d["f16c"] = false;
#endif
    return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Compiled block kernels for scalselect_fast (import via scalselect_fast.native).";
    m.def("cpu_features", &cpu_features,
          "Instruction-set extensions the running CPU supports (avx2, fma, f16c).");
}
