// Box IoU family, CPU kernels: one pass over the output, no temporaries.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/box_iou.h"

namespace pyvision_ops {
namespace {

using box::Box;

void check_kind(int64_t kind) {
  // std::to_string: see common/text.h.
  TORCH_CHECK(kind >= 0 && kind <= 3, "pyvision_ops: box kind must be 0..3 (iou, giou, diou, ciou), got ",
              std::to_string(kind));
}

at::ScalarType out_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename scalar_t, typename acc_t>
Box<acc_t> load_box(const scalar_t* p) {
  return {acc_t(p[0]), acc_t(p[1]), acc_t(p[2]), acc_t(p[3])};
}

// One output row: box `a` against the M boxes of `soa` (x1[M], y1[M], x2[M], y2[M], atan[M]).
// Built twice, for AVX2 and for the baseline ISA; the loader picks one at run time.
template <typename T, int KIND>
__attribute__((target_clones("avx2", "default"))) void pairwise_row(const Box<T> a, T atan_a,
                                                                    const T* __restrict__ soa, int64_t M, T eps,
                                                                    T* __restrict__ out) {
  const T* __restrict__ x1 = soa;
  const T* __restrict__ y1 = soa + M;
  const T* __restrict__ x2 = soa + 2 * M;
  const T* __restrict__ y2 = soa + 3 * M;
  const T* __restrict__ tb = soa + 4 * M;
  for (int64_t m = 0; m < M; ++m) {
    out[m] = box::pair_value<T, KIND, false>(a, Box<T>{x1[m], y1[m], x2[m], y2[m]}, atan_a, tb[m], eps);
  }
}

at::Tensor pairwise_box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2, int64_t kind, double eps) {
  TORCH_CHECK(boxes1.dim() == 3 && boxes1.size(2) == 4, "pairwise_box_iou: boxes1 must be [B, N, 4]");
  TORCH_CHECK(boxes2.dim() == 3 && boxes2.size(2) == 4, "pairwise_box_iou: boxes2 must be [B, M, 4]");
  TORCH_CHECK(boxes1.size(0) == boxes2.size(0), "pairwise_box_iou: batch sizes differ");
  TORCH_CHECK(boxes1.scalar_type() == boxes2.scalar_type(), "pairwise_box_iou: boxes1 and boxes2 dtypes differ");
  check_kind(kind);
  const int64_t B = boxes1.size(0), N = boxes1.size(1), M = boxes2.size(1);
  auto out = at::empty({B, N, M}, boxes1.options().dtype(out_dtype(boxes1.scalar_type())));
  if (out.numel() == 0) return out;
  auto b1 = boxes1.contiguous();
  auto b2 = boxes2.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b1.scalar_type(), "pairwise_box_iou_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p1 = b1.const_data_ptr<scalar_t>();
    const scalar_t* p2 = b2.const_data_ptr<scalar_t>();
    acc_t* po = out.mutable_data_ptr<acc_t>();
    const acc_t e = static_cast<acc_t>(eps);
    // boxes2 as structure-of-arrays so the inner loop over M vectorises.
    std::vector<acc_t> soa(static_cast<size_t>(B * M * 5));
    at::parallel_for(0, B * M, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t b = i / M, m = i % M;
        acc_t* s = soa.data() + b * M * 5;
        const Box<acc_t> bx = load_box<scalar_t, acc_t>(p2 + i * 4);
        s[m] = bx.x1;
        s[M + m] = bx.y1;
        s[2 * M + m] = bx.x2;
        s[3 * M + m] = bx.y2;
        s[4 * M + m] = kind == box::kCIoU ? box::aspect_atan(bx) : acc_t(0);
      }
    });
    box::dispatch_kind(static_cast<int>(kind), false, [&]<int KIND, bool LOSS>() {
      const int64_t grain = std::max<int64_t>(1, 16384 / M);
      at::parallel_for(0, B * N, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t row = lo; row < hi; ++row) {
          const acc_t* s = soa.data() + (row / N) * M * 5;
          const Box<acc_t> a = load_box<scalar_t, acc_t>(p1 + row * 4);
          const acc_t atan_a = KIND == box::kCIoU ? box::aspect_atan(a) : acc_t(0);
          pairwise_row<acc_t, KIND>(a, atan_a, s, M, e, po + row * M);
        }
      });
    });
  });
  return out;
}

template <typename scalar_t, typename T, int KIND, bool LOSS>
__attribute__((target_clones("avx2", "default"))) void matched_forward(const scalar_t* __restrict__ p1,
                                                                       const scalar_t* __restrict__ p2, int64_t n,
                                                                       T eps, T* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {
    const Box<T> a = load_box<scalar_t, T>(p1 + i * 4);
    const Box<T> b = load_box<scalar_t, T>(p2 + i * 4);
    const T ta = KIND == box::kCIoU ? box::aspect_atan(a) : T(0);
    const T tb = KIND == box::kCIoU ? box::aspect_atan(b) : T(0);
    out[i] = box::pair_value<T, KIND, LOSS>(a, b, ta, tb, eps);
  }
}

