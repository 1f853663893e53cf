// pybind11 bindings of the raw CUDA kernels: tensor checks, output allocation, the current stream, and
// an NVTX range around every launch so profiles name the op.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <nvtx3/nvToolsExt.h>
#include <torch/extension.h>

#include <optional>
#include <utility>

#include "kernels.h"

namespace {

tessera::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return tessera::DType::kFloat32;
    case at::kHalf: return tessera::DType::kFloat16;
    case at::kBFloat16: return tessera::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, name, ".dtype=", t.scalar_type(), " is not float32/float16/bfloat16");
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
};

at::Tensor rows_of(const at::Tensor& x) {
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  return x2.stride(-1) == 1 ? x2 : x2.contiguous();
}

void norm_launch(const at::Tensor& x2, const at::Tensor* r2, const at::Tensor& w, at::Tensor& y, at::Tensor* h,
                 double eps) {
  check_cuda(tessera::rms_norm(x2.data_ptr(), r2 ? r2->data_ptr() : nullptr, w.data_ptr(), y.data_ptr(),
                               h ? h->data_ptr() : nullptr, x2.size(0), static_cast<int>(x2.size(1)), x2.stride(0),
                               r2 ? r2->stride(0) : 0, y.stride(0), h ? h->stride(0) : 0, static_cast<float>(eps),
                               dtype_of(x2, "x"), dtype_of(w, "weight"), at::cuda::getCurrentCUDAStream()),
             "rms_norm launch");
}

void check_norm_args(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda(), "rms_norm needs CUDA tensors");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "weight.shape=", w.sizes(), " does not match x's last dim ",
              x.size(-1));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_norm_args(x, w);
  const c10::cuda::CUDAGuard guard(x.device());
  const NvtxRange range("tessera::rms_norm");
  const at::Tensor x2 = rows_of(x);
  at::Tensor y = at::empty_like(x2);
  norm_launch(x2, nullptr, w.contiguous(), y, nullptr, eps);
  return y.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> rms_norm_residual(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w,
                                                     double eps) {
  check_norm_args(x, w);
  TORCH_CHECK(r.sizes() == x.sizes() && r.scalar_type() == x.scalar_type(), "residual ", r.sizes(), "/",
              r.scalar_type(), " differs from x ", x.sizes(), "/", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const NvtxRange range("tessera::rms_norm_residual");
  const at::Tensor x2 = rows_of(x), r2 = rows_of(r);
  at::Tensor y = at::empty_like(x2), h = at::empty_like(x2);
  norm_launch(x2, &r2, w.contiguous(), y, &h, eps);
  return {y.view(x.sizes()), h.view(x.sizes())};
}

at::Tensor attention_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, int64_t max_seqlen, bool causal, double scale) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && cu_seqlens.is_cuda(), "attention needs CUDA tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && k.size(0) == q.size(0) &&
                  k.size(2) == q.size(2),
              "shapes q=", q.sizes(), " k=", k.sizes(), " v=", v.sizes(), " are not [N, H, D]");
  TORCH_CHECK(q.size(2) <= 128, "head dim ", q.size(2), " > 128");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v dtypes differ");
  const c10::cuda::CUDAGuard guard(q.device());
  const NvtxRange range("tessera::attention_prefill");
  const at::Tensor qc = q.stride(-1) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(-1) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(-1) == 1 ? v : v.contiguous();
  const at::Tensor cu = cu_seqlens.to(at::kInt).contiguous();
  at::Tensor o = at::empty_like(qc);
  check_cuda(tessera::attention_forward(
                 qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), o.data_ptr(), cu.data_ptr<int32_t>(),
                 static_cast<int>(cu.size(0) - 1), static_cast<int>(max_seqlen), static_cast<int>(q.size(1)),
                 static_cast<int>(k.size(1)), static_cast<int>(q.size(2)), qc.stride(0), qc.stride(1), kc.stride(0),
                 kc.stride(1), vc.stride(0), vc.stride(1), o.stride(0), o.stride(1), causal, static_cast<float>(scale),
                 dtype_of(q, "q"), at::cuda::getCurrentCUDAStream()),
             "attention launch");
  return o;
}

