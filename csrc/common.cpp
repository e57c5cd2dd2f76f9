// Argument checks and thread-count policy shared by all kernels.
#include "common.h"

#include <sched.h>

#include <atomic>
#include <cstdlib>
#include <thread>

namespace ssf {

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

Elem block_elem(const py::array& a, bool bf16, const char* fn, const char* arg) {
    const char kind = a.dtype().kind();
    const auto size = a.dtype().itemsize();
    if (bf16) {
        if (kind == 'u' && size == 2) return Elem::BF16;
        throw py::type_error(std::string(fn) + ": " + arg + " has dtype " + dtype_name(a) +
                             " but bf16=True expects uint16 bfloat16 bit patterns; pass the raw "
                             "bf16 storage viewed as uint16, or bf16=False for float data");
    }
    if (kind == 'f' && size == 2) return Elem::F16;
    if (kind == 'f' && size == 4) return Elem::F32;
    if (kind == 'f' && size == 8) return Elem::F64;
    if (kind == 'u' && size == 2)
        throw py::type_error(std::string(fn) + ": " + arg +
                             " is uint16; if it holds bfloat16 bit patterns pass bf16=True, "
                             "otherwise convert it to float32");
    throw py::type_error(std::string(fn) + ": " + arg + " has dtype " + dtype_name(a) +
                         "; expected float16, float32, float64 or uint16 bfloat16 bits (bf16=True)");
}

void require_f64(const py::array& a, const char* fn, const char* arg) {
    if (!(a.dtype().kind() == 'f' && a.dtype().itemsize() == 8))
        throw py::type_error(std::string(fn) + ": " + arg + " has dtype " + dtype_name(a) +
                             "; expected float64 (use np.asarray(" + arg + ", dtype=np.float64))");
}

void require_f32(const py::array& a, const char* fn, const char* arg) {
    if (!(a.dtype().kind() == 'f' && a.dtype().itemsize() == 4))
        throw py::type_error(std::string(fn) + ": " + arg + " has dtype " + dtype_name(a) +
                             "; expected float32 (allocate it with np.empty(shape, np.float32))");
}

void require_c_contiguous(const py::array& a, const char* fn, const char* arg) {
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(fn) + ": " + arg +
                              " must be C-contiguous (row-major); pass np.ascontiguousarray(" + arg +
                              ") or read the block with contiguous rows");
}

void require_writeable(const py::array& a, const char* fn, const char* arg) {
    if (!a.writeable())
        throw py::value_error(std::string(fn) + ": " + arg + " is read-only; pass a writeable array");
}

void require_ndim(const py::array& a, py::ssize_t ndim, const char* fn, const char* arg) {
    if (a.ndim() != ndim)
        throw py::value_error(std::string(fn) + ": " + arg + " must be " + std::to_string(ndim) +
                              "-D, got shape with " + std::to_string(a.ndim()) + " dimension(s)");
}

namespace {
int default_threads() {
    if (const char* env = std::getenv("SCALSELECT_NUM_THREADS")) {
        int n = std::atoi(env);
        if (n > 0) return n;
    }
    // The CPUs this process may run on (cgroup/taskset aware), not the host's core count.
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    unsigned hw = std::thread::hardware_concurrency();
    return hw ? static_cast<int>(hw) : 1;
}
std::atomic<int> g_threads{0};
}  // namespace

int num_threads() {
    int n = g_threads.load(std::memory_order_relaxed);
    if (n <= 0) {
        n = default_threads();
        g_threads.store(n, std::memory_order_relaxed);
    }
    return n;
}

void set_num_threads(int n) {
    if (n < 0) throw py::value_error("set_num_threads: n must be >= 0 (0 = default)");
    g_threads.store(n == 0 ? default_threads() : n, std::memory_order_relaxed);
}

}  // namespace ssf
