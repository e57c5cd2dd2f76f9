// Shared helpers for the scalselect_fast._native kernels: argument checks that raise clear Python
// exceptions, the element types a block may hold, and a small fork-join helper for row-parallel
// loops.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace ssf {

namespace py = pybind11;

// Storage types a block of representations may arrive in. BF16 blocks are uint16 bit patterns
// (numpy has no bfloat16), so the caller says which one it means with the bf16 flag.
enum class Elem { F16, BF16, F32, F64 };

// Maps (dtype, bf16 flag) to an Elem, or raises TypeError naming `arg` in `fn` and the fix.
Elem block_elem(const py::array& a, bool bf16, const char* fn, const char* arg);

// TypeError unless `a` is float64 (kind 'f', 8 bytes).
void require_f64(const py::array& a, const char* fn, const char* arg);
// TypeError unless `a` is float32.
void require_f32(const py::array& a, const char* fn, const char* arg);
// ValueError unless C-contiguous; the message suggests np.ascontiguousarray.
void require_c_contiguous(const py::array& a, const char* fn, const char* arg);
// ValueError unless writeable.
void require_writeable(const py::array& a, const char* fn, const char* arg);
// ValueError unless a.ndim() == ndim.
void require_ndim(const py::array& a, py::ssize_t ndim, const char* fn, const char* arg);
// "float16" / "uint16" / ... for messages.
std::string dtype_name(const py::array& a);

// Number of worker threads the kernels may use (defaults to the CPUs this process may run on).
int num_threads();
void set_num_threads(int n);

// Runs body(begin, end) over [0, n) split into at most `threads` contiguous chunks, one per
// std::thread (the calling thread takes the first chunk). Chunks are at least `min_chunk` long, so
// small inputs run on the calling thread alone. The body must not touch Python objects.
template <class Body>
void parallel_rows(std::size_t n, std::size_t min_chunk, int threads, Body&& body);

}  // namespace ssf

#include "parallel_impl.h"
