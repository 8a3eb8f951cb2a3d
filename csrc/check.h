// Argument and CUDA checks that throw plain standard exceptions (pybind11 turns std::invalid_argument into
// ValueError, std::runtime_error into RuntimeError). Messages are built by string appends, not c10::str or
// iostreams, so no error path depends on locale state (why: docs/design.md, "Building the extension").
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <stdexcept>
#include <string>
#include <type_traits>

namespace hift {
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
}  // namespace detail

// Concatenates strings, integers, scalar types and devices into one message.
template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}
}  // namespace hift

// Throws std::invalid_argument (Python ValueError) with the message built from the remaining arguments.
#define HIFT_CHECK(cond, ...)                                               \
  do {                                                                      \
    if (!(cond)) throw std::invalid_argument(::hift::cat(__VA_ARGS__));     \
  } while (0)

#ifdef HIFT_WITH_CUDA
#include <cuda_runtime.h>

// Throws std::runtime_error (Python RuntimeError) naming the failed call and CUDA's error string.
#define HIFT_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                 \
    cudaError_t hift_err_ = (expr);                                                                    \
    if (hift_err_ != cudaSuccess) {                                                                    \
      cudaGetLastError(); /* clear the error so later calls start clean */                            \
      throw std::runtime_error(::hift::cat(#expr, " failed: ", cudaGetErrorString(hift_err_), " (",   \
                                           __FILE__, ":", __LINE__, ")"));                             \
    }                                                                                                  \
  } while (0)
#endif
