"""Float64 pure-torch references, written from the definitions. Never calls the kernels under test."""

import math

import torch


def _split(boxes):
    b = boxes.to(torch.float64)
    return b[..., 0], b[..., 1], b[..., 2], b[..., 3]


def box_pair_metric(a, b, kind: str, loss: bool = False, eps: float = 1e-7):
    """IoU-family metric of boxes a and b (broadcasting), float64.

    loss=False: the pairwise definitions (IoU = I / U; enclosing box clamped at 0;
    GIoU = IoU - (C - U) / C). loss=True: the regression-loss definitions
    (IoU = I / (U + eps); unclamped enclosing box; GIoU = IoU - (C - U) / (C + eps))
    and the result is 1 - metric.
    """
    ax1, ay1, ax2, ay2 = _split(a)
    bx1, by1, bx2, by2 = _split(b)
    iw = torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)
    ih = torch.minimum(ay2, by2) - torch.maximum(ay1, by1)
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    iou = inter / (union + eps) if loss else inter / union
    val = iou
    if kind != "iou":
        ew = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
        eh = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
        if not loss:
            ew, eh = ew.clamp(min=0), eh.clamp(min=0)
        if kind == "giou":
            c = ew * eh
            val = iou - (c - union) / ((c + eps) if loss else c)
        else:
            dx = (ax1 + ax2) / 2 - (bx1 + bx2) / 2
            dy = (ay1 + ay2) / 2 - (by1 + by2) / 2
            val = iou - (dx**2 + dy**2) / (ew**2 + eh**2 + eps)
            if kind == "ciou":
                t = torch.atan((ax2 - ax1) / (ay2 - ay1)) - torch.atan((bx2 - bx1) / (by2 - by1))
                v = 4 / math.pi**2 * t**2
                with torch.no_grad():
                    alpha = v / (1 - iou + v + eps)
                val = val - alpha * v
    return 1 - val if loss else val


def pairwise(boxes1, boxes2, kind: str, eps: float = 1e-7):
    """[..., N, 4] x [..., M, 4] -> [..., N, M], float64."""
    return box_pair_metric(boxes1[..., :, None, :], boxes2[..., None, :, :], kind, False, eps)


def _order(scores):
    """Indices by decreasing score, stable, NaN first."""
    s = [float(v) for v in scores]
    return sorted(range(len(s)), key=lambda i: (0 if math.isnan(s[i]) else 1, -s[i] if not math.isnan(s[i]) else 0, i))


def _iou64(a, b):
    return float(box_pair_metric(a, b, "iou"))


def nms(boxes, scores, iou_threshold):
    """Greedy NMS from the definition, float64: suppress later boxes with IoU > threshold."""
    b = boxes.to(torch.float64)
    kept = []
    for i in _order(scores):
        if all(not (_iou64(b[k], b[i]) > iou_threshold) for k in kept):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.int64)


def batched_nms(boxes, scores, idxs, iou_threshold):
    """Per-category NMS by a loop over categories, merged by decreasing score (stable, NaN first)."""
    kept = []
    for c in torch.unique(idxs):
        members = torch.where(idxs == c)[0]
        kept += members[nms(boxes[members], scores[members], iou_threshold)].tolist()
    rank = {i: r for r, i in enumerate(_order(scores))}
    return torch.tensor(sorted(kept, key=rank.__getitem__), dtype=torch.int64)


