// Argument and CUDA checks that throw plain standard exceptions.
//
// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into RuntimeError. We avoid
// c10::Error (TORCH_CHECK / C10_CUDA_CHECK) on purpose: on the GPU machine's toolchain (torch 2.11, GCC 13.3,
// Python 3.12) a c10::Error raised from this extension crashed the process, while a standard exception
// crossed cleanly; c10::Error also captures and symbolises a C++ backtrace that a bad argument does not need.
#pragma once

#include <c10/util/StringUtil.h>  // c10::str

#include <stdexcept>

// Throws std::invalid_argument (Python ValueError) with the message built from the remaining arguments.
#define HIFT_CHECK(cond, ...)                                  \
  do {                                                         \
    if (!(cond)) throw std::invalid_argument(c10::str(__VA_ARGS__)); \
  } while (0)

#ifdef HIFT_WITH_CUDA
#include <cuda_runtime.h>

// Throws std::runtime_error (Python RuntimeError) naming the failed call and CUDA's error string.
#define HIFT_CUDA_CHECK(expr)                                                                       \
  do {                                                                                              \
    cudaError_t hift_err_ = (expr);                                                                 \
    if (hift_err_ != cudaSuccess) {                                                                 \
      cudaGetLastError(); /* clear the sticky-free error so later calls start clean */             \
      throw std::runtime_error(c10::str(#expr, " failed: ", cudaGetErrorString(hift_err_), " (", \
                                        __FILE__, ":", __LINE__, ")"));                           \
    }                                                                                               \
  } while (0)
#endif
