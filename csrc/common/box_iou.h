// Box IoU family: the math of one (box, box) pair, shared by the CPU and CUDA
// kernels. Boxes are (x1, y1, x2, y2).
//
// Two formula sets exist, both copied operation for operation from the
// definitions users compare against:
//   pairwise (LOSS = false): IoU = inter / union; the enclosing box's width and
//     height are clamped at 0; GIoU = IoU - (C - union) / C.
//   loss (LOSS = true): IoU = inter / (union + eps); the enclosing box is not
//     clamped; GIoU = IoU - (C - union) / (C + eps); the value is 1 - metric.
// DIoU subtracts centre_dist^2 / (diag^2 + eps); CIoU also subtracts alpha * v
// with v = 4 / pi^2 * (atan(w1 / h1) - atan(w2 / h2))^2 and
// alpha = v / (1 - IoU + v + eps), alpha being a constant for the gradient. The CIoU loss
// uses 1e-7 instead of eps in the IoU and distance terms, as torchvision's (term_eps).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PVO_HD __host__ __device__ __forceinline__
#else
// Forced: the CPU loops vectorise only when the pair math is inlined into them.
#define PVO_HD inline __attribute__((always_inline))
#endif

namespace pyvision_ops {
namespace box {

enum Kind : int { kIoU = 0, kGIoU = 1, kDIoU = 2, kCIoU = 3 };

// NaN in `a` propagates (as torch.clamp and torch.maximum do for the left operand).
template <typename T>
PVO_HD T max_(T a, T b) {
  return a < b ? b : a;
}
template <typename T>
PVO_HD T min_(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
struct Box {
  T x1, y1, x2, y2;
};

// atan for float without branches, so CPU loops vectorise: odd polynomial on
// [0, tan(pi/8)] after reduction by pi/4 or pi/2. Max abs error 1.4e-7 (1 ulp near
// pi/2), NaN in -> NaN out, atan(+-inf) = +-pi/2. Coefficients fitted for this file.
PVO_HD float atan_approx(float x) {
  const float a = x < 0.f ? -x : x;
  const bool big = a > 2.414213562373095f;   // tan(3 pi / 8)
  const bool mid = a > 0.41421356237309503f;  // tan(pi / 8)
  const float r = big ? -1.f / a : (mid ? (a - 1.f) / (a + 1.f) : a);
  const float off = big ? 1.5707963267948966f : (mid ? 0.7853981633974483f : 0.f);
  const float z = r * r;
  const float p = ((0.08068713f * z - 0.13882908f) * z + 0.19978274f) * z - 0.33332967f;
  const float y = off + (r + r * z * p);
  return x < 0.f ? -y : y;
}
PVO_HD double atan_approx(double x) { return std::atan(x); }  // fp64 is the reference path: exact libm

template <typename T>
PVO_HD T aspect_atan(const Box<T>& b) {
  return atan_approx((b.x2 - b.x1) / (b.y2 - b.y1));
}

// The eps of the IoU and distance terms: torchvision's CIoU loss passes its eps only to
// alpha and keeps the default 1e-7 there; every other function uses eps throughout.
template <typename T, int KIND, bool LOSS>
PVO_HD T term_eps(T eps) {
  return LOSS && KIND == kCIoU ? T(1e-7) : eps;
}

// Value of one pair. `atan_a`/`atan_b` are aspect_atan of each box (read only for CIoU).
template <typename T, int KIND, bool LOSS>
PVO_HD T pair_value(const Box<T>& a, const Box<T>& b, T atan_a, T atan_b, T eps) {
  const T eps_d = term_eps<T, KIND, LOSS>(eps);
  const T iw = min_(a.x2, b.x2) - max_(a.x1, b.x1);
  const T ih = min_(a.y2, b.y2) - max_(a.y1, b.y1);
  T inter;
  if (LOSS) {
    inter = (ih > T(0) && iw > T(0)) ? iw * ih : T(0);
  } else {
    inter = max_(iw, T(0)) * max_(ih, T(0));
  }
  const T area_a = (a.x2 - a.x1) * (a.y2 - a.y1);
  const T area_b = (b.x2 - b.x1) * (b.y2 - b.y1);
  const T uni = area_a + area_b - inter;
  const T iou = LOSS ? inter / (uni + eps_d) : inter / uni;
  T val = iou;
  if (KIND != kIoU) {
    T ew = max_(a.x2, b.x2) - min_(a.x1, b.x1);
    T eh = max_(a.y2, b.y2) - min_(a.y1, b.y1);
    if (!LOSS) {
      ew = max_(ew, T(0));
      eh = max_(eh, T(0));
    }
    if (KIND == kGIoU) {
      const T c = ew * eh;
      val = iou - (c - uni) / (LOSS ? c + eps : c);
    } else {
      const T dx = (a.x1 + a.x2) / T(2) - (b.x1 + b.x2) / T(2);
      const T dy = (a.y1 + a.y2) / T(2) - (b.y1 + b.y2) / T(2);
      const T diag = ew * ew + eh * eh + eps_d;
      val = iou - (dx * dx + dy * dy) / diag;
      if (KIND == kCIoU) {
        const T t = atan_a - atan_b;
        const T v = T(0.40528473456935108578) * (t * t);  // 4 / pi^2
        const T alpha = v / (T(1) - iou + v + eps);
        val = val - alpha * v;
      }
    }
  }
  return LOSS ? T(1) - val : val;
}

// Gradient of min(a, b) / max(a, b) w.r.t. each operand; ties split it evenly
// (the rule torch's autograd uses for minimum/maximum).
template <typename T>
PVO_HD void min_grad(T a, T b, T g, T& ga, T& gb) {
  if (a < b) {
    ga += g;
  } else if (b < a) {
    gb += g;
  } else {
    ga += g / T(2);
    gb += g / T(2);
  }
}
template <typename T>
PVO_HD void max_grad(T a, T b, T g, T& ga, T& gb) {
  if (b < a) {
    ga += g;
  } else if (a < b) {
    gb += g;
  } else {
    ga += g / T(2);
    gb += g / T(2);
  }
}

// Gradient of pair_value w.r.t. the 8 coordinates, given d(out) = g.
// Accumulates into ga/gb (x1, y1, x2, y2), which the caller zeroes.
template <typename T, int KIND, bool LOSS>
PVO_HD void pair_grad(const Box<T>& a, const Box<T>& b, T atan_a, T atan_b, T eps, T g, T* ga, T* gb) {
  const T dval = LOSS ? -g : g;
  const T iw = min_(a.x2, b.x2) - max_(a.x1, b.x1);
  const T ih = min_(a.y2, b.y2) - max_(a.y1, b.y1);
  const T iwc = max_(iw, T(0)), ihc = max_(ih, T(0));
  const bool overlap = LOSS ? (ih > T(0) && iw > T(0)) : true;
  const T inter = overlap ? iwc * ihc : T(0);
  const T wa = a.x2 - a.x1, ha = a.y2 - a.y1, wb = b.x2 - b.x1, hb = b.y2 - b.y1;
  const T uni = wa * ha + wb * hb - inter;
  const T eps_d = term_eps<T, KIND, LOSS>(eps);
  const T uden = LOSS ? uni + eps_d : uni;
  const T iou = inter / uden;

  T d_uni = 0, d_inter = 0, d_ew = 0, d_eh = 0, d_dx = 0, d_dy = 0;
  T d_wa = 0, d_ha = 0, d_wb = 0, d_hb = 0;
  T ew = 0, eh = 0, ew_raw = 0, eh_raw = 0;
  if (KIND != kIoU) {
    ew_raw = max_(a.x2, b.x2) - min_(a.x1, b.x1);
    eh_raw = max_(a.y2, b.y2) - min_(a.y1, b.y1);
    ew = LOSS ? ew_raw : max_(ew_raw, T(0));
    eh = LOSS ? eh_raw : max_(eh_raw, T(0));
  }
  if (KIND == kGIoU) {
    // val = iou - (c - uni) / den, den = c (+ eps)
    const T c = ew * eh;
    const T den = LOSS ? c + eps : c;
    d_uni += dval / den;
    const T d_c = -dval * (((den - c + uni) / den) / den);  // not / den^2: it overflows (or underflows) first
    d_ew += d_c * eh;
    d_eh += d_c * ew;
  } else if (KIND == kDIoU || KIND == kCIoU) {
    const T dx = (a.x1 + a.x2) / T(2) - (b.x1 + b.x2) / T(2);
    const T dy = (a.y1 + a.y2) / T(2) - (b.y1 + b.y2) / T(2);
    const T diag = ew * ew + eh * eh + eps_d;
    const T cent = dx * dx + dy * dy;
    const T d_cent = -dval / diag;
    const T d_diag = dval * ((cent / diag) / diag);
    d_ew += T(2) * ew * d_diag;
    d_eh += T(2) * eh * d_diag;
    d_dx = T(2) * dx * d_cent;
    d_dy = T(2) * dy * d_cent;
    if (KIND == kCIoU) {
      const T t = atan_a - atan_b;
      const T v = T(0.40528473456935108578) * (t * t);
      const T alpha = v / (T(1) - iou + v + eps);
      const T d_t = -dval * alpha * T(0.40528473456935108578) * T(2) * t;
      // d atan(w / h) = (h dw - w dh) / (w^2 + h^2)
      const T na = wa * wa + ha * ha, nb = wb * wb + hb * hb;
      d_wa += d_t * (ha / na);
      d_ha -= d_t * (wa / na);
      d_wb -= d_t * (hb / nb);
      d_hb += d_t * (wb / nb);
    }
  }
  // iou = inter / uden. Ratios are taken before the products (as in the Triton kernel): at
  // huge coordinates dval * cent would overflow to inf where cent / diag^2 is tiny.
  d_inter += dval / uden;
  d_uni -= dval * (iou / uden);
  // uni = wa * ha + wb * hb - inter
  d_wa += d_uni * ha;
  d_ha += d_uni * wa;
  d_wb += d_uni * hb;
  d_hb += d_uni * wb;
  d_inter -= d_uni;

  // inter = clamp(iw) * clamp(ih); torch's clamp(min=0) passes no gradient at 0 (touching
  // boxes, zero-width boxes).
  T d_iw = 0, d_ih = 0;
  if (LOSS ? overlap : iw > T(0)) d_iw = d_inter * ihc;
  if (LOSS ? overlap : ih > T(0)) d_ih = d_inter * iwc;
  min_grad(a.x2, b.x2, d_iw, ga[2], gb[2]);
  max_grad(a.x1, b.x1, -d_iw, ga[0], gb[0]);
  min_grad(a.y2, b.y2, d_ih, ga[3], gb[3]);
  max_grad(a.y1, b.y1, -d_ih, ga[1], gb[1]);

  if (KIND != kIoU) {
    if (!LOSS && !(ew_raw > T(0))) d_ew = 0;
    if (!LOSS && !(eh_raw > T(0))) d_eh = 0;
    max_grad(a.x2, b.x2, d_ew, ga[2], gb[2]);
    min_grad(a.x1, b.x1, -d_ew, ga[0], gb[0]);
    max_grad(a.y2, b.y2, d_eh, ga[3], gb[3]);
    min_grad(a.y1, b.y1, -d_eh, ga[1], gb[1]);
  }
  // centres: dx = (a.x1 + a.x2) / 2 - (b.x1 + b.x2) / 2
  ga[0] += d_dx / T(2) - d_wa;
  ga[2] += d_dx / T(2) + d_wa;
  gb[0] += -d_dx / T(2) - d_wb;
  gb[2] += -d_dx / T(2) + d_wb;
  ga[1] += d_dy / T(2) - d_ha;
  ga[3] += d_dy / T(2) + d_ha;
  gb[1] += -d_dy / T(2) - d_hb;
  gb[3] += -d_dy / T(2) + d_hb;
}

// Calls f.template operator()<KIND, LOSS>() with compile-time constants.
template <typename F>
void dispatch_kind(int kind, bool loss, F&& f) {
  switch (kind * 2 + (loss ? 1 : 0)) {
    case 0: f.template operator()<kIoU, false>(); break;
    case 1: f.template operator()<kIoU, true>(); break;
    case 2: f.template operator()<kGIoU, false>(); break;
    case 3: f.template operator()<kGIoU, true>(); break;
    case 4: f.template operator()<kDIoU, false>(); break;
    case 5: f.template operator()<kDIoU, true>(); break;
    case 6: f.template operator()<kCIoU, false>(); break;
    default: f.template operator()<kCIoU, true>(); break;
  }
}

}  // namespace box
}  // namespace pyvision_ops
