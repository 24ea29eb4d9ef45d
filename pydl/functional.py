"""The public ops, with torch.nn.functional signatures plus keyword-only `backend=` (and `algo=`
where an op has variants). Each op is defined once, in its family's module; this module is the
index users import (`import pydl.functional as F`).
"""
from .attention import scaled_dot_product_attention
from .conv import conv1d, conv2d
from .gru import gru, gru_cell
from .linear_ce import linear_cross_entropy
from .lstm import lstm, lstm_cell
from .pool import (
    adaptive_avg_pool1d,
    adaptive_avg_pool2d,
    avg_pool1d,
    avg_pool2d,
    max_pool1d,
    max_pool2d,
)
from .softmax_ce import cross_entropy, log_softmax, softmax

__all__ = ["conv2d", "conv1d", "softmax", "log_softmax", "cross_entropy", "linear_cross_entropy",
           "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "max_pool1d", "avg_pool1d",
           "adaptive_avg_pool1d", "scaled_dot_product_attention", "lstm_cell", "lstm", "gru_cell",
           "gru"]

# Every op runs on its tensors' CUDA device (where that is not the current one), and also
# takes CuPy arrays (any DLPack array) and then returns that kind of array: pydl._interop.
from ._interop import public_op  # noqa: E402

for _op in __all__:
    globals()[_op] = public_op(globals()[_op])
del _op
