// Weight-only quantized decode GEMVs on the tensor cores: y[M, N] = x[M, K] @ W.T for M <= 16, in two formats.
//
// AWQ int4 (`int4_gemv`): codes q in [0, 15] packed two a byte along K (even k in the low nibble), with a
// float32 scale s and zero z per row and group of 128: W[n, k] = (q - z) * s. At decode shapes the product is a
// stream of weights, and the CUDA-core GEMV is bound by turning each code into a float (a PRMT, a subtraction,
// an FMA: an H200 then runs int4 no faster than int8, about 4e12 weights/s). Here two codes become two 16-bit
// floats by one LOP3 ((bits & 0x000F000F) | magic: 128 + q in bf16, 1024 + q in fp16) and one packed
// subtraction of the magic, exactly, and `mma.sync.m16n8k16` does the multiply-adds, x in its B operand (one
// column a token, up to 8 a tile).
//
// int8 (`int8_gemv`): signed bytes q with a float32 scale per row, W[n, k] = q * s[n]. Each byte is split
// into its nibbles, q = 16 * hi + lo with lo in [0, 15] and hi in [-8, 7] (the two's-complement high nibble),
// and each nibble becomes a 16-bit float as an int4 code does: lo exactly as above, 16 * hi by XOR-ing the
// nibble into magic | 8 (2048 + 16 * (hi ^ 8) in bf16, 16384 + 16 * (hi ^ 8) in fp16: the mantissa's last
// place is worth 16 there) and subtracting the magic | 8 (2176, 16512). Both nibbles of a byte meet the same
// x in the product, so the tensor core multiplies a byte as two products, exact in float32. Per byte of
// weights that is the int4 path's work (two nibbles, two product slots); there is no zero point, and the row
// scale multiplies the finished sum once.
//
// The order of k inside a sum is free, so the fragments need no re-packed weights. An item is 64 bytes of a
// row: one int4 group (128 codes) or 64 int8 weights. Lane (r, t) of a warp (r = lane / 4, t = lane % 4)
// loads 16 bytes of rows r and r + 8 of its tile, the t-th quarter of the item, and uses them as its
// A-fragment elements of eight k-steps; every lane with the same t loads x at the same k for its B fragment,
// so each product pairs a weight with the x of its own k. For int4, a ninth product per step, of ones with
// the same B, gives the group's sum of x, and the group adds s * (sum q x - z * sum x) to the row in float32
// (as the Triton GEMV), so any float zero point works.
//
// A block takes 16 * RT rows and its WARPS warps share out the items (warp w: items w, w + WARPS, ...); each
// warp keeps STAGES items of weights (with int4's scales and zeros) and x in flight in registers (2 for int4,
// 4 for int8, whose items carry no scales), then the warps' sums are added in warp order through shared memory
// (deterministic) and rounded once to x's dtype. A block takes one row tile, or (LOOP) the grid is what fits
// on the GPU at once and each block steps through row tiles, its next tile's first items loading while it
// adds up the current one.
//
// The x an int4 launch multiplies may be formed as it loads (XMode, one token), saving the launch that would
// form it: kGated, silu(gate) * up from the two halves of a fused gate/up output [1, 2k], each rounded to x's
// dtype as the silu_mul op rounds it; kNormed, rms_norm_residual(x, residual, weight)'s output, which needs
// the whole row's sum of squares first (block 0 also stores h = x + residual). After the wait every block
// forms the whole row into shared memory, its threads sharing out the row (the normalised row's sum of squares
// in an order every block repeats), and the warps read their x there. Forming x in the registers that load it
// instead repeats each token's work in all eight lanes of a k slice, and for a gated row of 8192 that cost
// 6 us a launch (14.7 against 8.5 us, H100, 2026-12-06).
//
// The output may instead be one the next launch would have formed (YMode, plain x; nothing is re-packed, the
// weights, scales and zeros are read where they lie). kSwiGlu: the weight is a fused gate/up one of 2n rows, and
// a 16-row tile takes gate rows j..j+7 as its A rows 0-7 and the up rows of the same outputs as rows 8-15, so the
// two sums of an output meet in one accumulator's lane (the m16n8 C fragment gives a lane rows r and r + 8), and
// the block stores silu(gate) * up (each sum rounded to x's dtype, then as the silu_mul op rounds), saving the
// silu_mul launch. kRope: the weight is a fused q/k/v one, and a tile pairs dims j..j+7 of a head with dims
// j + d/2.. of the same head, the two halves rope rotates together; the block stores q and k rotated and v, and
// writes k and v at the token's cache slot, saving the rope and cache-write launches.
//
// Programmatic dependent launch: with pdl >= 1 the kernel launches with the programmatic-stream-
// serialization attribute, waits (`griddepcontrol.wait`) before it reads x, and lets the next kernel launch
// once it has waited; with pdl == 3 (early weights) its first STAGES items of weights, scales and zeros
// load before the wait, which is safe only while nothing launched before it writes them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "convert.cuh"
#include "kernels.h"

