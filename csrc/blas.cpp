// Resolves sgemm/dgemm from SciPy's Cython BLAS capsules (see blas.h for why).
#include "blas.h"

#include <dlfcn.h>
#include <pybind11/pybind11.h>

#include <mutex>
#include <string>

namespace ssf {

namespace py = pybind11;

namespace {
Blas g_blas;
using set_threads_fn = void (*)(int);
using get_threads_fn = int (*)();
set_threads_fn g_set_threads = nullptr;
get_threads_fn g_get_threads = nullptr;
std::mutex g_guard_mu;
int g_guard_depth = 0;
int g_guard_saved = 0;

// Finds OpenBLAS's thread controls in the library that holds sgemm (scipy loads it privately, so
// RTLD_DEFAULT cannot see it). Leaves them null for other BLAS builds.
void find_thread_controls(void* sgemm_addr) {
    Dl_info info;
    if (!dladdr(sgemm_addr, &info) || !info.dli_fname) return;
    void* h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!h) return;
    for (const char* name : {"scipy_openblas_set_num_threads", "openblas_set_num_threads"})
        if (void* p = dlsym(h, name)) {
            g_set_threads = reinterpret_cast<set_threads_fn>(p);
            break;
        }
    for (const char* name : {"scipy_openblas_get_num_threads", "openblas_get_num_threads"})
        if (void* p = dlsym(h, name)) {
            g_get_threads = reinterpret_cast<get_threads_fn>(p);
            break;
        }
    if (!g_set_threads || !g_get_threads) g_set_threads = nullptr, g_get_threads = nullptr;
    // The handle stays open on purpose: the library must outlive the pointers taken from it.
}

void* capsule_pointer(const py::dict& capi, const char* name) {
    if (!capi.contains(name))
        throw py::import_error(std::string("scipy.linalg.cython_blas exports no ") + name);
    py::object cap = capi[name];
    PyObject* obj = cap.ptr();
    if (!PyCapsule_CheckExact(obj))
        throw py::import_error(std::string("scipy.linalg.cython_blas.") + name + " is not a capsule");
    // Cython names each capsule with the C signature; ask for whatever name it carries.
    void* p = PyCapsule_GetPointer(obj, PyCapsule_GetName(obj));
    if (!p) throw py::error_already_set();
    return p;
}
}  // namespace

void load_blas() {
    py::dict capi;
    try {
        capi = py::module_::import("scipy.linalg.cython_blas").attr("__pyx_capi__");
    } catch (py::error_already_set& e) {
        throw py::import_error(std::string("scalselect_fast._native needs scipy's BLAS "
                                           "(scipy.linalg.cython_blas): ") + e.what());
    }
    g_blas.sgemm = reinterpret_cast<sgemm_fn>(capsule_pointer(capi, "sgemm"));
    g_blas.dgemm = reinterpret_cast<dgemm_fn>(capsule_pointer(capi, "dgemm"));
    find_thread_controls(reinterpret_cast<void*>(g_blas.sgemm));
}

bool blas_threads_controllable() { return g_set_threads != nullptr; }
int blas_num_threads() { return g_get_threads ? g_get_threads() : 0; }

SingleThreadedBlas::SingleThreadedBlas() {
    if (!g_set_threads) return;
    std::lock_guard<std::mutex> lock(g_guard_mu);
    if (g_guard_depth++ == 0) {
        g_guard_saved = g_get_threads();
        if (g_guard_saved != 1) g_set_threads(1);
    }
}

SingleThreadedBlas::~SingleThreadedBlas() {
    if (!g_set_threads) return;
    std::lock_guard<std::mutex> lock(g_guard_mu);
    if (--g_guard_depth == 0 && g_guard_saved != 1) g_set_threads(g_guard_saved);
}

const Blas& blas() { return g_blas; }

void gemm(int m, int n, int kk, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
    char t = 'N';
    float one = 1.0f, zero = 0.0f;
    g_blas.sgemm(&t, &t, &m, &n, &kk, &one, const_cast<float*>(a), &lda, const_cast<float*>(b), &ldb,
                 &zero, c, &ldc);
}

void gemm(int m, int n, int kk, const double* a, int lda, const double* b, int ldb, double* c, int ldc) {
    char t = 'N';
    double one = 1.0, zero = 0.0;
    g_blas.dgemm(&t, &t, &m, &n, &kk, &one, const_cast<double*>(a), &lda, const_cast<double*>(b), &ldb,
                 &zero, c, &ldc);
}

}  // namespace ssf
