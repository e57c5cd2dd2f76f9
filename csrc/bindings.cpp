// pybind11 module definition for scalselect_fast._native.
//
// Only argument plumbing lives here; each concern has its own .cpp (center, leverage, topk, decode,
// blas, arrow_rows). The Python-facing contracts are documented in scalselect_fast/native.py, the only module
// that imports this extension.
#include <pybind11/pybind11.h>

#include "blas.h"
#include "common.h"
#include "decode.h"
#include "kernels.h"
#include "arrow_rows.h"

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
    d["simd_active"] = ssf::simd_active();
    return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Compiled block kernels for scalselect_fast (import via scalselect_fast.native).";
    ssf::load_blas();

    m.def("center_block", &ssf::center_block, py::arg("block"), py::arg("shift"), py::arg("out"),
          py::arg("bf16") = false, "out = float32(block - shift); see scalselect_fast.native.center_block.");
    m.def("leverage_block", &ssf::leverage_block, py::arg("block"), py::arg("mean"), py::arg("W"),
          py::arg("out"), py::arg("inv_scale") = py::none(), py::arg("l2_normalize") = false,
          py::arg("bf16") = false, py::kw_only(), py::arg("gemm") = "auto", py::arg("tile_rows") = 0,
          py::arg("threads") = 0,
          "out[i] = ||pre(block[i]) @ W||^2; see scalselect_fast.native.leverage_block. Keyword-only "
          "tuning knobs (for benchmarks): gemm='auto'|'float32'|'float64' (auto = float64; float32 only to price the choice), tile_rows (0 = auto), threads "
          "(0 = one worker, BLAS threads the GEMM).");
    m.def("top_k_block", &ssf::top_k_block, py::arg("scores"), py::arg("offset"), py::arg("budget"),
          "Top budget of one block; see scalselect_fast.native.top_k_block.");
    m.def("top_k_merge", &ssf::top_k_merge, py::arg("parts"), py::arg("budget"),
          "Merge top-k lists; see scalselect_fast.native.top_k_merge.");

    m.def("arrow_samples", &ssf::arrow_samples, py::arg("spec"), py::arg("start"), py::arg("stop"),
          "Samples from one Arrow record batch's buffers; see scalselect_fast.native.arrow_samples.");

    m.def("cpu_features", &cpu_features, "Instruction-set extensions the running CPU supports.");
    m.def("set_simd_enabled", &ssf::set_simd_enabled, py::arg("on"),
          "Use (True) or bypass (False) the AVX2/F16C kernels; for tests and benchmarks.");
    m.def("simd_active", &ssf::simd_active, "Whether the AVX2/F16C kernels are in use.");
    m.def("blas_info", [] {
        py::dict d;
        d["threads_controllable"] = ssf::blas_threads_controllable();
        d["num_threads"] = ssf::blas_num_threads();
        return d;
    }, "Whether the borrowed (scipy) BLAS thread count can be pinned, and its current value.");
    m.def("stream_threshold_bytes", &ssf::stream_threshold_bytes,
          "center_block output size (bytes) from which it uses non-temporal stores.");
    m.def("set_stream_threshold_bytes", &ssf::set_stream_threshold_bytes, py::arg("n"),
          "Set that size (0 = always stream, a huge value = never); for tests and benchmarks.");
    m.def("num_threads", &ssf::num_threads, "Threads the decode kernels use.");
    m.def("set_num_threads", &ssf::set_num_threads, py::arg("n"),
          "Threads the decode kernels use (0 = default: SCALSELECT_NUM_THREADS or the CPUs this "
          "process may run on).");
}
