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

// The x an int4 GEMV multiplies when it is not x itself, formed as the kernel loads it, for one token (m == 1,
// k * 2 bytes at most kMaxFormedBytes). kGated: x is a fused gate/up output [1, 2k] and the product is of
// silu(x[:, :k]) * x[:, k:]. kNormed: the product is of rms_norm_residual(x, residual, weight, eps)'s output,
// and h = x + residual is written; x, residual, weight (x's dtype) and h are contiguous 16-byte aligned rows of k.
enum class XMode : int { kPlain = 0, kGated = 1, kNormed = 2 };
struct XPrologue {
  XMode mode = XMode::kPlain;
  const void* residual = nullptr;
  const void* weight = nullptr;
  void* h = nullptr;
  float eps = 0.0f;
};
// The formed row lives in shared memory: 32 KiB, a row of 16384 16-bit values.
constexpr size_t kMaxFormedBytes = 32768;

// What an int4 GEMV of a plain x stores, when not y itself (YMode), saving the launch that would form it.
// kSwiGlu: the weight is a fused gate/up one of 2n rows (gate rows first) and y [m, n] = silu(gate) * up.
// kRope: the weight is a fused q/k/v one of n = (hq + 2 hkv) * head_dim rows (head_dim a multiple of 16) and
// y [m, n] is its product with q and k rotated by rope (the rotate-half form: dims j and j + head_dim / 2 of a
// head form a pair, rotated by cos/sin [m, head_dim] at j and j + head_dim / 2); the rotated k and v rows of
// token t also go to k_cache and v_cache at slots[t] ([slots, hkv, head_dim], contiguous; a negative slot
// stores nothing). cos, sin and the caches are in x's dtype; every output is rounded to it before rotating.
enum class YMode : int { kPlain = 0, kSwiGlu = 1, kRope = 2 };
struct YEpilogue {
  YMode mode = YMode::kPlain;
  const void* cos = nullptr;  // kRope: rows ld_cs elements apart
  const void* sin = nullptr;
  int64_t ld_cs = 0;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int64_t* slots = nullptr;
  int hq = 0, hkv = 0, head_dim = 0;
};

// AWQ int4 decode GEMV on the tensor cores (quant_gemv.cu): y[m, n] = x[m, k] @ W.T for 1 <= m <= 16, group
// size 128 (k a multiple of it). x and y are bf16 or fp16 rows (ldx, ldy in elements; x rows 16-byte
// aligned); qweight [n, k / 2] uint8, two codes a byte, even k low (ldq in bytes, rows 16-byte aligned);
// scales and zeros [n, k / 128] float32 (lds, ldz in elements). rows_per_block 16 or 32; warps 4 or 8, or 16
// with 16 rows and m <= 8. loop: a resident grid whose blocks step through the row tiles (needs k / 128 a
// multiple of warps) instead of a block a tile. pdl 0 (plain launch), 1 (programmatic dependent launch,
// waiting first) or 3 (the same, with the first weights loaded before the wait). xp: the x prologue (k is
// then the product's K, half of a gated x's width). ye (plain x only): what is stored (YEpilogue). kSwiGlu:
// qweight, scales and zeros have 2n rows, each product is rounded to x's dtype first and silu then rounded as
// the silu_mul op rounds it. kRope: n is qweight's rows, rotated as the rope op rotates. rows_per_block counts
// weight rows (a kSwiGlu block stores half as many outputs).
cudaError_t int4_gemv(const void* x, int64_t ldx, const uint8_t* qweight, int64_t ldq, const float* scales,
                      int64_t lds, const float* zeros, int64_t ldz, void* y, int64_t ldy, int m, int n, int k,
                      int rows_per_block, int warps, bool loop, int pdl, const XPrologue& xp, const YEpilogue& ye,
                      DType dtype, cudaStream_t stream);

// int8 weight-only decode GEMV on the tensor cores (quant_gemv.cu): y[m, n] = x[m, k] @ (weight * scale).T for
// 1 <= m <= 16, k a multiple of 64. weight [n, k] int8 (ldw in bytes, rows 16-byte aligned), scale [n]
// float32; x, y, rows_per_block, warps, pdl as int4_gemv; loop needs k / 64 a multiple of warps.
cudaError_t int8_gemv(const void* x, int64_t ldx, const int8_t* weight, int64_t ldw, const float* scale, void* y,
                      int64_t ldy, int m, int n, int k, int rows_per_block, int warps, bool loop, int pdl, DType dtype,
                      cudaStream_t stream);

}  // namespace tessera
