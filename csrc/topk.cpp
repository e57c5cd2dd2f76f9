// Deterministic top-k: descending score, ties to the lower global index.
//
// (score, index) pairs are totally ordered by that rule, so partial selection (nth_element) followed
// by sorting the kept prefix gives one answer whatever the input order: per-shard lists can be merged
// in any order and the result is the same ids, bit for bit.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace ssf {

namespace {

struct Entry {
    double s;
    std::int64_t i;
};

inline bool better(const Entry& a, const Entry& b) { return a.s > b.s || (a.s == b.s && a.i < b.i); }

// Keeps the best `m` entries of `v` in order (best first), O(n + m log m).
void select_top(std::vector<Entry>& v, std::size_t m) {
    if (m < v.size()) {
        std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(m), v.end(), better);
        v.resize(m);
    }
    std::sort(v.begin(), v.end(), better);
}

py::tuple to_arrays(const std::vector<Entry>& v) {
    py::array_t<std::int64_t> idx(static_cast<py::ssize_t>(v.size()));
    py::array_t<double> val(static_cast<py::ssize_t>(v.size()));
    std::int64_t* pi = idx.mutable_data();
    double* pv = val.mutable_data();
    for (std::size_t j = 0; j < v.size(); ++j) {
        pi[j] = v[j].i;
        pv[j] = v[j].s;
    }
    return py::make_tuple(idx, val);
}

void check_budget(std::int64_t budget, const char* fn) {
    if (budget < 0)
        throw py::value_error(std::string(fn) + ": budget must be >= 0, got " + std::to_string(budget));
}

}  // namespace

py::tuple top_k_block(py::array scores, std::int64_t offset, std::int64_t budget) {
    const char* fn = "top_k_block";
    require_f64(scores, fn, "scores");
    require_ndim(scores, 1, fn, "scores");
    require_c_contiguous(scores, fn, "scores");
    check_budget(budget, fn);
    const auto n = static_cast<std::size_t>(scores.shape(0));
    const double* s = static_cast<const double*>(scores.data());
    const std::size_t m = std::min<std::size_t>(n, static_cast<std::size_t>(budget));
    std::vector<Entry> v;
    std::size_t bad = n;
    {
        py::gil_scoped_release nogil;
        for (std::size_t j = 0; j < n; ++j)
            if (std::isnan(s[j])) {
                bad = j;
                break;
            }
        if (bad == n && m > 0) {
            v.resize(n);
            for (std::size_t j = 0; j < n; ++j) v[j] = Entry{s[j], offset + static_cast<std::int64_t>(j)};
            select_top(v, m);
        }
    }
    if (bad != n)
        throw py::value_error("top_k_block: scores[" + std::to_string(bad) + "] (global row " +
                              std::to_string(offset + static_cast<std::int64_t>(bad)) +
                              ") is NaN; leverage scores must be finite: check that row of the input "
                              "for NaN/inf values");
    return to_arrays(v);
}

py::tuple top_k_merge(py::list parts, std::int64_t budget) {
    const char* fn = "top_k_merge";
    check_budget(budget, fn);
    std::vector<py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>> idxs;
    std::vector<py::array_t<double, py::array::c_style | py::array::forcecast>> vals;
    std::size_t total = 0;
    for (std::size_t p = 0; p < parts.size(); ++p) {
        const std::string where = "top_k_merge: parts[" + std::to_string(p) + "]";
        py::object part = parts[p];
        if (!(py::isinstance<py::tuple>(part) || py::isinstance<py::list>(part)) || py::len(part) != 2)
            throw py::type_error(where + " must be a pair (indices int64, scores float64) as returned by top_k_block");
        py::array a = py::array::ensure(part[py::int_(0)]);
        py::array b = py::array::ensure(part[py::int_(1)]);
        if (!a || !(a.dtype().kind() == 'i' || a.dtype().kind() == 'u'))
            throw py::type_error(where + "[0] (indices) must be an integer array");
        if (!b || b.dtype().kind() != 'f')
            throw py::type_error(where + "[1] (scores) must be a float array");
        if (a.ndim() != 1 || b.ndim() != 1 || a.shape(0) != b.shape(0))
            throw py::value_error(where + ": indices and scores must be 1-D of equal length");
        idxs.emplace_back(a);
        vals.emplace_back(b);
        total += static_cast<std::size_t>(a.shape(0));
    }
    const std::size_t m = std::min<std::size_t>(total, static_cast<std::size_t>(budget));
    std::vector<Entry> v;
    // parts.size() is a Python C-API call: read it while the GIL is held, never inside nogil
    const std::size_t nparts = idxs.size();
    std::size_t bad_part = nparts, bad_pos = 0;
    {
        py::gil_scoped_release nogil;
        v.reserve(total);
        for (std::size_t p = 0; p < nparts && bad_part == nparts; ++p) {
            const std::int64_t* pi = idxs[p].data();
            const double* pv = vals[p].data();
            const auto n = static_cast<std::size_t>(idxs[p].shape(0));
            for (std::size_t j = 0; j < n; ++j) {
                if (std::isnan(pv[j])) {
                    bad_part = p;
                    bad_pos = j;
                    break;
                }
                v.push_back(Entry{pv[j], pi[j]});
            }
        }
        if (bad_part == nparts) select_top(v, m);
    }
    if (bad_part != nparts)
        throw py::value_error("top_k_merge: parts[" + std::to_string(bad_part) + "] has a NaN score at position " +
                              std::to_string(bad_pos) + " (global row " +
                              std::to_string(idxs[bad_part].data()[bad_pos]) +
                              "); leverage scores must be finite: check that row of the input");
    return to_arrays(v);
}

}  // namespace ssf
