// Bilinear interpolation, CPU kernels. Separable: each output row is a blend of two input
// rows (a contiguous, vectorised pass), then a gather along the row. The backward is
// gather-based per (image, channel) plane, in a fixed order: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "common/interpolate.h"
#include "common/parallel.h"

namespace pyvision_ops {
namespace {

using interp::Tap;

at::Tensor upsample_bilinear_cpu(const at::Tensor& input, int64_t out_h, int64_t out_w, bool align_corners,
                                 double scale_h, double scale_w) {
  TORCH_CHECK(input.dim() == 4, "upsample_bilinear: input must be [N, C, H, W]");
  TORCH_CHECK(out_h > 0 && out_w > 0, "upsample_bilinear: output size must be positive");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK(H > 0 && W > 0, "upsample_bilinear: input spatial size must be positive");
  const auto x = input.contiguous();
  auto out = at::empty({N, C, out_h, out_w}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_bilinear_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto ty = interp::axis_taps<T>(H, out_h, align_corners, scale_h);
    const auto tx = interp::axis_taps<T>(W, out_w, align_corners, scale_w);
    const scalar_t* pi = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, grain_for(N * C, 4 * out.numel()), [&](int64_t lo, int64_t hi) {
      std::vector<T> row(W);
      for (int64_t p = lo; p < hi; ++p) {
        const scalar_t* plane = pi + p * H * W;
        scalar_t* o = po + p * out_h * out_w;
        for (int64_t oy = 0; oy < out_h; ++oy) {
          const Tap<T> a = ty[oy];
          const scalar_t* r0 = plane + a.i0 * W;
          const scalar_t* r1 = plane + a.i1 * W;
          for (int64_t x = 0; x < W; ++x) row[x] = a.w0 * T(r0[x]) + a.w1 * T(r1[x]);
          scalar_t* orow = o + oy * out_w;
          for (int64_t ox = 0; ox < out_w; ++ox) {
            const Tap<T> b = tx[ox];
            orow[ox] = static_cast<scalar_t>(b.w0 * row[b.i0] + b.w1 * row[b.i1]);
          }
        }
      }
    });
  });
  return out;
}

at::Tensor upsample_bilinear_backward_cpu(const at::Tensor& grad, int64_t in_h, int64_t in_w, bool align_corners,
                                          double scale_h, double scale_w) {
  TORCH_CHECK(grad.dim() == 4, "upsample_bilinear_backward: grad must be [N, C, H_out, W_out]");
  TORCH_CHECK(in_h > 0 && in_w > 0, "upsample_bilinear_backward: input size must be positive");
  const int64_t N = grad.size(0), C = grad.size(1), OH = grad.size(2), OW = grad.size(3);
  const auto g = grad.contiguous();
  auto gin = at::empty({N, C, in_h, in_w}, g.options());
  if (gin.numel() == 0) return gin;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "upsample_bilinear_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto ty = interp::axis_taps<T>(in_h, OH, align_corners, scale_h);
    const auto tx = interp::axis_taps<T>(in_w, OW, align_corners, scale_w);
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    scalar_t* pi = gin.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, grain_for(N * C, 4 * g.numel() + gin.numel()), [&](int64_t lo, int64_t hi) {
      std::vector<T> plane(in_h * in_w), row(in_w);
      for (int64_t p = lo; p < hi; ++p) {
        std::fill(plane.begin(), plane.end(), T(0));
        const scalar_t* gp = pg + p * OH * OW;
        for (int64_t oy = 0; oy < OH; ++oy) {
          std::fill(row.begin(), row.end(), T(0));
          const scalar_t* grow = gp + oy * OW;
          interp::scatter_axis(tx.data(), grow, OW, in_w, row.data());
          const Tap<T> a = ty[oy];
          T* d0 = plane.data() + a.i0 * in_w;
          T* d1 = plane.data() + a.i1 * in_w;
          for (int64_t x = 0; x < in_w; ++x) d0[x] += a.w0 * row[x];
          for (int64_t x = 0; x < in_w; ++x) d1[x] += a.w1 * row[x];
        }
        scalar_t* dst = pi + p * in_h * in_w;
        for (int64_t i = 0; i < in_h * in_w; ++i) dst[i] = static_cast<scalar_t>(plane[i]);
      }
    });
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CPU, m) {
  m.impl("upsample_bilinear", &upsample_bilinear_cpu);
  m.impl("upsample_bilinear_backward", &upsample_bilinear_backward_cpu);
}

}  // namespace pyvision_ops
