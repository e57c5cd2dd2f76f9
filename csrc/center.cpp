// center_block: out = block - shift in out's dtype (float64, or float32), the decode + shift pass
// that feeds the Gram and sketch products of the solvers.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>

#include "common.h"
#include "decode.h"
#include "kernels.h"

namespace ssf {

namespace {
std::atomic<std::size_t> g_stream_threshold{8u << 20};
}  // namespace

std::size_t stream_threshold_bytes() { return g_stream_threshold.load(std::memory_order_relaxed); }
void set_stream_threshold_bytes(std::size_t n) { g_stream_threshold.store(n, std::memory_order_relaxed); }

void center_block(py::array block, py::array shift, py::array out, bool bf16) {
    const char* fn = "center_block";
    const Elem e = block_elem(block, bf16, fn, "block");
    require_ndim(block, 2, fn, "block");
    require_c_contiguous(block, fn, "block");
    require_f64(shift, fn, "shift");
    require_ndim(shift, 1, fn, "shift");
    require_c_contiguous(shift, fn, "shift");
    const bool out64 = out.dtype().kind() == 'f' && out.dtype().itemsize() == 8;
    if (!out64 && !(out.dtype().kind() == 'f' && out.dtype().itemsize() == 4))
        throw py::type_error("center_block: out has dtype " + dtype_name(out) +
                             "; expected float64 or float32 (allocate it with np.empty(block.shape, np.float64))");
    require_ndim(out, 2, fn, "out");
    require_c_contiguous(out, fn, "out");
    require_writeable(out, fn, "out");
    const auto m = static_cast<std::size_t>(block.shape(0));
    const auto d = static_cast<std::size_t>(block.shape(1));
    if (static_cast<std::size_t>(shift.shape(0)) != d)
        throw py::value_error("center_block: shift has " + std::to_string(shift.shape(0)) +
                              " entries but block has d=" + std::to_string(d) + " columns");
    if (static_cast<std::size_t>(out.shape(0)) != m || static_cast<std::size_t>(out.shape(1)) != d)
        throw py::value_error("center_block: out has shape (" + std::to_string(out.shape(0)) + ", " +
                              std::to_string(out.shape(1)) + ") but block has shape (" +
                              std::to_string(m) + ", " + std::to_string(d) +
                              "); allocate out = np.empty(block.shape, np.float64)");
    if (m == 0 || d == 0) return;

    const char* x = static_cast<const char*>(block.data());
    const double* sh = static_cast<const double*>(shift.data());
    const std::size_t row_bytes = d * elem_size(e);
    const int threads = num_threads();
    // At least ~256 KiB of input per thread, so tiny blocks do not pay for thread starts.
    const std::size_t min_rows = std::max<std::size_t>(1, (256u << 10) / std::max<std::size_t>(1, row_bytes));
    if (out64) {
        double* o = static_cast<double*>(out.mutable_data());
        RowKernel<double> kern = pick_row_kernel<double>(e, false, false);
        py::gil_scoped_release nogil;
        parallel_rows(m, min_rows, threads, [&](std::size_t b, std::size_t end) {
            for (std::size_t i = b; i < end; ++i) kern(x + i * row_bytes, sh, nullptr, o + i * d, d);
        });
        return;
    }
    float* o = static_cast<float*>(out.mutable_data());
    // Outputs beyond the last-level cache bypass it (the Gram product that reads them streams from
    // memory anyway); smaller ones stay cached for the consumer. Override: set_stream_threshold.
    const bool stream = m * d * sizeof(float) >= stream_threshold_bytes();
    RowKernel<float> kern = stream ? pick_streaming_center_kernel(e) : pick_row_kernel<float>(e, false, false);

    py::gil_scoped_release nogil;
    parallel_rows(m, min_rows, threads, [&](std::size_t b, std::size_t end) {
        for (std::size_t i = b; i < end; ++i) kern(x + i * row_bytes, sh, nullptr, o + i * d, d);
        if (stream) streaming_store_fence();
    });
}

}  // namespace ssf