namespace tessera {
namespace {

enum class Format { kInt4Awq, kInt8 };

// Per format: k of an item (64 bytes of a row), x vectors (16 bytes) a lane loads per item and token tile,
// and items in flight per warp.
template <Format F>
struct Traits;
template <>
struct Traits<Format::kInt4Awq> {
  static constexpr int kItemK = 128;  // one group: a lane's 16 bytes are 32 codes
  static constexpr int kXVecs = 4;
  static constexpr int kStages = 2;
};
template <>
struct Traits<Format::kInt8> {
  static constexpr int kItemK = 64;  // a lane's 16 bytes are 16 weights
  static constexpr int kXVecs = 2;
  static constexpr int kStages = 4;
};

template <typename T>
struct Half16;
template <>
struct Half16<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 twice; 128 + q for a 4-bit q in the mantissa
  static constexpr uint32_t kHigh = 0x45084508u;   // 2176.0 twice: 2048 (last place 16) with 8 in the mantissa
  static constexpr uint32_t kOnes = 0x3F803F80u;   // 1.0 twice
};
template <>
struct Half16<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 twice
  static constexpr uint32_t kHigh = 0x74087408u;   // 16512.0 twice: 16384 (last place 16) with 8 in the mantissa
  static constexpr uint32_t kOnes = 0x3C003C00u;
};

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// The nibbles at bits SHIFT and SHIFT + 16 of w as two 16-bit floats: bias + v by one LOP3, then the bias
// subtracted in the same precision, exactly. Low (HIGH false): v in [0, 15], bias kMagic; the int4 codes s and
// s + 4 of a word are SHIFT = 4 s. High (HIGH true): 16 * (v - 16 * (v >= 8)), the value of an int8 byte's
// high nibble: (v ^ 8) goes into the mantissa of kHigh's power of two, where the last place is worth 16, and
// kHigh = that power + 16 * 8 comes off. Keeping the bias in the products instead (and taking it out with the
// sum of x) lost float32 bits to cancellation: fp16 int4 rows came out 8x further from the exact product
// than the float32 reference (H100, 2026-12-06).
template <typename T, int SHIFT, bool HIGH = false>
__device__ __forceinline__ uint32_t nibbles(uint32_t w) {
  constexpr uint32_t bias = HIGH ? Half16<T>::kHigh : Half16<T>::kMagic;
  uint32_t biased, out;
  if constexpr (HIGH) {  // (a & b) ^ c
    asm("lop3.b32 %0, %1, %2, %3, 0x6A;\n" : "=r"(biased) : "r"(w >> SHIFT), "r"(0x000F000Fu), "r"(bias));
  } else {  // (a & b) | c
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(biased) : "r"(w >> SHIFT), "r"(0x000F000Fu), "r"(bias));
  }
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("sub.rn.bf16x2 %0, %1, %2;\n" : "=r"(out) : "r"(biased), "r"(bias));
  } else {
    asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(out) : "r"(biased), "r"(bias));
  }
  return out;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t out;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(out) : "r"(a), "r"(b), "r"(sel));
  return out;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ uint4 load_weights(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void grid_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" :::); }

// One item in flight: for each row tile and half (rows r, r + 8) 16 bytes of weights, and for int4 the scale
// and zero; for each token tile x at the lane's k of the item (int4: 32 values, int8: 16; two a word).
template <Format F, int RT, int NT>
struct Stage {
  uint4 w[RT][2];
  float s[RT][2];
  float z[RT][2];
  uint4 x[NT][Traits<F>::kXVecs];
};

// The operands of the x prologue (XMode): gated, up's offset from the gate in elements; normed, the residual
// row, the norm's weight (x's dtype), h (x + residual, written by block 0) and eps.
template <typename T>
struct XArgs {
  int64_t up;
  const T* residual;
  const T* weight;
  T* h;
  float eps;
};

__device__ __forceinline__ uint4 load16(const void* p, int v) { return reinterpret_cast<const uint4*>(p)[v]; }

// Forms the one row of x that XM asks for (k elements, k % 8 == 0, rows 16-byte aligned) in shared memory xs,
// the block's threads taking 16-byte vectors v = thread, + threads, ... in chunks of kV, whose loads are all
// issued before any is used. kGated: silu(gate) rounded to T, times up, rounded to T (the silu_mul op's
// roundings; the exponential and the division are the fast approximations, as the Triton GEMV's are at 16
// bits). kNormed: h = x + residual rounded to T (block 0 stores it to xa.h), 1 / rms from the sum of h^2 (each
// thread's share in a fixed order, then the warps' by shuffles and in warp order, so every block finds the same
// value), then h * rstd * weight rounded to T; a row that fits one chunk keeps its weights in registers for
// that second pass. Syncs the block.
template <typename T, XMode XM, int WARPS>
__device__ __forceinline__ void form_row(const T* __restrict__ x, const XArgs<T>& xa, T* xs, int k) {
  constexpr int kThreads = WARPS * 32;
  constexpr int kV = WARPS >= 16 ? 2 : 4;  // 16 warps have 128 registers a thread
  const int vecs = k / 8;
  uint4 wv[kV];
  float ss = 0.0f;
  for (int base = threadIdx.x; base < vecs; base += kV * kThreads) {
    uint4 a[kV], b[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int v = base + i * kThreads;
      if (v < vecs) {
        a[i] = load16(x, v);
        b[i] = load16(XM == XMode::kGated ? x + xa.up : xa.residual, v);
        if constexpr (XM == XMode::kNormed) wv[i] = load16(xa.weight, v);
      }
    }
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int v = base + i * kThreads;
      if (v >= vecs) break;
      T* ae = reinterpret_cast<T*>(&a[i]);
      const T* be = reinterpret_cast<const T*>(&b[i]);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float af = to_float(ae[e]);
        if constexpr (XM == XMode::kGated) {
          const float act = to_float(from_float<T>(__fdividef(af, 1.0f + __expf(-af))));
          ae[e] = from_float<T>(act * to_float(be[e]));
        } else {
          ae[e] = from_float<T>(af + to_float(be[e]));
          const float f = to_float(ae[e]);
          ss += f * f;
        }
      }
      reinterpret_cast<uint4*>(xs)[v] = a[i];
      if (XM == XMode::kNormed && blockIdx.x == 0) reinterpret_cast<uint4*>(xa.h)[v] = a[i];
    }
  }
  if constexpr (XM == XMode::kNormed) {
    __shared__ float warp_sums[WARPS];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += warp_sums[w];
    const float rstd = rsqrtf(total / static_cast<float>(k) + xa.eps);
    const bool one_chunk = vecs <= kV * kThreads;
    for (int base = threadIdx.x; base < vecs; base += kV * kThreads) {
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        const int v = base + i * kThreads;  // a vector this thread stored above
        if (v >= vecs) break;
        uint4 hv = reinterpret_cast<const uint4*>(xs)[v];
        const uint4 w = one_chunk ? wv[i] : load16(xa.weight, v);
        T* he = reinterpret_cast<T*>(&hv);
        const T* we = reinterpret_cast<const T*>(&w);
#pragma unroll
        for (int e = 0; e < 8; ++e) he[e] = from_float<T>(to_float(he[e]) * rstd * to_float(we[e]));
        reinterpret_cast<uint4*>(xs)[v] = hv;
      }
    }
  }
  __syncthreads();
}

