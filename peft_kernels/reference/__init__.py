"""Pure-torch references: the exact math of every family, the CPU path and the test oracle."""
from ._philox import apply_dropout, keep_mask, philox_uint32
from .adalora import adalora, adalora_delta_weight
from .lily import lily, lily_adapter, lily_delta_weight
from .lora import lora, lora_delta_weight, lora_scaling
from .monarch import monarch, monarch_adapter, monarch_delta_weight, monarch_dims
from .sparse import check_csr, csr_rows, sparse, sparse_adapter, sparse_delta_weight

__all__ = [
    "apply_dropout", "keep_mask", "philox_uint32",
    "adalora", "adalora_delta_weight",
    "lily", "lily_adapter", "lily_delta_weight",
    "lora", "lora_delta_weight", "lora_scaling",
    "monarch", "monarch_adapter", "monarch_delta_weight", "monarch_dims",
    "check_csr", "csr_rows", "sparse", "sparse_adapter", "sparse_delta_weight",
]
