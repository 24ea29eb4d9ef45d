"""float64 NumPy references for softmax, log_softmax and cross-entropy, forward and backward.

Written from the math (lecture notes: softmax is shift-invariant; the stable loss is
l(z, y) = logsumexp(z) - z_y; dl/dz_k = softmax(z)_k - [y = k]), not by calling torch.

Cross-entropy with class weights w, label smoothing eps and C classes follows PyTorch:
    loss_i = (1 - eps) * w[y_i] * (lse_i - z_{i,y_i}) + (eps / C) * sum_c w[c] * (lse_i - z_{i,c})
rows whose target is ignore_index contribute 0, and reduction="mean" divides the sum by
sum_i w[y_i] over the rows that are not ignored (by their count when there are no weights).

A floating target of the logits' shape holds class probabilities y (rows need not sum to 1):
    loss_i = sum_c w[c] * y'_{i,c} * (lse_i - z_{i,c}),   y' = (1 - eps) * y + eps / C
and reduction="mean" divides by the number of rows, whatever the weights. The gradients are
    dl/dz_{i,c} = softmax(z_i)_c * sum_k w[k] y'_{i,k} - w[c] y'_{i,c}
    dl/dy_{i,c} = (1 - eps) * w[c] * (lse_i - z_{i,c}).
cross_entropy and cross_entropy_backward take either kind of target, as torch does.

pydl's z-loss (z_loss=z, class indices without weights): z lse_i^2 added to each row not
ignored, a mean over their number (none counting: 0, no gradient); its gradient
g_i 2 z lse_i softmax(z_i).

pydl's softcap (softcap=s, class indices): the loss of the logits s tanh(u / s) for the u
given; the gradient w.r.t. u is the capped logits' times 1 - tanh(u / s)^2.

Array-module generic (see _xp.py): given CuPy arrays, the same code runs on the GPU and
returns CuPy arrays.
"""
from __future__ import annotations

from ._xp import array_module, errstate, f64


def logsumexp(x, axis: int = -1, keepdims: bool = False):
    xp = array_module(x)
    x = f64(xp, x)
    m = xp.max(x, axis=axis, keepdims=True)
    m_safe = xp.where(xp.isfinite(m), m, 0.0)
    with errstate(xp, divide="ignore", invalid="ignore", over="ignore"):
        out = xp.log(xp.sum(xp.exp(x - m_safe), axis=axis, keepdims=True)) + m_safe
    return out if keepdims else xp.squeeze(out, axis=axis)


def softmax(x, dim: int = -1):
    xp = array_module(x)
    x = f64(xp, x)
    with errstate(xp, invalid="ignore", over="ignore"):
        return xp.exp(x - logsumexp(x, dim, keepdims=True))


def log_softmax(x, dim: int = -1):
    xp = array_module(x)
    x = f64(xp, x)
    with errstate(xp, invalid="ignore"):
        return x - logsumexp(x, dim, keepdims=True)


def softmax_backward(grad_y, y, dim: int = -1):
    """dL/dx for y = softmax(x): y * (g - sum(g * y))."""
    xp = array_module(grad_y, y)
    g, y = f64(xp, grad_y), f64(xp, y)
    return y * (g - xp.sum(g * y, axis=dim, keepdims=True))


def log_softmax_backward(grad_y, y, dim: int = -1):
    """dL/dx for y = log_softmax(x): g - softmax(x) * sum(g)."""
    xp = array_module(grad_y, y)
    g, y = f64(xp, grad_y), f64(xp, y)
    return g - xp.exp(y) * xp.sum(g, axis=dim, keepdims=True)


def _class_last(xp, a):
    """(C,) or (N, C, d1, ...) as (rows, C): one row per sample and position, classes last."""
    return a[None, :] if a.ndim == 1 else xp.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def _class_back(xp, d, shape):
    """The inverse of _class_last: (rows, C) back to `shape`, classes on axis 1."""
    if len(shape) == 1:
        return d[0]
    moved = d.reshape((shape[0],) + tuple(shape[2:]) + (shape[1],))
    return xp.moveaxis(moved, -1, 1)


def _is_probabilities(xp, target) -> bool:
    """A floating target holds class probabilities; an integer one class indices."""
    return xp.asarray(target).dtype.kind == "f"


