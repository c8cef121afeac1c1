"""Building blocks shared by the bundle networks."""

from vlseg.nets.common import (
    as_token_tensor,
    count_parameters,
    forward_flops,
    freeze,
    trainable_parameters,
)

__all__ = ["as_token_tensor", "count_parameters", "forward_flops", "freeze", "trainable_parameters"]