// The quantized GEMVs' shared checks, after each has checked its tensors are CUDA and 2-D: x [m, k] bf16 or
// fp16 with 1 <= m <= 16 and contiguous 16-byte aligned rows, the weight's rows contiguous and 16-byte aligned,
// y a row-major [m, n] of x's dtype (n: the weight's rows, or half of them for a SwiGLU output).
void check_gemv_operands(const char* op, const at::Tensor& x, const at::Tensor& weight, const char* weight_name,
                         const at::Tensor& y, int64_t n) {
  const int64_t m = x.size(0);
  TORCH_CHECK(m >= 1 && m <= 16, op, " takes 1 to 16 rows of x, got x.shape[0]=", m);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x.dtype=", x.scalar_type(),
              " is not bfloat16/float16");
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.size(0) == m && y.size(1) == n && y.stride(1) == 1,
              "y ", y.sizes(), "/", y.scalar_type(), " is not a row-major [", m, ", ", n, "] of x's dtype");
  TORCH_CHECK(x.stride(1) == 1 && weight.stride(1) == 1, "x and ", weight_name, " need contiguous rows");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (x.stride(0) * 2) % 16 == 0,
              "x rows must be 16-byte aligned");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0 && weight.stride(0) % 16 == 0,
              weight_name, " rows must be 16-byte aligned");
}

// int4_gemv's x prologue (kernels.h, XPrologue), for one row of x: gated, x a fused gate/up output [1, 2K]; or,
// with residual, weight and h, normed: each a contiguous 16-byte aligned row of K in x's dtype (weight 1-D).
tessera::XPrologue x_prologue(const at::Tensor& x, int64_t k, bool gated, const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& h,
                              double eps) {
  tessera::XPrologue xp;
  const bool normed = residual.has_value() || weight.has_value() || h.has_value();
  if (!gated && !normed) return xp;
  TORCH_CHECK(!(gated && normed), "int4_gemv: gated and normed x are exclusive");
  TORCH_CHECK(x.size(0) == 1, "int4_gemv: a gated or normed x is one row, got x.shape=", x.sizes());
  TORCH_CHECK(k * 2 <= static_cast<int64_t>(tessera::kMaxFormedBytes), "int4_gemv: a gated or normed x of K=", k,
              " exceeds ", tessera::kMaxFormedBytes / 2, " elements");
  if (gated) {
    xp.mode = tessera::XMode::kGated;
    return xp;
  }
  TORCH_CHECK(residual.has_value() && weight.has_value() && h.has_value(),
              "int4_gemv: a normed x needs residual, weight and h together");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"residual", &*residual},
                                {"weight", &*weight}, {"h", &*h}}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == x.scalar_type() && t->numel() == k && t->is_contiguous() &&
                    reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "int4_gemv: ", name, " ", t->sizes(), "/", t->scalar_type(),
                " is not a contiguous 16-byte aligned row of K=", k, " in x's dtype");
  }
  return {tessera::XMode::kNormed, residual->data_ptr(), weight->data_ptr(), h->data_ptr(), static_cast<float>(eps)};
}

// The checks every int4_gemv launch makes; K of the product (half a gated x's width). y has y_cols columns.
int64_t check_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                   const at::Tensor& y, bool gated, int64_t y_cols) {
  TORCH_CHECK(x.is_cuda() && qweight.is_cuda() && scales.is_cuda() && zeros.is_cuda() && y.is_cuda(),
              "int4_gemv needs CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && y.dim() == 2, "x, qweight and y must be 2-D, got x=", x.sizes(),
              " qweight=", qweight.sizes(), " y=", y.sizes());
  check_gemv_operands("int4_gemv", x, qweight, "qweight", y, y_cols);
  const int64_t k = gated ? x.size(1) / 2 : x.size(1), n = qweight.size(0);
  TORCH_CHECK(k % 128 == 0 && qweight.size(1) * 2 == k && x.size(1) == (gated ? 2 * k : k), "x.shape[1]=",
              x.size(1), gated ? " must be twice K" : " must be K", ", a multiple of 128 and twice qweight.shape[1]=",
              qweight.size(1));
  TORCH_CHECK(scales.sizes() == zeros.sizes() && scales.size(0) == n && scales.size(1) * 128 == k,
              "scales/zeros shapes ", scales.sizes(), "/", zeros.sizes(), " are not [N, K / 128] = [", n, ", ", k / 128,
              "]");
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "qweight.dtype=", qweight.scalar_type(), " is not uint8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kFloat, "scales/zeros dtypes ",
              scales.scalar_type(), "/", zeros.scalar_type(), " are not float32");
  TORCH_CHECK(scales.stride(1) == 1 && zeros.stride(1) == 1, "scales and zeros need contiguous rows");
  return k;
}