// Rotates the pair (a, b) = dims j and j + half of a q or k head of `token` by rope's cos/sin rows, in float32 and
// rounded once, as the rope op does (rotate-half: a cos_j - b sin_j, b cos_{j+half} + a sin_{j+half}; each product
// rounded apart from the fma, as the Triton rope kernel writes it).
template <typename T>
__device__ __forceinline__ void rope_pair(const YEpilogue& ye, int token, int j, int half, T& a, T& b) {
  const T* cs = static_cast<const T*>(ye.cos) + static_cast<int64_t>(token) * ye.ld_cs;
  const T* sn = static_cast<const T*>(ye.sin) + static_cast<int64_t>(token) * ye.ld_cs;
  const float x1 = to_float(a), x2 = to_float(b);
  const float c1 = to_float(cs[j]), c2 = to_float(cs[j + half]), s1 = to_float(sn[j]), s2 = to_float(sn[j + half]);
  a = from_float<T>(__fmaf_rn(x1, c1, -__fmul_rn(x2, s1)));
  b = from_float<T>(__fmaf_rn(x2, c2, __fmul_rn(x1, s2)));
}

// The B fragments of k-step `step` for token tile j: (b0, b1), the x that meet A registers (0, 1) and (2, 3).
template <Format F, typename S>
__device__ __forceinline__ void b_fragment(const S& st, int j, int step, uint32_t& b0, uint32_t& b1) {
  const int odd = step & 1;
  if constexpr (F == Format::kInt4Awq) {
    // 8 codes a weight word (k = 8 mw .. 8 mw + 7); A holds codes 2 odd, 2 odd + 4 (regs 0, 1) and 2 odd + 1,
    // 2 odd + 5 (regs 2, 3)
    const int mw = step >> 1;
    const uint32_t lo = word(st.x[j][mw], odd);      // x at 8 mw + 2 odd, + 1
    const uint32_t hi = word(st.x[j][mw], 2 + odd);  // x at 8 mw + 2 odd + 4, + 5
    b0 = prmt(lo, hi, 0x5410);
    b1 = prmt(lo, hi, 0x7632);
  } else {
    // 4 bytes a weight word (k = 4 mw .. 4 mw + 3); A holds bytes odd and odd + 2, low nibbles in regs 0, 1 and
    // high nibbles in regs 2, 3, so both B registers are (x[4 mw + odd], x[4 mw + odd + 2])
    const int mw = step >> 1;
    const uint4& v = st.x[j][mw >> 1];
    const uint32_t lo = word(v, 2 * (mw & 1));      // x at 4 mw, + 1
    const uint32_t hi = word(v, 2 * (mw & 1) + 1);  // x at 4 mw + 2, + 3
    b0 = prmt(lo, hi, odd ? 0x7632 : 0x5410);
    b1 = b0;
  }
}

