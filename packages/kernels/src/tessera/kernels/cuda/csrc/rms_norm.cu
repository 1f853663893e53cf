// RMSNorm (optionally fused with the residual add): one block per row, a warp-shuffle reduction of
// sum(x^2), float32 arithmetic. The row is read twice (the second read hits L1/L2 for rows up to a
// few tens of KB), and written once.
#include "convert.cuh"
#include "kernels.h"

namespace tessera {
namespace {

constexpr int kThreads = 256;

__device__ float block_sum(float v) {
  __shared__ float partial[kThreads / 32];
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? partial[lane] : 0.f;
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ r,
                                                            const W* __restrict__ w, T* __restrict__ y,
                                                            T* __restrict__ h, int d, int64_t sx, int64_t sr,
                                                            int64_t sy, int64_t sh, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * sx;
  float ss = 0.f;
  for (int c = threadIdx.x; c < d; c += kThreads) {
    T v = xr[c];
    if (r != nullptr) {
      // h is rounded to the storage dtype before it is normalised, as the reference adds in that dtype.
      v = from_float<T>(to_float(v) + to_float(r[row * sr + c]));
      h[row * sh + c] = v;
    }
    const float f = to_float(v);
    ss += f * f;
  }
  const float rstd = rsqrtf(block_sum(ss) / d + eps);
  for (int c = threadIdx.x; c < d; c += kThreads) {
    const float f = r != nullptr ? to_float(h[row * sh + c]) : to_float(xr[c]);
    y[row * sy + c] = from_float<T>(f * rstd * to_float(w[c]));
  }
}

template <typename T, typename W>
cudaError_t launch(const void* x, const void* r, const void* w, void* y, void* h, int64_t rows, int d, int64_t sx,
                   int64_t sr, int64_t sy, int64_t sh, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rms_norm_kernel<T, W><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(r), static_cast<const W*>(w), static_cast<T*>(y),
      static_cast<T*>(h), d, sx, sr, sy, sh, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_weight(DType w_dtype, const void* x, const void* r, const void* w, void* y, void* h,
                            int64_t rows, int d, int64_t sx, int64_t sr, int64_t sy, int64_t sh, float eps,
                            cudaStream_t stream) {
  switch (w_dtype) {
    case DType::kFloat32: return launch<T, float>(x, r, w, y, h, rows, d, sx, sr, sy, sh, eps, stream);
    case DType::kFloat16: return launch<T, __half>(x, r, w, y, h, rows, d, sx, sr, sy, sh, eps, stream);
    case DType::kBFloat16: return launch<T, __nv_bfloat16>(x, r, w, y, h, rows, d, sx, sr, sy, sh, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t rms_norm(const void* x, const void* r, const void* w, void* y, void* h, int64_t rows, int d,
                     int64_t stride_x, int64_t stride_r, int64_t stride_y, int64_t stride_h, float eps, DType dtype,
                     DType w_dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return dispatch_weight<float>(w_dtype, x, r, w, y, h, rows, d, stride_x, stride_r, stride_y, stride_h, eps,
                                    stream);
    case DType::kFloat16:
      return dispatch_weight<__half>(w_dtype, x, r, w, y, h, rows, d, stride_x, stride_r, stride_y, stride_h, eps,
                                     stream);
    case DType::kBFloat16:
      return dispatch_weight<__nv_bfloat16>(w_dtype, x, r, w, y, h, rows, d, stride_x, stride_r, stride_y, stride_h,
                                            eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tessera