void launch_int4(const char* name, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const at::Tensor& zeros, const at::Tensor& y, int64_t n, int64_t k, int64_t rows_per_block,
                 int64_t warps, bool loop, int64_t pdl, const tessera::XPrologue& xp, const tessera::YEpilogue& ye) {
  const c10::cuda::CUDAGuard guard(x.device());
  const NvtxRange range(name);
  check_cuda(tessera::int4_gemv(x.data_ptr(), x.stride(0), qweight.data_ptr<uint8_t>(), qweight.stride(0),
                                scales.data_ptr<float>(), scales.stride(0), zeros.data_ptr<float>(), zeros.stride(0),
                                y.data_ptr(), y.stride(0), static_cast<int>(x.size(0)), static_cast<int>(n),
                                static_cast<int>(k), static_cast<int>(rows_per_block), static_cast<int>(warps), loop,
                                static_cast<int>(pdl), xp, ye, dtype_of(x, "x"), at::cuda::getCurrentCUDAStream()),
             "int4_gemv launch");
}

void int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
               const at::Tensor& y, int64_t rows_per_block, int64_t warps, bool loop, int64_t pdl, bool gated,
               const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
               const std::optional<at::Tensor>& h, double eps, bool swiglu) {
  TORCH_CHECK(!swiglu || (qweight.size(0) % 2 == 0 && !gated && !residual && !weight && !h),
              "int4_gemv: swiglu needs a plain x and a fused gate/up qweight of an even row count, got qweight.shape=",
              qweight.sizes());
  const int64_t n = swiglu ? qweight.size(0) / 2 : qweight.size(0);
  const int64_t k = check_int4(x, qweight, scales, zeros, y, gated, n);
  const tessera::XPrologue xp = x_prologue(x, k, gated, residual, weight, h, eps);
  tessera::YEpilogue ye;
  if (swiglu) ye.mode = tessera::YMode::kSwiGlu;
  const char* name = swiglu                              ? "tessera::int4_gemv_swiglu"
                     : xp.mode == tessera::XMode::kGated  ? "tessera::int4_gemv_gated"
                     : xp.mode == tessera::XMode::kNormed ? "tessera::int4_gemv_normed"
                                                          : "tessera::int4_gemv";
  launch_int4(name, x, qweight, scales, zeros, y, n, k, rows_per_block, warps, loop, pdl, xp, ye);
}

// y = the product with a fused q/k/v int4 weight, q and k rotated by rope (cos/sin [M, D] in x's dtype), and the
// rotated k and v rows stored at slots [M] (int64; negative: none) of k_cache/v_cache [..., hkv, D] (contiguous,
// x's dtype).
void int4_gemv_rope(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                    const at::Tensor& y, int64_t rows_per_block, int64_t warps, bool loop, int64_t pdl,
                    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slots, int64_t hq, int64_t hkv) {
  const int64_t n = qweight.size(0), m = x.size(0);
  const int64_t k = check_int4(x, qweight, scales, zeros, y, false, n);
  TORCH_CHECK(hq >= 0 && hkv >= 1 && n % (hq + 2 * hkv) == 0, "int4_gemv_rope: qweight.shape[0]=", n,
              " is not (hq + 2 hkv) * head_dim for hq=", hq, ", hkv=", hkv);
  const int64_t d = n / (hq + 2 * hkv);
  TORCH_CHECK(d % 16 == 0, "int4_gemv_rope: head_dim=", d, " is not a multiple of 16");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"cos", &cos}, {"sin", &sin}}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == x.scalar_type() && t->dim() == 2 && t->size(0) == m &&
                    t->size(1) == d && t->stride(1) == 1 && t->stride(0) == cos.stride(0),
                "int4_gemv_rope: ", name, " ", t->sizes(), "/", t->scalar_type(), " is not [M=", m, ", head_dim=", d,
                "] in x's dtype with contiguous rows (and cos's row stride)");
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"k_cache", &k_cache},
                                {"v_cache", &v_cache}}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == x.scalar_type() && t->is_contiguous() && t->dim() >= 3 &&
                    t->size(-1) == d && t->size(-2) == hkv && t->sizes() == k_cache.sizes(),
                "int4_gemv_rope: ", name, " ", t->sizes(), "/", t->scalar_type(), " is not a contiguous [..., hkv=",
                hkv, ", head_dim=", d, "] in x's dtype (as k_cache)");
  }
  TORCH_CHECK(slots.is_cuda() && slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == m &&
                  slots.stride(0) == 1,
              "int4_gemv_rope: slots ", slots.sizes(), "/", slots.scalar_type(), " is not a contiguous int64 [M=", m,
              "]");
  tessera::YEpilogue ye;
  ye.mode = tessera::YMode::kRope;
  ye.cos = cos.data_ptr();
  ye.sin = sin.data_ptr();
  ye.ld_cs = cos.stride(0);
  ye.k_cache = k_cache.data_ptr();
  ye.v_cache = v_cache.data_ptr();
  ye.slots = slots.data_ptr<int64_t>();
  ye.hq = static_cast<int>(hq);
  ye.hkv = static_cast<int>(hkv);
  ye.head_dim = static_cast<int>(d);
  launch_int4("tessera::int4_gemv_rope", x, qweight, scales, zeros, y, n, k, rows_per_block, warps, loop, pdl,
              tessera::XPrologue{}, ye);
}