// The A fragment of k-step `step` for rows r (weight word w0) and r + 8 (w1).
template <typename T, Format F>
__device__ __forceinline__ void a_fragment(uint32_t w0, uint32_t w1, int odd, uint32_t& a0, uint32_t& a1,
                                           uint32_t& a2, uint32_t& a3) {
  if constexpr (F == Format::kInt4Awq) {
    if (odd) {
      a0 = nibbles<T, 8>(w0);
      a1 = nibbles<T, 8>(w1);
      a2 = nibbles<T, 12>(w0);
      a3 = nibbles<T, 12>(w1);
    } else {
      a0 = nibbles<T, 0>(w0);
      a1 = nibbles<T, 0>(w1);
      a2 = nibbles<T, 4>(w0);
      a3 = nibbles<T, 4>(w1);
    }
  } else {
    if (odd) {
      a0 = nibbles<T, 8>(w0);
      a1 = nibbles<T, 8>(w1);
      a2 = nibbles<T, 12, true>(w0);
      a3 = nibbles<T, 12, true>(w1);
    } else {
      a0 = nibbles<T, 0>(w0);
      a1 = nibbles<T, 0>(w1);
      a2 = nibbles<T, 4, true>(w0);
      a3 = nibbles<T, 4, true>(w1);
    }
  }
}

