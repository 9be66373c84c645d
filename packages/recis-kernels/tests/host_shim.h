// Compiles recis-kernels' CUDA sources as host C++ for --emulate-kernels: one "thread" with
// gridDim = blockDim = 1 walks every iteration of each grid-stride loop in order. Valid for
// kernels without shared memory, synchronization, atomics or warp intrinsics.
#pragma once
#include <cmath>
#define __global__
#define __device__
#define __forceinline__ inline
struct recis_dim3 {
  unsigned x, y, z;
};
static const recis_dim3 blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0};
static const recis_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
using std::sqrt;
