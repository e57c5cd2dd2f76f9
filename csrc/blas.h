// BLAS GEMM entry points borrowed from SciPy at import time, so the extension has no link-time BLAS
// dependency and uses the same (multithreaded, CPU-dispatched) OpenBLAS numpy/scipy already load.
#pragma once

namespace ssf {

// Fortran BLAS signatures as exported by scipy.linalg.cython_blas (LP64: 32-bit int).
using sgemm_fn = void (*)(char*, char*, int*, int*, int*, float*, float*, int*, float*, int*, float*,
                          float*, int*);
using dgemm_fn = void (*)(char*, char*, int*, int*, int*, double*, double*, int*, double*, int*,
                          double*, double*, int*);

struct Blas {
    sgemm_fn sgemm = nullptr;
    dgemm_fn dgemm = nullptr;
};

// Reads the capsules from scipy.linalg.cython_blas.__pyx_capi__; raises ImportError on failure.
// Must be called with the GIL held (module init).
void load_blas();
const Blas& blas();

// Column-major C(m x n) = A(m x kk) * B(kk x n), both untransposed, beta = 0.
void gemm(int m, int n, int kk, const float* a, int lda, const float* b, int ldb, float* c, int ldc);
void gemm(int m, int n, int kk, const double* a, int lda, const double* b, int ldb, double* c, int ldc);

// Whether the borrowed BLAS exposes OpenBLAS's thread-count controls (scipy's bundled OpenBLAS does).
bool blas_threads_controllable();
// Current BLAS thread count, or 0 when it cannot be queried.
int blas_num_threads();

// While alive, the borrowed BLAS runs single-threaded, so several of our workers can each call GEMM
// on their own tiles without the BLAS thread pool synchronising on every call (on a loaded machine a
// descheduled BLAS thread stalls each tile's GEMM for a time slice). Reference-counted across
// threads: the first guard saves the count, the last one restores it. Other users of scipy's BLAS
// in the process run single-threaded while a guard is alive. No-op when not controllable.
class SingleThreadedBlas {
  public:
    SingleThreadedBlas();
    ~SingleThreadedBlas();
    SingleThreadedBlas(const SingleThreadedBlas&) = delete;
    SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
};

}  // namespace ssf
