// Attention forward with shared-memory tiling (the plain CUDA path; the Triton kernel is the fast one).
// One block of 128 threads per (16-query tile, query head, sequence). Each 32-key tile of K and V is
// staged in shared memory once and reused by all 16 queries; the softmax is online (running max and
// sum per query row), so memory is O(tile) at any sequence length. GQA reads kv head h / (Hq / Hkv).
#include <cfloat>

#include "convert.cuh"
#include "kernels.h"

namespace tessera {
namespace {

constexpr int kThreads = 128;
constexpr int kQ = 16;   // queries per block
constexpr int kK = 32;   // keys per tile: one warp lane per key in the softmax
constexpr int kMaxD = 128;

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
    const int32_t* __restrict__ cu, int n_rep, int d, int64_t sqn, int64_t sqh, int64_t skn, int64_t skh,
    int64_t svn, int64_t svh, int64_t son, int64_t soh, bool causal, float scale) {
  __shared__ float qs[kQ][kMaxD];
  __shared__ float ks[kK][kMaxD + 1];  // +1: the score loop walks keys across threads, avoid bank conflicts
  __shared__ float vs[kK][kMaxD];
  __shared__ float ps[kQ][kK];
  __shared__ float row_alpha[kQ];
  __shared__ float row_l[kQ];

  const int head = blockIdx.y, seq = blockIdx.z, kv_head = head / n_rep;
  const int64_t bos = cu[seq];
  const int len = cu[seq + 1] - cu[seq];
  const int q0 = blockIdx.x * kQ;
  if (q0 >= len) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  for (int i = tid; i < kQ * d; i += kThreads) {
    const int r = i / d, c = i % d;
    qs[r][c] = q0 + r < len ? to_float(q[(bos + q0 + r) * sqn + head * sqh + c]) * scale : 0.f;
  }
  // Each warp owns 4 query rows for the softmax; thread `tid` owns output column tid for all 16 rows.
  float m_row[kQ / 4];
#pragma unroll
  for (int j = 0; j < kQ / 4; ++j) m_row[j] = -FLT_MAX;
  if (tid < kQ) row_l[tid] = 0.f;
  float acc[kQ];
#pragma unroll
  for (int r = 0; r < kQ; ++r) acc[r] = 0.f;

  const int k_end = causal ? min(len, q0 + kQ) : len;
  for (int k0 = 0; k0 < k_end; k0 += kK) {
    __syncthreads();
    for (int i = tid; i < kK * d; i += kThreads) {
      const int r = i / d, c = i % d;
      const bool ok = k0 + r < len;
      ks[r][c] = ok ? to_float(k[(bos + k0 + r) * skn + kv_head * skh + c]) : 0.f;
      vs[r][c] = ok ? to_float(v[(bos + k0 + r) * svn + kv_head * svh + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kQ / 4; ++j) {
      const int r = warp * (kQ / 4) + j, key = k0 + lane;
      float s = 0.f;
      for (int c = 0; c < d; ++c) s += qs[r][c] * ks[lane][c];
      const bool visible = key < len && (!causal || key <= q0 + r);
      s = visible ? s : -FLT_MAX;
      float mx = s;
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m_row[j], mx);
      const float p = visible ? __expf(s - m_new) : 0.f;
      float sum = p;
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      const float alpha = __expf(m_row[j] - m_new);
      m_row[j] = m_new;
      ps[r][lane] = p;
      if (lane == 0) {
        row_alpha[r] = alpha;
        row_l[r] = row_l[r] * alpha + sum;
      }
    }
    __syncthreads();
    if (tid < d) {
#pragma unroll
      for (int r = 0; r < kQ; ++r) {
        float a = acc[r] * row_alpha[r];
        for (int key = 0; key < kK; ++key) a += ps[r][key] * vs[key][tid];
        acc[r] = a;
      }
    }
  }
  __syncthreads();
  if (tid < d) {
#pragma unroll
    for (int r = 0; r < kQ; ++r) {
      if (q0 + r < len) o[(bos + q0 + r) * son + head * soh + tid] = from_float<T>(acc[r] / row_l[r]);
    }
  }
}

template <typename T>
cudaError_t launch(const void* q, const void* k, const void* v, void* o, const int32_t* cu, int batch,
                   int max_seqlen, int hq, int hkv, int d, int64_t sqn, int64_t sqh, int64_t skn, int64_t skh,
                   int64_t svn, int64_t svh, int64_t son, int64_t soh, bool causal, float scale,
                   cudaStream_t stream) {
  if (batch == 0 || max_seqlen == 0) return cudaSuccess;
  const dim3 grid((max_seqlen + kQ - 1) / kQ, hq, batch);
  attention_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                     static_cast<const T*>(v), static_cast<T*>(o), cu, hq / hkv, d,
                                                     sqn, sqh, skn, skh, svn, svh, son, soh, causal, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward(const void* q, const void* k, const void* v, void* o, const int32_t* cu_seqlens,
                              int batch, int max_seqlen, int hq, int hkv, int d, int64_t stride_qn, int64_t stride_qh,
                              int64_t stride_kn, int64_t stride_kh, int64_t stride_vn, int64_t stride_vh,
                              int64_t stride_on, int64_t stride_oh, bool causal, float scale, DType dtype,
                              cudaStream_t stream) {
  if (d > kMaxD || hkv == 0 || hq % hkv != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(q, k, v, o, cu_seqlens, batch, max_seqlen, hq, hkv, d, stride_qn, stride_qh, stride_kn,
                           stride_kh, stride_vn, stride_vh, stride_on, stride_oh, causal, scale, stream);
    case DType::kFloat16:
      return launch<__half>(q, k, v, o, cu_seqlens, batch, max_seqlen, hq, hkv, d, stride_qn, stride_qh, stride_kn,
                            stride_kh, stride_vn, stride_vh, stride_on, stride_oh, causal, scale, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(q, k, v, o, cu_seqlens, batch, max_seqlen, hq, hkv, d, stride_qn, stride_qh,
                                   stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, causal, scale,
                                   stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tessera
