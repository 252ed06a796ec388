"""Every pooling of a checkpoint's encoder output from one pass: the embeddings the quality benchmark scores.

NumPy, SciPy and torch only (no anndata), so that the GPU machine computes the same embeddings
(``benchmarks/device_eval.py``) as ``benchmarks/embedding_quality.py`` does here.

Variant names: ``max`` and ``mean`` (over every token) for a model without depth tokens; with
depth tokens, ``max``, ``mean`` and ``all`` (S output, T output, max and mean over genes) for
each target depth, suffixed ``/T=4`` (the authors' default) and ``/T=S`` (the cell's own depth).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import scipy.sparse as sp
import torch

from scxtrimo._inference import batch_cells, map_cells, token_budget

#: Target depths of a model with depth tokens, ``(value, mode)``: T = 4 and T = S.
DEPTHS = ((4.0, "fixed"), (0.0, "offset"))


def depths(model) -> list:
    """The target depths the variants of ``model`` use (``[None]`` without depth tokens)."""
    return list(DEPTHS) if model.config.depth_tokens else [None]


def depth_tag(depth) -> str:
    return "" if depth is None else ("/T=4" if depth[1] == "fixed" else "/T=S")


def default_variant(model, pooling: str) -> str:
    """The variant ``tl.embed(adata, model=model, pooling=pooling)`` computes (its default target
    depth, T = 4, for a model with depth tokens)."""
    return f"{pooling}{depth_tag(depths(model)[0])}"


def cache_name(set_name: str, n: int, key: str) -> str:
    """The cache file stem of a checkpoint's embeddings of a set of ``n`` cells (``key``: the
    checkpoint's sha256, or a label; its first 16 characters are used)."""
    return f"{set_name}_{n}_{key[:16]}"


def _pools(model, batch, *, depth: bool) -> torch.Tensor:
    """max, mean (every token) and, with depth tokens, 'all' from one encoder pass."""
    h = model.encode(batch)
    valid = batch.valid.unsqueeze(-1)
    mx = h.masked_fill(~valid, float("-inf")).amax(1)
    mean = (h * valid).sum(1) / valid.sum(1).clamp(min=1)
    if not depth:
        return torch.cat([mx, mean], 1)
    n = model.config.n_genes
    gene = (batch.valid & (batch.genes < n)).unsqueeze(-1)

    def token(i: int) -> torch.Tensor:
        return (h * (batch.valid & (batch.genes == n + i)).unsqueeze(-1)).sum(1)

    gmax = h.masked_fill(~gene, float("-inf")).amax(1)
    gmean = (h * gene).sum(1) / gene.sum(1).clamp(min=1)
    return torch.cat([mx, mean, token(1), token(0), gmax, gmean], 1)


def variants(model, inputs: dict, device: torch.device) -> dict[str, np.ndarray]:
    """``{variant name: (n_cells, width) float32}`` from ``inputs``, ``{depth: X}`` with one
    model-input CSR matrix (log1p CP10k, plus T and S columns for a depth) per entry of
    :func:`depths` wanted (those missing from ``inputs`` are skipped)."""
    out = {}
    d = model.config.enc_dim
    for depth in (depth for depth in depths(model) if depth in inputs):
        X: sp.csr_matrix = inputs[depth]
        width = 2 * d if depth is None else 6 * d
        emb = map_cells(partial(_pools, model, depth=depth is not None), X, np.arange(X.shape[0]), device,
                        width=width, max_cells=batch_cells(device), max_tokens=token_budget(device, config=model.config))
        tag = depth_tag(depth)
        out[f"max{tag}"] = emb[:, :d]
        out[f"mean{tag}"] = emb[:, d : 2 * d]
        if depth is not None:
            out[f"all{tag}"] = emb[:, 2 * d :]
    return out