template <typename T, Format F, XMode XM, YMode YM, int RT, int NT, int WARPS, bool LOOP>
__global__ void __launch_bounds__(WARPS * 32) quant_gemv_kernel(const T* __restrict__ x, int64_t ldx,
                                                                 const uint8_t* __restrict__ qw, int64_t ldq,
                                                                 const float* __restrict__ scales, int64_t lds,
                                                                 const float* __restrict__ zeros, int64_t ldz,
                                                                 T* __restrict__ y, int64_t ldy, int m, int n,
                                                                 int items, int pdl, XArgs<T> xa, YEpilogue ye) {
  using StageT = Stage<F, RT, NT>;
  constexpr int kStages = Traits<F>::kStages;
  constexpr int kItemK = Traits<F>::kItemK;
  constexpr int kXVecs = Traits<F>::kXVecs;
  __shared__ float partial[WARPS][RT * 16][NT * 8];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int r = lane >> 2;
  const int t = lane & 3;
  // LOOP: the block takes row tiles blockIdx.x, + gridDim.x, ... and every warp has the same number of
  // items (the host asks items % WARPS == 0), so all warps reach each tile's end together; the loads of
  // the next tile's first items are in flight while the block adds up the current one.
  const int count = warp < items ? (items - warp + WARPS - 1) / WARPS : 0;  // this warp's items a tile
  // A row tile's units: 16 rows a sub-tile, or (kSwiGlu, kRope) 8 pairs of rows a sub-tile; kRope has n / 2 pairs
  constexpr int kTileUnits = YM == YMode::kPlain ? 16 * RT : 8 * RT;
  const int units = YM == YMode::kRope ? n / 2 : n;
  const int tiles = (units + kTileUnits - 1) / kTileUnits;
  const int half = ye.head_dim / 2;  // kRope
  const int my_tiles = LOOP ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 1;
  const int total = my_tiles * count;

  // A formed x (one token): the warps read it from shared memory (k elements, sized at the launch)
  extern __shared__ uint4 formed[];
  T* xs = reinterpret_cast<T*>(formed);
  const T* xrow[NT];
  bool xok[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int token = 8 * j + r;
    xok[j] = token < m;
    xrow[j] = XM != XMode::kPlain ? xs + (kItemK / 4) * t
                                   : x + static_cast<int64_t>(xok[j] ? token : 0) * ldx + (kItemK / 4) * t;
  }

  // Item f of this warp: row tile blockIdx.x + (f / count) * gridDim.x, item warp + WARPS * (f % count).
  // Rows past n read the last row (their sums are never stored), so no load needs a predicate. kSwiGlu: the
  // weight has 2n rows (gate, then up) and a 16-row tile takes 8 gate rows (A rows 0-7) and the up rows of the
  // same outputs (A rows 8-15), so that each lane holds both sums of an output in its accumulator. kRope: pair p
  // is dims j and j + half of head p / half (j = p % half), as A rows r and r + 8 likewise.
  auto load_static = [&](StageT& st, int f) {
    const int tile = blockIdx.x + (f / count) * gridDim.x;
    const int g = warp + WARPS * (f % count);
#pragma unroll
    for (int i = 0; i < RT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        int64_t row;
        if constexpr (YM == YMode::kSwiGlu) {
          row = min(tile * (8 * RT) + 8 * i + r, n - 1) + static_cast<int64_t>(h) * n;
        } else if constexpr (YM == YMode::kRope) {
          const int p = min(tile * (8 * RT) + 8 * i + r, units - 1);
          row = static_cast<int64_t>(p / half) * (2 * half) + p % half + h * half;
        } else {
          row = min(tile * (16 * RT) + 16 * i + r + 8 * h, n - 1);
        }
        st.w[i][h] = load_weights(qw + row * ldq + static_cast<int64_t>(g) * 64 + 16 * t);
        if constexpr (F == Format::kInt4Awq) {
          st.s[i][h] = __ldg(scales + row * lds + g);
          st.z[i][h] = __ldg(zeros + row * ldz + g);
        }
      }
    }
  };
  auto load_x = [&](StageT& st, int f) {
    const int g = warp + WARPS * (f % count);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint4* p = reinterpret_cast<const uint4*>(xrow[j] + static_cast<int64_t>(g) * kItemK);
#pragma unroll
      for (int q = 0; q < kXVecs; ++q) st.x[j][q] = xok[j] ? p[q] : make_uint4(0, 0, 0, 0);  // after the wait
    }
  };

  float acc[RT][NT][4];
  auto clear = [&]() {
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  };
  // The warps' sums of row tile `tile`, added in warp order (int8: times the row's scale) and rounded once;
  // kSwiGlu: the output is silu(gate) * up of the rounded sums, rounded as the silu_mul op rounds (silu to T,
  // then the product to T). kRope: q and k pairs rotated (`rope_pair`), k and v pairs also stored at the
  // token's cache slot. Syncs the block twice.
  auto finish = [&](int tile) {
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          partial[warp][16 * i + r + 8 * (e >> 1)][8 * j + 2 * t + (e & 1)] = acc[i][j][e];
    __syncthreads();
    if constexpr (YM == YMode::kRope) {
      const int out0 = tile * (8 * RT);
      for (int idx = threadIdx.x; idx < RT * 8 * NT * 8; idx += WARPS * 32) {
        const int o = idx / (NT * 8);  // the tile's pair: first-half sums at row 16 (o / 8) + o % 8, second 8 on
        const int token = idx % (NT * 8);
        const int row = 16 * (o / 8) + o % 8;
        const int p = out0 + o;
        if (token < m && p < units) {
          float a = 0.0f, b = 0.0f;
#pragma unroll
          for (int w = 0; w < WARPS; ++w) {
            a += partial[w][row][token];
            b += partial[w][row + 8][token];
          }
          const int head = p / half, j = p % half;
          T ra = from_float<T>(a), rb = from_float<T>(b);
          if (head < ye.hq + ye.hkv) rope_pair<T>(ye, token, j, half, ra, rb);
          const int64_t col = static_cast<int64_t>(head) * (2 * half) + j;
          y[static_cast<int64_t>(token) * ldy + col] = ra;
          y[static_cast<int64_t>(token) * ldy + col + half] = rb;
          const int64_t slot = head >= ye.hq ? ye.slots[token] : -1;
          if (slot >= 0) {
            const bool is_k = head < ye.hq + ye.hkv;
            T* cache = static_cast<T*>(is_k ? ye.k_cache : ye.v_cache);
            const int64_t at = (slot * ye.hkv + head - ye.hq - (is_k ? 0 : ye.hkv)) * (2 * half) + j;
            cache[at] = ra;
            cache[at + half] = rb;
          }
        }
      }
      __syncthreads();
      return;
    }
    if constexpr (YM == YMode::kSwiGlu) {
      const int out0 = tile * (8 * RT);
      for (int idx = threadIdx.x; idx < RT * 8 * NT * 8; idx += WARPS * 32) {
        const int o = idx / (NT * 8);  // the tile's output: gate sums at row 16 (o / 8) + o % 8, up 8 rows on
        const int token = idx % (NT * 8);
        const int row = 16 * (o / 8) + o % 8;
        if (token < m && out0 + o < n) {
          float g = 0.0f, u = 0.0f;
#pragma unroll
          for (int w = 0; w < WARPS; ++w) {
            g += partial[w][row][token];
            u += partial[w][row + 8][token];
          }
          g = to_float(from_float<T>(g));
          const float act = to_float(from_float<T>(__fdividef(g, 1.0f + __expf(-g))));
          y[static_cast<int64_t>(token) * ldy + out0 + o] = from_float<T>(act * to_float(from_float<T>(u)));
        }
      }
      __syncthreads();
      return;
    }
    const int row0 = tile * (16 * RT);
    for (int idx = threadIdx.x; idx < RT * 16 * NT * 8; idx += WARPS * 32) {
      const int row = idx / (NT * 8);
      const int token = idx % (NT * 8);
      if (token < m && row0 + row < n) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += partial[w][row][token];
        if constexpr (F == Format::kInt8) sum *= __ldg(scales + row0 + row);
        y[static_cast<int64_t>(token) * ldy + row0 + row] = from_float<T>(sum);
      }
    }
    __syncthreads();  // partial is free again
  };

  StageT ring[kStages];
  if (pdl == 3) {
#pragma unroll
    for (int s = 0; s < kStages; ++s)
      if (s < total) load_static(ring[s], s);
    grid_wait();
  } else {
    grid_wait();  // a no-op when launched without the PDL attribute
#pragma unroll
    for (int s = 0; s < kStages; ++s)
      if (s < total) load_static(ring[s], s);
  }
  if constexpr (XM != XMode::kPlain) {
    launch_dependents();  // before the prologue, so the next launch's early weights are not held back by it
    form_row<T, XM, WARPS>(x, xa, xs, items * kItemK);
  }