def _row_grad(xp, grad_loss, n_rows: int, out_shape, reduction: str, denom):
    """The upstream gradient of each row: g, broadcast for "sum", divided by denom for "mean"."""
    g = f64(xp, grad_loss)
    if reduction == "none":
        return xp.broadcast_to(g, out_shape).reshape(-1)
    if reduction == "sum":
        return xp.full(n_rows, float(g))
    with errstate(xp, invalid="ignore", divide="ignore"):
        return xp.full(n_rows, float(g) / denom)


def _reduce(xp, loss, out_shape, reduction: str, denom):
    if reduction == "none":
        return loss.reshape(out_shape)
    if reduction == "sum":
        return xp.asarray(loss.sum())
    if reduction == "mean":
        with errstate(xp, invalid="ignore", divide="ignore"):
            return xp.asarray(loss.sum() / denom)
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _ce_probs_terms(xp, x, target, weight, label_smoothing):
    """Logits as (rows, C), the weighted smoothed targets a = w * y' as (rows, C), the
    weights (C,) and the output shape."""
    x, y = f64(xp, x), f64(xp, target)
    if y.shape != x.shape:
        raise ValueError(f"class-probability target shape {y.shape} != logits shape {x.shape}")
    rows, y = _class_last(xp, x), _class_last(xp, y)
    C = rows.shape[1]
    w = xp.ones(C) if weight is None else f64(xp, weight)
    eps = float(label_smoothing)
    a = w[None, :] * ((1.0 - eps) * y + eps / C)
    out_shape = () if x.ndim == 1 else (x.shape[0],) + x.shape[2:]
    return rows, a, w, out_shape


def _cross_entropy_probs(xp, x, target, weight, reduction, label_smoothing):
    rows, a, w, out_shape = _ce_probs_terms(xp, x, target, weight, label_smoothing)
    lse = logsumexp(rows, axis=1)
    with errstate(xp, invalid="ignore"):
        loss = (a * (lse[:, None] - rows)).sum(axis=1)
    return _reduce(xp, loss, out_shape, reduction, len(rows))


def _cross_entropy_probs_backward(xp, grad_loss, x, target, weight, reduction, label_smoothing):
    rows, a, w, out_shape = _ce_probs_terms(xp, x, target, weight, label_smoothing)
    g = _row_grad(xp, grad_loss, len(rows), out_shape, reduction, len(rows))
    p = softmax(rows, 1)
    d = g[:, None] * (p * a.sum(axis=1, keepdims=True) - a)
    return _class_back(xp, d, xp.asarray(x).shape)


def cross_entropy_target_backward(grad_loss, x, target, weight=None, reduction: str = "mean",
                                  label_smoothing: float = 0.0):
    """dL/dy for class-probability targets y: g_i (1 - eps) w[c] (lse_i - z_{i,c})."""
    xp = array_module(grad_loss, x, target, weight)
    rows, a, w, out_shape = _ce_probs_terms(xp, x, target, weight, label_smoothing)
    g = _row_grad(xp, grad_loss, len(rows), out_shape, reduction, len(rows))
    lse = logsumexp(rows, axis=1)
    with errstate(xp, invalid="ignore"):
        d = g[:, None] * (1.0 - float(label_smoothing)) * w[None, :] * (lse[:, None] - rows)
    return _class_back(xp, d, xp.asarray(x).shape)


def cross_entropy_weight_backward(grad_loss, x, target, weight, reduction: str = "mean",
                                  label_smoothing: float = 0.0):
    """dL/dw for class-probability targets y and class weights w (C,):
    sum_i g_i y'_{i,c} (lse_i - z_{i,c}), y' = (1 - eps) y + eps / C."""
    xp = array_module(grad_loss, x, target, weight)
    rows, a, w, out_shape = _ce_probs_terms(xp, x, target, None, label_smoothing)
    g = _row_grad(xp, grad_loss, len(rows), out_shape, reduction, len(rows))
    lse = logsumexp(rows, axis=1)
    with errstate(xp, invalid="ignore"):
        return (g[:, None] * a * (lse[:, None] - rows)).sum(axis=0)


def _ce_rows(xp, x, target, weight):
    """Logits as (rows, C), targets as (rows,), weights as (C,), and the output shape."""
    x = f64(xp, x)
    target = xp.asarray(target, dtype=xp.int64)
    rows = _class_last(xp, x)  # unbatched (C,) logits have a scalar target: one row
    out_shape = () if x.ndim == 1 else (x.shape[0],) + x.shape[2:]
    C = rows.shape[1]
    w = xp.ones(C) if weight is None else f64(xp, weight)
    return rows, target.reshape(-1), w, out_shape


