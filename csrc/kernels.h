// Python-facing entry points of scalselect_fast._native (registered in bindings.cpp). Their
// contracts are documented in scalselect_fast/native.py.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace ssf {

namespace py = pybind11;

// center_block uses non-temporal stores when its output has at least this many bytes (default 8 MiB).
std::size_t stream_threshold_bytes();
void set_stream_threshold_bytes(std::size_t n);

void center_block(py::array block, py::array shift, py::array out, bool bf16);

void leverage_block(py::array block, py::array mean, py::array W, py::array out, py::object inv_scale,
                    bool l2_normalize, bool bf16, const std::string& gemm, std::int64_t tile_rows,
                    int threads);

py::tuple top_k_block(py::array scores, std::int64_t offset, std::int64_t budget);
py::tuple top_k_merge(py::list parts, std::int64_t budget);

}  // namespace ssf
