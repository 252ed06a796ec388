"""Masking, the batching path from sparse matrices to the model, depth tokens, packed and streamed corpora.

Names are imported on first use: masking, batching, depth tokens and the packed corpus need
torch, NumPy and SciPy only; the streamed ``.h5ad`` corpus needs anndata.
"""

from .._lazy import lazy_attributes as _lazy_attributes

_WHERE = {
    "TokenBatch": "_batching", "csr_row_batch": "_batching", "length_batches": "_batching",
    "padding_fraction": "_batching", "select_tokens": "_batching", "sortish_batches": "_batching",
    "MaskedBatch": "_masking", "MaskingConfig": "_masking", "mask_values": "_masking",
    "mask_values_keyed": "_masking", "cell_keys": "_masking",
    "ThinningConfig": "_depth", "depth_aware_inputs": "_depth", "thin_counts": "_depth", "target_depth": "_depth",
    "Corpus": "_corpus", "load_corpus": "_corpus", "pack_corpus": "_corpus",
    "CellBlock": "_stream", "H5adCorpus": "_stream", "MemoryBatches": "_stream", "StreamBatches": "_stream",
    "split_labels": "_stream",
}

__all__ = list(_WHERE)

__getattr__, __dir__ = _lazy_attributes(__name__, _WHERE, globals())