def _ce_terms(xp, x, target, weight, ignore_index):
    rows, t, w, out_shape = _ce_rows(xp, x, target, weight)
    valid = t != ignore_index
    t_safe = xp.where(valid, t, 0)
    if valid.any() and (t_safe.min() < 0 or t_safe.max() >= rows.shape[1]):
        raise ValueError("target out of range")
    w_t = xp.where(valid, w[t_safe], 0.0)
    return rows, t_safe, w, w_t, valid, out_shape


def cross_entropy(x, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0):
    """Mean/sum/per-row loss; `target` holds class indices, or class probabilities when it
    is floating point (then ignore_index does not apply)."""
    xp = array_module(x, target, weight)
    if softcap:
        x = softcap * xp.tanh(f64(xp, x) / softcap)
    if _is_probabilities(xp, target):
        return _cross_entropy_probs(xp, x, target, weight, reduction, label_smoothing)
    rows, t, w, w_t, valid, out_shape = _ce_terms(xp, x, target, weight, ignore_index)
    C = rows.shape[1]
    lse = logsumexp(rows, axis=1)
    with errstate(xp, invalid="ignore"):
        nll = w_t * (lse - rows[xp.arange(len(t)), t])
        smooth = xp.where(valid, (w[None, :] * (lse[:, None] - rows)).sum(axis=1), 0.0)
    eps = float(label_smoothing)
    nll = xp.where(valid, nll, 0.0)
    # each part reduced on its own, as torch does: a mean over a zero denominator is then
    # NaN (the NLL part's 0 / 0), not the smoothing part's inf
    loss = (1.0 - eps) * _reduce(xp, nll, out_shape, reduction, w_t.sum())
    if eps:
        loss = loss + (eps / C) * _reduce(xp, smooth, out_shape, reduction, w_t.sum())
    if z_loss:
        z_rows = xp.where(valid, z_loss * lse ** 2, 0.0)
        loss = loss + _reduce(xp, z_rows, out_shape, reduction, max(int(valid.sum()), 1))
    return loss


def cross_entropy_backward(grad_loss, x, target, weight=None, ignore_index: int = -100,
                           reduction: str = "mean", label_smoothing: float = 0.0,
                           z_loss: float = 0.0, softcap: float = 0.0):
    """dL/dx: g_i * ((1 - eps) w[y_i] (p_i - onehot(y_i)) + (eps / C) (sum(w) p_i - w));
    for class-probability targets g_i * (p_i * sum_k w[k] y'_{i,k} - w * y'_i)."""
    xp = array_module(grad_loss, x, target, weight)
    x = f64(xp, x)
    if softcap:
        capped = xp.tanh(x / softcap)
        return cross_entropy_backward(grad_loss, softcap * capped, target, weight, ignore_index,
                                      reduction, label_smoothing, z_loss) * (1.0 - capped ** 2)
    if _is_probabilities(xp, target):
        return _cross_entropy_probs_backward(xp, grad_loss, x, target, weight, reduction,
                                             label_smoothing)
    rows, t, w, w_t, valid, out_shape = _ce_terms(xp, x, target, weight, ignore_index)
    C = rows.shape[1]
    p = softmax(rows, 1)
    g_rows = _row_grad(xp, grad_loss, len(t), out_shape, reduction, w_t.sum())
    eps = float(label_smoothing)
    onehot = xp.zeros_like(rows)
    onehot[xp.arange(len(t)), t] = 1.0
    # each part scaled by the row's gradient on its own, as torch's parts are (with a zero
    # mean denominator the NLL part's 0 * inf is NaN, as there)
    with errstate(xp, invalid="ignore"):
        d = (1.0 - eps) * w_t[:, None] * (p - onehot) * g_rows[:, None]
        if eps:
            d = d + (eps / C) * (w.sum() * p - w[None, :]) * g_rows[:, None]
        if z_loss:
            z_rows = _row_grad(xp, grad_loss, len(t), out_shape, reduction,
                               max(int(valid.sum()), 1))
            d = d + (2.0 * z_loss * logsumexp(rows, axis=1) * z_rows)[:, None] * p
    d = xp.where(valid[:, None], d, 0.0)
    return _class_back(xp, d, x.shape)
