// Launchers of the raw CUDA kernels. Plain pointers and sizes only, so the .cu files compile with nvcc
// alone (no torch headers); bindings.cpp checks tensors and calls these on the current stream.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace tessera {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y = x / sqrt(mean(x^2) + eps) * w per row of d elements. With residual r (non-null), h = x + r is
// written in x's dtype and normalised instead. Row strides are in elements; the last dim is contiguous.
cudaError_t rms_norm(const void* x, const void* r, const void* w, void* y, void* h, int64_t rows, int d,
                     int64_t stride_x, int64_t stride_r, int64_t stride_y, int64_t stride_h, float eps, DType dtype,
                     DType w_dtype, cudaStream_t stream);

// Packed varlen attention forward: q [N, Hq, D], k/v [N, Hkv, D], o [N, Hq, D], sequence i owns rows
// cu_seqlens[i]:cu_seqlens[i+1] (int32). D <= 128. Strides in elements (row, head); last dim contiguous.
cudaError_t attention_forward(const void* q, const void* k, const void* v, void* o, const int32_t* cu_seqlens,
                              int batch, int max_seqlen, int hq, int hkv, int d, int64_t stride_qn, int64_t stride_qh,
                              int64_t stride_kn, int64_t stride_kh, int64_t stride_vn, int64_t stride_vh,
                              int64_t stride_on, int64_t stride_oh, bool causal, float scale, DType dtype,
                              cudaStream_t stream);

}  // namespace tessera
