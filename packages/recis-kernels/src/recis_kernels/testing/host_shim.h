// Compiles recis-kernels' CUDA sources as host C++ (recis_kernels.testing): one "thread" with
// gridDim = blockDim = 1 walks every iteration of each grid-stride loop in order. Valid for
// kernels without shared memory, synchronization or warp intrinsics; atomicCAS and atomicAdd are
// the plain read-modify-writes of that single thread.
#pragma once
#include <cmath>
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
struct recis_dim3 {
  unsigned x, y, z;
};
static const recis_dim3 blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0};
static const recis_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare,
                                    unsigned long long value) {
  const unsigned long long old = *p;
  if (old == compare) *p = value;
  return old;
}
inline unsigned int atomicCAS(unsigned int* p, unsigned int compare, unsigned int value) {
  const unsigned int old = *p;
  if (old == compare) *p = value;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long value) {
  const unsigned long long old = *p;
  *p = old + value;
  return old;
}
// Correctly rounded double arithmetic, as CUDA's intrinsics (ISO C++ contracts no products).
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
using std::sqrt;
