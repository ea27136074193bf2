"""Forward/backward pairs for every layer of the student (and the forwards the teacher reuses).

Conventions (as in llm.c, with arrays instead of pointers):
  * ``y, cache = op_forward(...)``; ``grads = op_backward(dy, cache)``. A forward never needs its
    cache to be kept: the teacher simply drops it.
  * Backwards *return* activation gradients (and parameter gradients); the caller accumulates
    parameter gradients into its flat grad buffer (``+=``). ``embedding_backward`` can scatter
    straight into such a buffer (``out=``) because its full-size gradient would be [V, D].
  * Every op works on NumPy or CuPy arrays alike (``backend.array_module(x)``) and keeps the
    input dtype: float64 in the gradient checks, float32 in training.
"""
from .attention import attention_backward, attention_forward
from .embedding import embedding_backward, embedding_forward
from .glu import glu_backward, glu_forward
from .linear import linear_backward, linear_forward
from .rmsnorm import rmsnorm_backward, rmsnorm_forward
from .rope import rope_backward, rope_forward, rope_tables

__all__ = [
    "attention_forward", "attention_backward", "embedding_forward", "embedding_backward",
    "glu_forward", "glu_backward", "linear_forward", "linear_backward",
    "rmsnorm_forward", "rmsnorm_backward", "rope_tables", "rope_forward", "rope_backward",
]
