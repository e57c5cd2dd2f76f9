// Row decoders for every storage dtype, in a portable version and an AVX2/F16C version selected at
// run time (the wheel targets baseline x86-64; no -march=native).
//
// Numerics: each element is widened exactly to float64 (fp16, bf16 and fp32 are exact in float64),
// shifted and scaled in float64 with plain IEEE operations (no FMA, so the SIMD and portable paths
// agree bit for bit and match numpy's float64 arithmetic), then rounded once to the output type.
// The optional row sum of squares (for L2 normalisation) is the exception: the AVX2 path
// accumulates it with FMA in four lanes, so it differs from the portable sum in the last bits (the
// leverage score it divides is rounded to float32 afterwards, far above that difference).
#include "decode.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SSF_X86 1
#else
#define SSF_X86 0
#endif

namespace ssf {

std::size_t elem_size(Elem e) {
    switch (e) {
        case Elem::F16:
        case Elem::BF16: return 2;
        case Elem::F32: return 4;
        case Elem::F64: return 8;
    }
    return 0;
}

namespace {

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN payloads kept).
inline float half_to_float(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    const std::uint32_t mant = h & 0x3ffu;
    std::uint32_t bits;
    if (exp == 0) {
        // zero or subnormal: mant * 2^-24 is exact in float32
        float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
        std::memcpy(&bits, &v, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline float bf16_to_float(std::uint16_t b) {
    std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

template <Elem E>
inline double load_scalar(const void* x, std::size_t j) {
    if constexpr (E == Elem::F16) return half_to_float(static_cast<const std::uint16_t*>(x)[j]);
    else if constexpr (E == Elem::BF16) return bf16_to_float(static_cast<const std::uint16_t*>(x)[j]);
    else if constexpr (E == Elem::F32) return static_cast<const float*>(x)[j];
    else return static_cast<const double*>(x)[j];
}

template <Elem E, bool SCALE, bool SUMSQ, class OutT>
double row_portable(const void* x, const double* shift, const double* scale, OutT* out, std::size_t d) {
    double s = 0.0;
    for (std::size_t j = 0; j < d; ++j) {
        double z = load_scalar<E>(x, j) - shift[j];
        if constexpr (SCALE) z *= scale[j];
        if constexpr (SUMSQ) s += z * z;
        out[j] = static_cast<OutT>(z);
    }
    return s;
}

#if SSF_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// Loads 8 consecutive elements widened to two float64 vectors (lo = elements 0..3).
template <Elem E>
inline void load8(const void* x, std::size_t j, __m256d& lo, __m256d& hi) {
    if constexpr (E == Elem::F64) {
        const double* p = static_cast<const double*>(x) + j;
        lo = _mm256_loadu_pd(p);
        hi = _mm256_loadu_pd(p + 4);
    } else {
        __m256 v;
        if constexpr (E == Elem::F16) {
            v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                static_cast<const std::uint16_t*>(x) + j)));
        } else if constexpr (E == Elem::BF16) {
            __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
                static_cast<const std::uint16_t*>(x) + j));
            v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        } else {
            v = _mm256_loadu_ps(static_cast<const float*>(x) + j);
        }
        lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    }
}

template <Elem E, bool SCALE, bool SUMSQ, class OutT>
inline double tail_avx2(const void* x, const double* shift, const double* scale, OutT* out, std::size_t j,
                        std::size_t end) {
    double s = 0.0;
    for (; j < end; ++j) {
        double z;
        if constexpr (E == Elem::F16)
            z = static_cast<double>(_cvtsh_ss(static_cast<const std::uint16_t*>(x)[j])) - shift[j];
        else
            z = load_scalar<E>(x, j) - shift[j];
        if constexpr (SCALE) z *= scale[j];
        if constexpr (SUMSQ) s += z * z;
        out[j] = static_cast<OutT>(z);
    }
    return s;
}