template <typename scalar_t, typename T, int KIND, bool LOSS>
__attribute__((target_clones("avx2", "default"))) void matched_backward(
    const T* __restrict__ grad, const scalar_t* __restrict__ p1, const scalar_t* __restrict__ p2, int64_t n, T eps,
    scalar_t* __restrict__ o1, scalar_t* __restrict__ o2) {
  for (int64_t i = 0; i < n; ++i) {
    const Box<T> a = load_box<scalar_t, T>(p1 + i * 4);
    const Box<T> b = load_box<scalar_t, T>(p2 + i * 4);
    const T ta = KIND == box::kCIoU ? box::aspect_atan(a) : T(0);
    const T tb = KIND == box::kCIoU ? box::aspect_atan(b) : T(0);
    T ga[4] = {0, 0, 0, 0}, gb[4] = {0, 0, 0, 0};
    box::pair_grad<T, KIND, LOSS>(a, b, ta, tb, eps, grad[i], ga, gb);
    for (int j = 0; j < 4; ++j) {
      o1[i * 4 + j] = static_cast<scalar_t>(ga[j]);
      o2[i * 4 + j] = static_cast<scalar_t>(gb[j]);
    }
  }
}

void check_matched(const char* name, const at::Tensor& boxes1, const at::Tensor& boxes2, int64_t kind) {
  TORCH_CHECK(boxes1.dim() == 2 && boxes1.size(1) == 4, name, ": boxes1 must be [K, 4]");
  TORCH_CHECK(boxes2.sizes() == boxes1.sizes(), name, ": boxes2 must have the shape of boxes1");
  TORCH_CHECK(boxes1.scalar_type() == boxes2.scalar_type(), name, ": boxes1 and boxes2 dtypes differ");
  check_kind(kind);
}

at::Tensor matched_box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2, int64_t kind, bool loss,
                               double eps) {
  check_matched("matched_box_iou", boxes1, boxes2, kind);
  const int64_t K = boxes1.size(0);
  auto out = at::empty({K}, boxes1.options().dtype(out_dtype(boxes1.scalar_type())));
  if (K == 0) return out;
  auto b1 = boxes1.contiguous();
  auto b2 = boxes2.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b1.scalar_type(), "matched_box_iou_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p1 = b1.const_data_ptr<scalar_t>();
    const scalar_t* p2 = b2.const_data_ptr<scalar_t>();
    acc_t* po = out.mutable_data_ptr<acc_t>();
    const acc_t e = static_cast<acc_t>(eps);
    box::dispatch_kind(static_cast<int>(kind), loss, [&]<int KIND, bool LOSS>() {
      at::parallel_for(0, K, 4096, [&](int64_t lo, int64_t hi) {
        matched_forward<scalar_t, acc_t, KIND, LOSS>(p1 + lo * 4, p2 + lo * 4, hi - lo, e, po + lo);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> matched_box_iou_backward_cpu(const at::Tensor& grad, const at::Tensor& boxes1,
                                                                const at::Tensor& boxes2, int64_t kind, bool loss,
                                                                double eps) {
  check_matched("matched_box_iou_backward", boxes1, boxes2, kind);
  const int64_t K = boxes1.size(0);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == K, "matched_box_iou_backward: grad must be [K]");
  TORCH_CHECK(grad.scalar_type() == out_dtype(boxes1.scalar_type()),
              "matched_box_iou_backward: grad dtype must be the forward output's");
  auto g1 = at::empty({K, 4}, boxes1.options());
  auto g2 = at::empty({K, 4}, boxes1.options());
  if (K == 0) return {g1, g2};
  auto b1 = boxes1.contiguous();
  auto b2 = boxes2.contiguous();
  auto gc = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b1.scalar_type(), "matched_box_iou_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p1 = b1.const_data_ptr<scalar_t>();
    const scalar_t* p2 = b2.const_data_ptr<scalar_t>();
    const acc_t* pg = gc.const_data_ptr<acc_t>();
    scalar_t* o1 = g1.mutable_data_ptr<scalar_t>();
    scalar_t* o2 = g2.mutable_data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(eps);
    box::dispatch_kind(static_cast<int>(kind), loss, [&]<int KIND, bool LOSS>() {
      at::parallel_for(0, K, 2048, [&](int64_t lo, int64_t hi) {
        matched_backward<scalar_t, acc_t, KIND, LOSS>(pg + lo, p1 + lo * 4, p2 + lo * 4, hi - lo, e, o1 + lo * 4,
                                                      o2 + lo * 4);
      });
    });
  });
  return {g1, g2};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CPU, m) {
  m.impl("pairwise_box_iou", &pairwise_box_iou_cpu);
  m.impl("matched_box_iou", &matched_box_iou_cpu);
  m.impl("matched_box_iou_backward", &matched_box_iou_backward_cpu);
}

}  // namespace pyvision_ops
