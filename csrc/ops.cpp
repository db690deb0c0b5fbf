// Every op schema of pyvision_ops, and the _C Python module.
// Kernels live in csrc/cpu, csrc/cuda (CUDA C++) and kernels/ (Triton, registered from Python).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#ifndef PYVISION_OPS_VERSION
#define PYVISION_OPS_VERSION "unknown"
#endif

TORCH_LIBRARY(pyvision_ops, m) {
  // Box IoU family. kind: 0 IoU, 1 GIoU, 2 DIoU, 3 CIoU (csrc/common/box_iou.h).
  // [B, N, 4] x [B, M, 4] -> [B, N, M]
  m.def("pairwise_box_iou(Tensor boxes1, Tensor boxes2, int kind, float eps) -> Tensor");
  // [K, 4] x [K, 4] -> [K]; loss=True gives the regression-loss formulas (1 - metric).
  m.def("matched_box_iou(Tensor boxes1, Tensor boxes2, int kind, bool loss, float eps) -> Tensor");
  m.def(
      "matched_box_iou_backward(Tensor grad, Tensor boxes1, Tensor boxes2, int kind, bool loss, float eps) "
      "-> (Tensor, Tensor)");

  // NMS family. idxs (categories) None: one group. Kept indices in decreasing score order.
  m.def("nms(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold) -> Tensor");
  // method: 0 gaussian, 1 linear, 2 hard. Returns (keep, score of each kept box when it was selected).
  m.def(
      "soft_nms(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, float sigma, float score_threshold, "
      "int method) -> (Tensor, Tensor)");

  // RoI Align. rois: [K, 5] (batch index, x1, y1, x2, y2). Backward is its own op.
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  // The backwards' input sizes are SymInt, as in upsample_bilinear below: int sizes fixed each
  // feature map's size in a compiled training graph (a recompile per size, up to the limit).
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
      "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor");
  // All FPN levels in one call: RoI k is pooled from features[levels[k]] at spatial_scales[levels[k]].
  m.def(
      "multi_scale_roi_align(Tensor[] features, Tensor rois, Tensor levels, float[] spatial_scales, "
      "int pooled_height, int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "multi_scale_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, float[] spatial_scales, "
      "SymInt[] heights, SymInt[] widths, SymInt batch_size, SymInt channels, int pooled_height, int pooled_width, "
      "int sampling_ratio, bool aligned) -> Tensor[]");

  // Losses. Elementwise (no reduction); alpha < 0 disables the class weight.
  m.def("sigmoid_focal_loss(Tensor inputs, Tensor targets, float alpha, float gamma) -> Tensor");
  m.def(
      "sigmoid_focal_loss_backward(Tensor grad, Tensor inputs, Tensor targets, float alpha, float gamma) "
      "-> (Tensor, Tensor)");
  // Soft Dice statistics of softmax(logits) over the batch and all positions: [2, C] =
  // (sum p_c [target == c], sum p_c + sum [target == c]) over positions whose target != ignore_index.
  m.def("dice_stats(Tensor logits, Tensor target, int ignore_index) -> Tensor");
  m.def("dice_stats_backward(Tensor grad, Tensor logits, Tensor target, int ignore_index) -> Tensor");
  // Lovasz extension gradient of each row of ground truth sorted by decreasing error:
  // fg_sorted [R, M] (0/1, fp32 or fp64), lengths [R] = valid entries per row (later ones get 0).
  // Counts are int64: exact at any size. Output dtype = fg_sorted's.
  m.def("lovasz_gradient(Tensor fg_sorted, Tensor lengths) -> Tensor");
  // Lovasz-softmax per (group, class): probas [N, C, S], labels [N, S] (int64); a group is one
  // image (per_image) or the whole batch. Per row: errors |[y = c] - p_c| over the positions whose
  // label is not ignore_index, sorted decreasing (stable), dotted with the Lovasz gradient.
  // Returns (losses [G, C], grad [N, C, S] = d losses / d probas, fg_count [G, C] int64);
  // losses and grad are fp32 (fp64 for fp64 probas).
  m.def(
      "lovasz_softmax_rows(Tensor probas, Tensor labels, int? ignore_index, bool per_image) "
      "-> (Tensor, Tensor, Tensor)");

  // Bilinear interpolation of [N, C, H, W] (torch's index rule; scale <= 0: none given).
  // SymInt sizes: under torch.compile / export with dynamic shapes they follow the input's
  // (the kernels take them as int64_t: they are concrete when a kernel runs).
  m.def(
      "upsample_bilinear(Tensor input, SymInt out_h, SymInt out_w, bool align_corners, float scale_h, "
      "float scale_w) -> Tensor");
  m.def(
      "upsample_bilinear_backward(Tensor grad, SymInt in_h, SymInt in_w, bool align_corners, float scale_h, "
      "float scale_w) -> Tensor");

  // Softmax cross-entropy with class-index targets on [N, C, S] logits, reduced by the kernel
  // (`reduction` as torch numbers it: 0 none, 1 mean, 2 sum). Outputs: the loss ([N, S] for
  // none, else 0-d; the mean is NaN when the target weights sum to 0), wsum (0-d: the sum of
  // the target weights, 0 at ignored positions) and stats [2, N, S]: the largest logit m and
  // l = log sum_c exp(z_c - m), which the backward takes. The backward's grad has the loss's
  // shape; under the mean it is divided by wsum (0 when wsum is 0).
  m.def(
      "softmax_cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
      "int reduction) -> (Tensor, Tensor, Tensor)");
  m.def(
      "softmax_cross_entropy_backward(Tensor grad, Tensor logits, Tensor target, Tensor? weight, Tensor stats, "
      "Tensor wsum, int ignore_index, float label_smoothing, int reduction) -> Tensor");
  // The forward and, in the same pass over the logits, the gradient for a loss gradient of 1
  // (reduction 1 or 2 only): (loss, wsum, stats, grad), grad as the backward's for grad = 1.
  // The autograd front takes it when the logits need a gradient; the backward then only scales
  // grad in place by the incoming loss gradient (scale_grad_) and hands it on as the logits'
  // gradient, so a caller of this op who keeps grad sees it change at the first backward.
  m.def(
      "softmax_cross_entropy_with_grad(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  // grad *= scale (0-d, fp32 or fp64), in place; where scale is 1 it reads and writes nothing
  // (on CUDA each program tests it on the device: no sync, no pass over grad).
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  // Cross-entropy of bilinearly upsampled [N, C, h, w] logits against [N, H, W] targets, one output
  // row at a time: the [N, C, H, W] logits never exist. Outputs as softmax_cross_entropy, with
  // [N, H, W] for [N, S].
  m.def(
      "upsample_cross_entropy(Tensor logits, Tensor target, bool align_corners, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction) -> (Tensor, Tensor, Tensor)");
  m.def(
      "upsample_cross_entropy_backward(Tensor grad, Tensor logits, Tensor target, bool align_corners, "
      "Tensor? weight, Tensor stats, Tensor wsum, int ignore_index, float label_smoothing, int reduction) -> Tensor");
}

// The backward ops are not differentiable again: a second derivative through one raises
// ("derivative for pyvision_ops::... is not implemented") instead of silently giving zeros.
// Registered here rather than from Python, where the autograd wrapper cost about 20 us per
// backward call (upsample_bilinear_backward is differentiable: _library.py registers that).
TORCH_LIBRARY_IMPL(pyvision_ops, Autograd, m) {
  for (const char* op : {"matched_box_iou_backward", "roi_align_backward", "multi_scale_roi_align_backward",
                         "sigmoid_focal_loss_backward", "dice_stats_backward", "softmax_cross_entropy_backward",
                         "upsample_cross_entropy_backward", "scale_grad_"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = PYVISION_OPS_VERSION;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef PYVISION_OPS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = PYVISION_OPS_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyvision_ops compiled kernels (ops are registered under torch.ops.pyvision_ops)";
  m.def("build_info", &build_info, "How this extension was built.");
}
