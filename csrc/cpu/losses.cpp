// Loss family, CPU kernels: fused elementwise forward and backward, vectorised
// (branch-free exp/log from csrc/common, AVX2 clones).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <type_traits>

#include "common/losses.h"

namespace pyvision_ops {
namespace {

template <typename scalar_t, typename T, bool SQUARE>
__attribute__((target_clones("avx2", "default"))) void focal_forward(const scalar_t* __restrict__ x,
                                                                     const scalar_t* __restrict__ t, int64_t n,
                                                                     T alpha, T gamma, scalar_t* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(losses::focal_loss<SQUARE, T>(T(x[i]), T(t[i]), alpha, gamma));
}

template <typename scalar_t, typename T, bool SQUARE>
__attribute__((target_clones("avx2", "default"))) void focal_backward(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, const scalar_t* __restrict__ t, int64_t n, T alpha,
    T gamma, scalar_t* __restrict__ dx, scalar_t* __restrict__ dt) {
  for (int64_t i = 0; i < n; ++i) {
    T a, b;
    losses::focal_grad<SQUARE, T>(T(x[i]), T(t[i]), alpha, gamma, T(g[i]), a, b);
    dx[i] = static_cast<scalar_t>(a);
    dt[i] = static_cast<scalar_t>(b);
  }
}

void check_focal(const char* op, const at::Tensor& inputs, const at::Tensor& targets) {
  TORCH_CHECK(at::isFloatingType(inputs.scalar_type()), op, ": inputs must be floating point");
  TORCH_CHECK(targets.scalar_type() == inputs.scalar_type(), op, ": targets must have the dtype of inputs");
  TORCH_CHECK(targets.sizes() == inputs.sizes(), op, ": targets must have the shape of inputs");
}

at::Tensor sigmoid_focal_loss_cpu(const at::Tensor& inputs, const at::Tensor& targets, double alpha, double gamma) {
  check_focal("sigmoid_focal_loss", inputs, targets);
  const auto x = inputs.contiguous(), t = targets.contiguous();
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigmoid_focal_loss_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pt = t.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
      if (gamma == 2.0) {
        focal_forward<scalar_t, T, true>(px + lo, pt + lo, hi - lo, T(alpha), T(gamma), po + lo);
      } else {
        focal_forward<scalar_t, T, false>(px + lo, pt + lo, hi - lo, T(alpha), T(gamma), po + lo);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& inputs,
                                                                   const at::Tensor& targets, double alpha,
                                                                   double gamma) {
  check_focal("sigmoid_focal_loss_backward", inputs, targets);
  TORCH_CHECK(grad.sizes() == inputs.sizes() && grad.scalar_type() == inputs.scalar_type(),
              "sigmoid_focal_loss_backward: grad must have the shape and dtype of inputs");
  const auto x = inputs.contiguous(), t = targets.contiguous(), g = grad.contiguous();
  auto dx = at::empty_like(x), dt = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigmoid_focal_loss_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
      auto run = [&](auto square) {
        focal_backward<scalar_t, T, decltype(square)::value>(
            g.const_data_ptr<scalar_t>() + lo, x.const_data_ptr<scalar_t>() + lo, t.const_data_ptr<scalar_t>() + lo,
            hi - lo, T(alpha), T(gamma), dx.mutable_data_ptr<scalar_t>() + lo, dt.mutable_data_ptr<scalar_t>() + lo);
      };
      if (gamma == 2.0) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
  return {dx, dt};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CPU, m) {
  m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cpu);
  m.impl("sigmoid_focal_loss_backward", &sigmoid_focal_loss_backward_cpu);
}

}  // namespace pyvision_ops
