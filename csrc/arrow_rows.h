// Samples from the buffers of an Arrow record batch (arrow_rows.cpp); the contract is documented
// in scalselect_fast/native.py (arrow_samples).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace ssf {

namespace py = pybind11;

// (samples, others, digests) for rows [start, stop) of one batch; see native.py.
py::tuple arrow_samples(py::dict spec, Py_ssize_t start, Py_ssize_t stop);

}  // namespace ssf
