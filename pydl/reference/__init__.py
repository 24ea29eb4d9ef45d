"""float64 NumPy references, forward AND backward, written from the math (never by calling
torch). One module per op family; everything is re-exported here as `pydl.reference.<name>`.
"""
from .softmax_ce import (cross_entropy, cross_entropy_backward, log_softmax,
                         log_softmax_backward, logsumexp, softmax, softmax_backward)