def soft_nms(boxes, scores, iou_threshold=0.3, sigma=0.5, score_threshold=1e-3, method="gaussian"):
    """Soft-NMS as in Bodla et al. 2017, Algorithm 1, float64 (plain loop).

    Returns (keep in selection order, score at selection). Boxes whose score is
    below score_threshold are dropped (initially and after each decay).
    """
    b = boxes.to(torch.float64)
    s = {i: float(scores[i]) for i in range(len(scores)) if not float(scores[i]) < score_threshold}
    rank = {i: r for r, i in enumerate(_order(scores))}
    keep, kept_scores = [], []
    while s:
        # highest current score; NaN first; ties: higher original rank
        m = min(s, key=lambda i: (0 if math.isnan(s[i]) else 1, -s[i] if not math.isnan(s[i]) else 0, rank[i]))
        keep.append(m)
        kept_scores.append(s.pop(m))
        for j in list(s):
            iou = _iou64(b[m], b[j])
            if math.isnan(iou):
                continue
            if method == "gaussian":
                f = math.exp(-(iou * iou) / sigma)
            elif iou >= iou_threshold:
                f = (1 - iou) if method == "linear" else 0.0
            else:
                f = 1.0
            s[j] = 0.0 if f == 0 and not math.isnan(s[j]) else s[j] * f  # a factor of 0 gives 0, even for +-inf
            if s[j] < score_threshold:
                del s[j]
    return torch.tensor(keep, dtype=torch.int64), torch.tensor(kept_scores, dtype=torch.float64)


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0):
    """Elementwise sigmoid focal loss, float64, from the definition. 1 - p_t is written
    t sigmoid(-x) + (1 - t) sigmoid(x) and the cross-entropy t softplus(-x) + (1 - t) softplus(x),
    so that neither cancels where sigmoid(x) rounds to t (torchvision's 1 - p_t does)."""
    x, t = inputs.to(torch.float64), targets.to(torch.float64)
    sp = torch.nn.functional.softplus
    ce = t * sp(-x) + (1 - t) * sp(x)
    loss = ce * (t * torch.sigmoid(-x) + (1 - t) * torch.sigmoid(x)) ** gamma
    return loss if alpha < 0 else (alpha * t + (1 - alpha) * (1 - t)) * loss


def dice_loss(logits, target, smooth=1.0, ignore_index=None, classes=None, reduction="mean"):
    """Multiclass soft Dice from logits, float64, from the definition."""
    p = torch.softmax(logits.to(torch.float64), dim=1)
    c = logits.shape[1]
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    p = torch.where(valid.unsqueeze(1), p, 0.0)  # ignored positions count for nothing, even NaN logits
    onehot = torch.nn.functional.one_hot(torch.where(valid, target, 0), c).movedim(-1, 1).to(torch.float64)
    v = valid.unsqueeze(1).to(torch.float64)
    dims = [0] + list(range(2, logits.dim()))
    inter = (p * onehot * v).sum(dims)
    card = (p * v).sum(dims) + (onehot * v).sum(dims)
    loss = 1 - (2 * inter + smooth) / (card + smooth)
    if classes is not None:
        loss = loss[list(classes)]
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def lovasz_grad(gt_sorted):
    """Algorithm 1's gradient of the Lovasz extension w.r.t. sorted errors (float64)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if len(gt_sorted) > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


def _lovasz_flat(errors, fg):
    if errors.numel() == 0:
        return errors.sum() * 0
    e, perm = torch.sort(errors, descending=True, stable=True)
    return torch.dot(torch.relu(e), lovasz_grad(fg[perm]))


def lovasz_softmax(probas, labels, classes="present", per_image=False, ignore_index=None, from_logits=False):
    """Lovasz-softmax by the paper's plain loop over images and classes, float64."""
    p = probas.to(torch.float64)
    if from_logits:
        p = torch.softmax(p, 1)
    c = p.shape[1]
    groups = [(p[i:i + 1], labels[i:i + 1]) for i in range(p.shape[0])] if per_image else [(p, labels)]
    out = []
    for pg, lg in groups:
        pf = pg.movedim(1, -1).reshape(-1, c)
        lf = lg.reshape(-1)
        if ignore_index is not None:
            keep = lf != ignore_index
            pf, lf = pf[keep], lf[keep]
        losses = []
        for k in (range(c) if isinstance(classes, str) else classes):
            fg = (lf == k).to(torch.float64)
            if classes == "present" and fg.sum() == 0:
                continue
            losses.append(_lovasz_flat((fg - pf[:, k]).abs(), fg))
        out.append(torch.stack(losses).mean() if losses else p.sum() * 0)
    return torch.stack(out).mean()


def lovasz_hinge(logits, labels, per_image=True, ignore_index=None):
    """Binary Lovasz hinge by a plain loop over images, float64."""
    x = logits.to(torch.float64)
    groups = [(x[i], labels[i]) for i in range(x.shape[0])] if per_image else [(x, labels)]
    out = []
    for xg, yg in groups:
        xf, yf = xg.reshape(-1), yg.reshape(-1)
        if ignore_index is not None:
            keep = yf != ignore_index
            xf, yf = xf[keep], yf[keep]
        fg = (yf == 1).to(torch.float64)
        out.append(_lovasz_flat(1 - xf * (2 * fg - 1), fg))
    return torch.stack(out).mean()
