// pybind11 bindings of the raw CUDA kernels: tensor checks, output allocation, the current stream, and
// an NVTX range around every launch so profiles name the op.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <nvtx3/nvToolsExt.h>
#include <torch/extension.h>

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Tessera CUDA C++ kernels: rms_norm, rms_norm_residual, attention_prefill";
  m.def("rms_norm", &rms_norm, "y = rms_norm(x, weight, eps)");
  m.def("rms_norm_residual", &rms_norm_residual, "(y, h) = rms_norm_residual(x, residual, weight, eps)");
  m.def("attention_prefill", &attention_prefill, "o = attention_prefill(q, k, v, cu_seqlens, max_seqlen, causal, scale)");
}
