"""float64 NumPy references for softmax, log_softmax and cross-entropy, forward and backward.

Written from the math (lecture notes: softmax is shift-invariant; the stable loss is
l(z, y) = logsumexp(z) - z_y; dl/dz_k = softmax(z)_k - [y = k]), not by calling torch.

Cross-entropy with class weights w, label smoothing eps and C classes follows PyTorch:
    loss_i = (1 - eps) * w[y_i] * (lse_i - z_{i,y_i}) + (eps / C) * sum_c w[c] * (lse_i - z_{i,c})
rows whose target is ignore_index contribute 0, and reduction="mean" divides the sum by
sum_i w[y_i] over the rows that are not ignored (by their count when there are no weights).
"""
from __future__ import annotations

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def logsumexp(x, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    x = _f64(x)
    m = np.max(x, axis=axis, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = np.log(np.sum(np.exp(x - m_safe), axis=axis, keepdims=True)) + m_safe
    return out if keepdims else np.squeeze(out, axis=axis)


def softmax(x, dim: int = -1) -> np.ndarray:
    x = _f64(x)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp(x - logsumexp(x, dim, keepdims=True))


def log_softmax(x, dim: int = -1) -> np.ndarray:
    x = _f64(x)
    with np.errstate(invalid="ignore"):
        return x - logsumexp(x, dim, keepdims=True)


def softmax_backward(grad_y, y, dim: int = -1) -> np.ndarray:
    """dL/dx for y = softmax(x): y * (g - sum(g * y))."""
    g, y = _f64(grad_y), _f64(y)
    return y * (g - np.sum(g * y, axis=dim, keepdims=True))


def log_softmax_backward(grad_y, y, dim: int = -1) -> np.ndarray:
    """dL/dx for y = log_softmax(x): g - softmax(x) * sum(g)."""
    g, y = _f64(grad_y), _f64(y)
    return g - np.exp(y) * np.sum(g, axis=dim, keepdims=True)


def _ce_rows(x, target, weight):
    """Logits as (rows, C), targets as (rows,), weights as (C,), and the output shape."""
    x = _f64(x)
    target = np.asarray(target, dtype=np.int64)
    if x.ndim == 1:  # unbatched (C,) with a scalar target
        rows, out_shape = x[None, :], ()
    else:
        rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
        out_shape = (x.shape[0],) + x.shape[2:]
    C = rows.shape[1]
    w = np.ones(C) if weight is None else _f64(weight)
    return rows, target.reshape(-1), w, out_shape


def _ce_terms(x, target, weight, ignore_index):
    rows, t, w, out_shape = _ce_rows(x, target, weight)
    valid = t != ignore_index
    t_safe = np.where(valid, t, 0)
    if valid.any() and (t_safe.min() < 0 or t_safe.max() >= rows.shape[1]):
        raise ValueError("target out of range")
    w_t = np.where(valid, w[t_safe], 0.0)
    return rows, t_safe, w, w_t, valid, out_shape


def cross_entropy(x, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> np.ndarray:
    rows, t, w, w_t, valid, out_shape = _ce_terms(x, target, weight, ignore_index)
    C = rows.shape[1]
    lse = logsumexp(rows, axis=1)
    with np.errstate(invalid="ignore"):
        nll = w_t * (lse - rows[np.arange(len(t)), t])
        smooth = np.where(valid, (w[None, :] * (lse[:, None] - rows)).sum(axis=1), 0.0)
    eps = float(label_smoothing)
    loss = (1.0 - eps) * nll + (eps / C) * smooth
    loss = np.where(valid, loss, 0.0)
    if reduction == "none":
        return loss.reshape(out_shape)
    if reduction == "sum":
        return np.asarray(loss.sum())
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(loss.sum() / w_t.sum())
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def cross_entropy_backward(grad_loss, x, target, weight=None, ignore_index: int = -100,
                           reduction: str = "mean", label_smoothing: float = 0.0) -> np.ndarray:
    """dL/dx: g_i * ((1 - eps) w[y_i] (p_i - onehot(y_i)) + (eps / C) (sum(w) p_i - w))."""
    x = _f64(x)
    rows, t, w, w_t, valid, out_shape = _ce_terms(x, target, weight, ignore_index)
    C = rows.shape[1]
    p = softmax(rows, 1)
    g = _f64(grad_loss)
    if reduction == "none":
        g_rows = np.broadcast_to(g, out_shape).reshape(-1)
    elif reduction == "sum":
        g_rows = np.full(len(t), float(g))
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            g_rows = np.full(len(t), float(g) / w_t.sum())
    eps = float(label_smoothing)
    onehot = np.zeros_like(rows)
    onehot[np.arange(len(t)), t] = 1.0
    d = (1.0 - eps) * w_t[:, None] * (p - onehot) + (eps / C) * (w.sum() * p - w[None, :])
    d = np.where(valid[:, None], d * g_rows[:, None], 0.0)
    if x.ndim == 1:
        return d[0]
    moved = d.reshape((x.shape[0],) + x.shape[2:] + (C,))
    return np.moveaxis(moved, -1, 1)
