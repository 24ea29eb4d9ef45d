"""float64 NumPy references, forward AND backward, written from the math (never by calling
torch). One module per op family; everything is re-exported here as `pydl.reference.<name>`.
"""
from .attention import scaled_dot_product_attention, scaled_dot_product_attention_backward
from .conv import conv2d, conv2d_backward, pad2d, pad2d_backward
from .lstm import (
    gru,
    gru_backward,
    gru_cell,
    gru_cell_backward,
    lstm,
    lstm_backward,
    lstm_cell,
    lstm_cell_backward,
    lstm_weight_names,
    sigmoid,
)
from .pool import (
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    avg_pool2d,
    avg_pool2d_backward,
    max_pool2d,
    max_pool2d_backward,
)
from .softmax_ce import (
    cross_entropy,
    cross_entropy_backward,
    cross_entropy_target_backward,
    cross_entropy_weight_backward,
    log_softmax,
    log_softmax_backward,
    logsumexp,
    softmax,
    softmax_backward,
)
