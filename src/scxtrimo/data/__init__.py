"""Masking and the batching path from sparse matrices to the model."""

from ._batching import TokenBatch, csr_row_batch, length_batches, padding_fraction, select_tokens, sortish_batches
from ._masking import MaskedBatch, MaskingConfig, mask_values

__all__ = [
    "TokenBatch", "csr_row_batch", "length_batches", "padding_fraction", "select_tokens", "sortish_batches",
    "MaskedBatch", "MaskingConfig", "mask_values",
]