#pragma unroll
  for (int s = 0; s < kStages; ++s)
    if (s < total) load_x(ring[s], s);
  if constexpr (XM == XMode::kPlain) launch_dependents();
  clear();

#pragma unroll 1
  for (int f0 = 0; f0 < total; f0 += kStages) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      const int f = f0 + s;
      if (f >= total) break;
      StageT& st = ring[s];
      // The item's products apart from the row's sum: d[i][j] the sums of q x of rows r (e 0, 1) and r + 8
      // (e 2, 3) for tokens 2t, 2t + 1; for int4 also ones[j], each token's sum of x (a product of ones with
      // the same B, any row).
      float d[RT][NT][4];
      float ones[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ones[j][e] = 0.0f;
#pragma unroll
          for (int i = 0; i < RT; ++i) d[i][j][e] = 0.0f;
        }
#pragma unroll
      for (int step = 0; step < 8; ++step) {
        uint32_t b[NT][2];
#pragma unroll
        for (int j = 0; j < NT; ++j) b_fragment<F>(st, j, step, b[j][0], b[j][1]);
#pragma unroll
        for (int i = 0; i < RT; ++i) {
          uint32_t a0, a1, a2, a3;
          a_fragment<T, F>(word(st.w[i][0], step >> 1), word(st.w[i][1], step >> 1), step & 1, a0, a1, a2, a3);
#pragma unroll
          for (int j = 0; j < NT; ++j) mma16816<T>(d[i][j], a0, a1, a2, a3, b[j][0], b[j][1]);
        }
        if constexpr (F == Format::kInt4Awq) {
          constexpr uint32_t kOnes = Half16<T>::kOnes;
#pragma unroll
          for (int j = 0; j < NT; ++j) mma16816<T>(ones[j], kOnes, kOnes, kOnes, kOnes, b[j][0], b[j][1]);
        }
      }
      // int4: the group adds s * (d - z * ones). int8 (no zero point, one scale a row): the item's sum is added
      // as it is. Either way in float32 outside the tensor core, which truncates as it accumulates: a whole K
      // of int8 summed inside it put fp16 rows at K = 8192 3x further from the exact product than the float32
      // reference (H100); an item's 64 k do not.