void int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& y,
               int64_t rows_per_block, int64_t warps, bool loop, int64_t pdl) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda() && scale.is_cuda() && y.is_cuda(), "int8_gemv needs CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && y.dim() == 2 && scale.dim() == 1,
              "x, weight and y must be 2-D and scale 1-D, got x=", x.sizes(), " weight=", weight.sizes(), " y=",
              y.sizes(), " scale=", scale.sizes());
  check_gemv_operands("int8_gemv", x, weight, "weight", y, weight.size(0));
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(k % 64 == 0 && weight.size(1) == k, "x.shape[1]=", k, " must be a multiple of 64 and equal ",
              "weight.shape[1]=", weight.size(1));
  TORCH_CHECK(weight.scalar_type() == at::kChar, "weight.dtype=", weight.scalar_type(), " is not int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.size(0) == n && scale.stride(0) == 1, "scale ",
              scale.sizes(), "/", scale.scalar_type(), " is not a contiguous float32 [N = ", n, "]");
  const c10::cuda::CUDAGuard guard(x.device());
  const NvtxRange range("tessera::int8_gemv");
  check_cuda(tessera::int8_gemv(x.data_ptr(), x.stride(0), weight.data_ptr<int8_t>(), weight.stride(0),
                                scale.data_ptr<float>(), y.data_ptr(), y.stride(0), static_cast<int>(m),
                                static_cast<int>(n), static_cast<int>(k), static_cast<int>(rows_per_block),
                                static_cast<int>(warps), loop, static_cast<int>(pdl), dtype_of(x, "x"),
                                at::cuda::getCurrentCUDAStream()),
             "int8_gemv launch");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Tessera CUDA C++ kernels: rms_norm, rms_norm_residual, attention_prefill, int4_gemv, int4_gemv_rope, "
            "int8_gemv";
  m.def("rms_norm", &rms_norm, "y = rms_norm(x, weight, eps)");
  m.def("rms_norm_residual", &rms_norm_residual, "(y, h) = rms_norm_residual(x, residual, weight, eps)");
  m.def("attention_prefill", &attention_prefill, "o = attention_prefill(q, k, v, cu_seqlens, max_seqlen, causal, scale)");
  m.def("int4_gemv", &int4_gemv,
        "int4_gemv(x, qweight, scales, zeros, y, rows_per_block, warps, loop, pdl, gated, residual, weight, h, eps, "
        "swiglu): y = x @ W.T, x formed as silu_mul of its halves (gated) or rms_norm_residual's output (residual, "
        "weight, h); swiglu: y = silu_mul of the product's halves (W a fused gate/up weight)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("y"), py::arg("rows_per_block"),
        py::arg("warps"), py::arg("loop"), py::arg("pdl"), py::arg("gated") = false, py::arg("residual") = py::none(),
        py::arg("weight") = py::none(), py::arg("h") = py::none(), py::arg("eps") = 1e-6, py::arg("swiglu") = false);
  m.def("int4_gemv_rope", &int4_gemv_rope,
        "int4_gemv_rope(x, qweight, scales, zeros, y, rows_per_block, warps, loop, pdl, cos, sin, k_cache, v_cache, "
        "slots, hq, hkv): y = x @ W.T of a fused q/k/v weight, q and k rotated by rope, k and v stored at slots");
  m.def("int8_gemv", &int8_gemv, "int8_gemv(x, weight, scale, y, rows_per_block, warps, loop, pdl): y = x @ W.T");
}
