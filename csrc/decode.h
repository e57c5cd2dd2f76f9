// Row decoders: storage dtype (fp16 / bf16 bits / fp32 / fp64) -> shifted (and optionally scaled)
// float32 or float64 values, computed in float64 so a large shift does not cancel the row's
// significant digits.
#pragma once

#include <cstddef>

#include "common.h"

namespace ssf {

// z[j] = (x[j] - shift[j]) * scale[j] (scale may be null), each z[j] computed in float64 and then
// rounded once to OutT. Returns sum_j z[j]^2 (in float64, of the unrounded z) when the kernel was
// picked with want_sumsq, else 0. `x` points at d elements of the picked storage type.
template <class OutT>
using RowKernel = double (*)(const void* x, const double* shift, const double* scale, OutT* out,
                             std::size_t d);

// Picks the fastest kernel the running CPU supports (AVX2+F16C when present, else portable code),
// unless SIMD was switched off with set_simd_enabled(false).
template <class OutT>
RowKernel<OutT> pick_row_kernel(Elem e, bool scale, bool want_sumsq);

// center_block's kernel for outputs larger than the caches: like pick_row_kernel<float>(e, false,
// false) but with non-temporal stores (when SIMD is active). Call streaming_store_fence() on the
// same thread before its output is read elsewhere.
RowKernel<float> pick_streaming_center_kernel(Elem e);
void streaming_store_fence();

// Whether the AVX2/F16C kernels are used (the CPU has them and they are not switched off).
bool simd_active();
// Switch the SIMD kernels off/on (tests compare both paths).
void set_simd_enabled(bool on);

std::size_t elem_size(Elem e);

}  // namespace ssf