// STREAM: non-temporal stores for outputs larger than the caches (the consumer reads them from
// memory anyway), which saves the read-for-ownership of every output line.
template <Elem E, bool SCALE, bool SUMSQ, class OutT, bool STREAM = false>
double row_avx2(const void* x, const double* shift, const double* scale, OutT* out, std::size_t d) {
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    std::size_t j = 0;
    double head = 0.0;
    if constexpr (STREAM) {
        // peel until the output is 32-byte aligned (streaming stores need it)
        const auto addr = reinterpret_cast<std::uintptr_t>(out);
        std::size_t peel = ((32 - (addr & 31)) & 31) / sizeof(OutT);
        if (addr % sizeof(OutT)) peel = d;  // misaligned element type: no streaming
        peel = std::min(peel, d);
        head = tail_avx2<E, SCALE, SUMSQ, OutT>(x, shift, scale, out, 0, peel);
        j = peel;
    }
    for (; j + 8 <= d; j += 8) {
        __m256d lo, hi;
        load8<E>(x, j, lo, hi);
        lo = _mm256_sub_pd(lo, _mm256_loadu_pd(shift + j));
        hi = _mm256_sub_pd(hi, _mm256_loadu_pd(shift + j + 4));
        if constexpr (SCALE) {
            lo = _mm256_mul_pd(lo, _mm256_loadu_pd(scale + j));
            hi = _mm256_mul_pd(hi, _mm256_loadu_pd(scale + j + 4));
        }
        if constexpr (SUMSQ) {
            acc0 = _mm256_fmadd_pd(lo, lo, acc0);
            acc1 = _mm256_fmadd_pd(hi, hi, acc1);
        }
        if constexpr (sizeof(OutT) == 4) {
            __m256 f = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
            if constexpr (STREAM)
                _mm256_stream_ps(reinterpret_cast<float*>(out) + j, f);
            else
                _mm256_storeu_ps(reinterpret_cast<float*>(out) + j, f);
        } else {
            _mm256_storeu_pd(reinterpret_cast<double*>(out) + j, lo);
            _mm256_storeu_pd(reinterpret_cast<double*>(out) + j + 4, hi);
        }
    }
    double s = head;
    if constexpr (SUMSQ) {
        __m256d a = _mm256_add_pd(acc0, acc1);
        __m128d h = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
        s += _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
    }
    return s + tail_avx2<E, SCALE, SUMSQ, OutT>(x, shift, scale, out, j, d);
}

__attribute__((target("avx2"))) void fence_streaming_stores() { _mm_sfence(); }

#pragma GCC pop_options
#endif  // SSF_X86

bool cpu_has_avx2_f16c() {
#if SSF_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("fma");
#else
    return false;
#endif
}

const bool g_cpu_simd = cpu_has_avx2_f16c();
std::atomic<bool> g_simd_enabled{true};

template <Elem E, class OutT>
RowKernel<OutT> pick_flags(bool scale, bool sumsq, bool simd) {
#if SSF_X86
    if (simd) {
        if (scale) return sumsq ? row_avx2<E, true, true, OutT> : row_avx2<E, true, false, OutT>;
        return sumsq ? row_avx2<E, false, true, OutT> : row_avx2<E, false, false, OutT>;
    }
#else
    (void)simd;
#endif
    if (scale) return sumsq ? row_portable<E, true, true, OutT> : row_portable<E, true, false, OutT>;
    return sumsq ? row_portable<E, false, true, OutT> : row_portable<E, false, false, OutT>;
}

}  // namespace

RowKernel<float> pick_streaming_center_kernel(Elem e) {
#if SSF_X86
    if (simd_active()) {
        switch (e) {
            case Elem::F16: return row_avx2<Elem::F16, false, false, float, true>;
            case Elem::BF16: return row_avx2<Elem::BF16, false, false, float, true>;
            case Elem::F32: return row_avx2<Elem::F32, false, false, float, true>;
            case Elem::F64: return row_avx2<Elem::F64, false, false, float, true>;
        }
    }
#endif
    return pick_row_kernel<float>(e, false, false);
}

void streaming_store_fence() {
#if SSF_X86
    if (g_cpu_simd) fence_streaming_stores();
#endif
}

bool simd_active() { return g_cpu_simd && g_simd_enabled.load(std::memory_order_relaxed); }
void set_simd_enabled(bool on) { g_simd_enabled.store(on, std::memory_order_relaxed); }

template <class OutT>
RowKernel<OutT> pick_row_kernel(Elem e, bool scale, bool want_sumsq) {
    const bool simd = simd_active();
    switch (e) {
        case Elem::F16: return pick_flags<Elem::F16, OutT>(scale, want_sumsq, simd);
        case Elem::BF16: return pick_flags<Elem::BF16, OutT>(scale, want_sumsq, simd);
        case Elem::F32: return pick_flags<Elem::F32, OutT>(scale, want_sumsq, simd);
        case Elem::F64: return pick_flags<Elem::F64, OutT>(scale, want_sumsq, simd);
    }
    return nullptr;
}

template RowKernel<float> pick_row_kernel<float>(Elem, bool, bool);
template RowKernel<double> pick_row_kernel<double>(Elem, bool, bool);

}  // namespace ssf
