// Fork-join helper behind ssf::parallel_rows. Threads are started per call: the kernels give each
// thread milliseconds of work, so the ~20 us start cost is noise, and there is no pool to leak
// across fork() (dask workers fork).
#pragma once

#include <algorithm>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace ssf {

template <class Body>
void parallel_rows(std::size_t n, std::size_t min_chunk, int threads, Body&& body) {
    if (n == 0) return;
    if (min_chunk == 0) min_chunk = 1;
    std::size_t parts = std::min<std::size_t>(threads > 0 ? threads : 1, (n + min_chunk - 1) / min_chunk);
    if (parts <= 1) {
        body(std::size_t(0), n);
        return;
    }
    std::vector<std::thread> pool;
    std::vector<std::exception_ptr> errors(parts);
    pool.reserve(parts - 1);
    const std::size_t step = (n + parts - 1) / parts;
    for (std::size_t p = 1; p < parts; ++p) {
        std::size_t b = std::min(n, p * step), e = std::min(n, (p + 1) * step);
        auto run = [&, p, b, e] {
            try {
                body(b, e);
            } catch (...) {
                errors[p] = std::current_exception();
            }
        };
        try {
            pool.emplace_back(run);
        } catch (...) {
            // no thread available (std::system_error at a limit, std::bad_alloc): do this chunk here
            // rather than let the exception unwind past joinable threads (std::terminate)
            run();
        }
    }
    try {
        body(std::size_t(0), std::min(n, step));
    } catch (...) {
        errors[0] = std::current_exception();
    }
    for (auto& t : pool) t.join();
    for (auto& err : errors)
        if (err) std::rethrow_exception(err);
}

}  // namespace ssf