#pragma unroll
      for (int i = 0; i < RT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if constexpr (F == Format::kInt4Awq) {
              const int h = e >> 1;
              acc[i][j][e] += st.s[i][h] * (d[i][j][e] - st.z[i][h] * ones[j][e & 1]);
            } else {
              acc[i][j][e] += d[i][j][e];
            }
          }
      if (f + kStages < total) {
        load_static(st, f + kStages);
        load_x(st, f + kStages);
      }
      if (LOOP && (f + 1) % count == 0) {  // the last item of a tile (the same f in every warp)
        finish(blockIdx.x + (f / count) * gridDim.x);
        clear();
      }
    }
  }
  if (!LOOP) finish(blockIdx.x);
}

// A launch's operands, as `int4_gemv` and `int8_gemv` take them (int8: no zeros, scales one a row), passed
// down the dispatch on the templates' parameters.
struct Operands {
  const void* x;
  int64_t ldx;
  const uint8_t* qw;
  int64_t ldq;
  const float* scales;
  int64_t lds;
  const float* zeros;
  int64_t ldz;
  void* y;
  int64_t ldy;
  int m, n, k, pdl;
  XPrologue xp;
  YEpilogue ye;  // int4, plain x: what is stored (kSwiGlu: n outputs of a weight of 2n rows)
  cudaStream_t stream;
};

template <typename T, Format F, XMode XM, YMode YM, int RT, int NT, int WARPS, bool LOOP>
cudaError_t launch(const Operands& o) {
  const auto kernel = quant_gemv_kernel<T, F, XM, YM, RT, NT, WARPS, LOOP>;
  const int items = o.k / Traits<F>::kItemK;
  const int tile_units = YM == YMode::kPlain ? 16 * RT : 8 * RT;
  const int units = YM == YMode::kRope ? o.n / 2 : o.n;
  const int tiles = (units + tile_units - 1) / tile_units;
  const size_t smem = XM != XMode::kPlain ? static_cast<size_t>(o.k) * sizeof(T) : 0;  // the formed row
  int blocks = tiles;
  if constexpr (LOOP) {
    if (items % WARPS != 0) return cudaErrorInvalidValue;  // warps must have equal shares of a tile
    int device = 0, sms = 0, per_sm = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, WARPS * 32, smem);
    if (err != cudaSuccess) return err;
    blocks = min(tiles, max(1, per_sm) * sms);  // resident at once: each loops over its share of the tiles
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(WARPS * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = o.stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = o.pdl > 0 ? 1 : 0;
  const XArgs<T> xa{XM == XMode::kGated ? static_cast<int64_t>(o.k) : 0, static_cast<const T*>(o.xp.residual),
                    static_cast<const T*>(o.xp.weight), static_cast<T*>(o.xp.h), o.xp.eps};
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<const T*>(o.x), o.ldx, o.qw, o.ldq, o.scales, o.lds, o.zeros,
                            o.ldz, static_cast<T*>(o.y), o.ldy, o.m, o.n, items, o.pdl, xa, o.ye);
}

