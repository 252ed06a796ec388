"""Masking, the batching path from sparse matrices to the model, and streamed corpora."""

from ._batching import TokenBatch, csr_row_batch, length_batches, padding_fraction, select_tokens, sortish_batches
from ._masking import MaskedBatch, MaskingConfig, cell_keys, mask_values, mask_values_keyed
from ._stream import CellBlock, H5adCorpus, MemoryBatches, StreamBatches, split_labels

__all__ = [
    "TokenBatch", "csr_row_batch", "length_batches", "padding_fraction", "select_tokens", "sortish_batches",
    "MaskedBatch", "MaskingConfig", "mask_values", "mask_values_keyed", "cell_keys",
    "CellBlock", "H5adCorpus", "MemoryBatches", "StreamBatches", "split_labels",
]