template <typename T, Format F, XMode XM, YMode SW, int RT, int NT, bool LOOP>
cudaError_t by_warps(int warps, const Operands& o) {
  switch (warps) {
    case 4: return launch<T, F, XM, SW, RT, NT, 4, LOOP>(o);
    case 8: return launch<T, F, XM, SW, RT, NT, 8, LOOP>(o);
    case 16:  // 512 threads leave 128 registers a thread: only one row tile and one token tile fit unspilled
      if constexpr (RT == 1 && NT == 1) return launch<T, F, XM, SW, RT, NT, 16, LOOP>(o);
      return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, Format F, XMode XM, YMode SW, int RT, int NT>
cudaError_t by_loop(bool loop, int warps, const Operands& o) {
  return loop ? by_warps<T, F, XM, SW, RT, NT, true>(warps, o) : by_warps<T, F, XM, SW, RT, NT, false>(warps, o);
}

// A formed x (gated, normed) is one token: one token tile. The other stores (YEpilogue) take a plain x.
template <typename T, Format F, XMode XM, YMode SW = YMode::kPlain>
cudaError_t by_tiles(int rows_per_block, int warps, bool loop, const Operands& o) {
  const bool wide = o.m > 8;
  if constexpr (XM != XMode::kPlain) {
    // one row that fits shared memory (`dispatch` has made k a multiple of the item, so of 8 as form_row needs)
    if (o.m != 1 || static_cast<size_t>(o.k) * sizeof(T) > kMaxFormedBytes) return cudaErrorInvalidValue;
    if (rows_per_block == 16) return by_loop<T, F, XM, SW, 1, 1>(loop, warps, o);
    if (rows_per_block == 32) return by_loop<T, F, XM, SW, 2, 1>(loop, warps, o);
  } else {
    if (rows_per_block == 16)
      return wide ? by_loop<T, F, XM, SW, 1, 2>(loop, warps, o) : by_loop<T, F, XM, SW, 1, 1>(loop, warps, o);
    if (rows_per_block == 32)
      return wide ? by_loop<T, F, XM, SW, 2, 2>(loop, warps, o) : by_loop<T, F, XM, SW, 2, 1>(loop, warps, o);
  }
  return cudaErrorInvalidValue;
}

template <typename T, Format F>
cudaError_t by_mode(int rows_per_block, int warps, bool loop, const Operands& o) {
  if (o.ye.mode != YMode::kPlain) {
    if constexpr (F == Format::kInt4Awq) {
      if (o.xp.mode != XMode::kPlain) return cudaErrorInvalidValue;
      if (o.ye.mode == YMode::kSwiGlu)
        return by_tiles<T, F, XMode::kPlain, YMode::kSwiGlu>(rows_per_block, warps, loop, o);
      const int d = o.ye.head_dim;
      if (d < 16 || d % 16 != 0 || o.ye.hq < 0 || o.ye.hkv < 1 || o.n != (o.ye.hq + 2 * o.ye.hkv) * d)
        return cudaErrorInvalidValue;
      return by_tiles<T, F, XMode::kPlain, YMode::kRope>(rows_per_block, warps, loop, o);
    }
    return cudaErrorInvalidValue;
  }
  switch (o.xp.mode) {
    case XMode::kPlain: return by_tiles<T, F, XMode::kPlain>(rows_per_block, warps, loop, o);
    case XMode::kGated:
      if constexpr (F == Format::kInt4Awq) return by_tiles<T, F, XMode::kGated>(rows_per_block, warps, loop, o);
      return cudaErrorInvalidValue;
    case XMode::kNormed:
      if constexpr (F == Format::kInt4Awq) return by_tiles<T, F, XMode::kNormed>(rows_per_block, warps, loop, o);
      return cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;
}

template <Format F>
cudaError_t dispatch(DType dtype, int rows_per_block, int warps, bool loop, const Operands& o) {
  constexpr int kItemK = Traits<F>::kItemK;
  if (o.m < 1 || o.m > 16 || o.n < 1 || o.k < kItemK || o.k % kItemK != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kBFloat16: return by_mode<__nv_bfloat16, F>(rows_per_block, warps, loop, o);
    case DType::kFloat16: return by_mode<__half, F>(rows_per_block, warps, loop, o);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t int4_gemv(const void* x, int64_t ldx, const uint8_t* qweight, int64_t ldq, const float* scales,
                      int64_t lds, const float* zeros, int64_t ldz, void* y, int64_t ldy, int m, int n, int k,
                      int rows_per_block, int warps, bool loop, int pdl, const XPrologue& xp, const YEpilogue& ye,
                      DType dtype, cudaStream_t stream) {
  const Operands o{x, ldx, qweight, ldq, scales, lds, zeros, ldz, y, ldy, m, n, k, pdl, xp, ye, stream};
  return dispatch<Format::kInt4Awq>(dtype, rows_per_block, warps, loop, o);
}

cudaError_t int8_gemv(const void* x, int64_t ldx, const int8_t* weight, int64_t ldw, const float* scale, void* y,
                      int64_t ldy, int m, int n, int k, int rows_per_block, int warps, bool loop, int pdl, DType dtype,
                      cudaStream_t stream) {
  const Operands o{x, ldx, reinterpret_cast<const uint8_t*>(weight), ldw, scale, 1, nullptr, 0, y, ldy, m, n, k, pdl,
                   XPrologue{}, YEpilogue{}, stream};
  return dispatch<Format::kInt8>(dtype, rows_per_block, warps, loop, o);
}

}  // namespace tessera
