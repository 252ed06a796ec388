"""Gene embeddings initialised from co-expression: a truncated SVD of the cells' log1p CP10k values.

A randomly initialised gene embedding needs many cells before genes that are rarely expressed
(most markers) move away from noise: after the 8,272 cells of the first bundled checkpoint its
embeddings still clustered far below PCA. Starting the table from the genes' co-expression
coordinates (scBERT started from gene2vec for the same reason) gives the encoder a meaningful
input from the first step; pretraining then refines it. Our choice, not in the paper, which
initialises every weight randomly.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import LinearOperator, svds

from .._validation import check_positive

MIN_CELLS = 10
EMBEDDING_STD = 0.5


def coexpression_loadings(X, dim: int, *, min_cells: int = MIN_CELLS, random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gene coordinates in the top ``dim`` components of standardized expression.

    Every gene expressed in at least ``min_cells`` cells is centred and scaled to unit variance
    over the cells (implicitly: ``X`` stays sparse), the matrix is factorized by a truncated SVD
    ``Z = U S V^T`` (ARPACK), and gene ``g`` gets the row ``V[g] * S``: genes expressed in the
    same cells get nearby rows, the components that explain more variance weigh more.

    Parameters
    ----------
    X
        ``(cells, genes)`` log1p CP10k values, sparse or dense, non-negative.
    dim
        Number of components (the model's ``enc_dim``); at most ``min(cells, genes) - 1``.
    min_cells
        Genes expressed in fewer cells get zero rows and ``False`` in the mask.
    random_state
        Seeds ARPACK's start vector: the same input gives the same loadings.

    Returns
    -------
    loadings
        ``(genes, dim)`` float32; components ordered by decreasing singular value, each one's
        sign fixed so that its largest-magnitude loading is positive.
    used
        ``(genes,)`` bool, the genes expressed in at least ``min_cells`` cells.

    Raises
    ------
    ValueError
        Fewer than ``dim + 1`` cells or usable genes: too little data for ``dim`` components.
    """
    X = sp.csc_matrix(X, dtype=np.float64)
    n, n_genes = X.shape
    used = np.diff(X.indptr) >= min_cells
    if min(n, int(used.sum())) <= dim:
        raise ValueError(
            f"A {dim}-component co-expression embedding needs more than {dim} cells and more than {dim} genes "
            f"expressed in at least {min_cells} cells; got {n} cells and {int(used.sum())} such genes. "
            "Pass more cells, or initialise the gene embedding randomly."
        )
    mean = np.asarray(X.mean(0)).ravel()
    var = np.asarray(X.multiply(X).mean(0)).ravel() - mean**2
    w = np.where(used, 1.0 / np.sqrt(np.maximum(var, 1e-12)), 0.0)
    Z = X @ sp.diags(w)
    mu = mean * w
    ones = np.ones(n)
    op = LinearOperator(
        (n, n_genes), dtype=np.float64,
        matvec=lambda v: Z @ v - mu @ v, rmatvec=lambda v: Z.T @ v - mu * v.sum(),
        matmat=lambda V: Z @ V - np.outer(ones, mu @ V), rmatmat=lambda V: Z.T @ V - np.outer(mu, V.sum(0)),
    )
    v0 = np.random.default_rng(random_state).standard_normal(min(n, n_genes))
    _, s, vt = svds(op, k=dim, v0=v0)
    order = np.argsort(-s)
    s, vt = s[order], vt[order]
    vt *= np.sign(vt[np.arange(dim), np.abs(vt).argmax(1)])[:, None]
    loadings = (vt.T * s).astype(np.float32)
    loadings[~used] = 0.0  # exact zeros (ARPACK leaves round-off there)
    return loadings, used


@torch.no_grad()
def init_gene_embedding(model, X, *, std: float = EMBEDDING_STD, value_scale: float = 1.0, min_cells: int = MIN_CELLS,
                        random_state: int = 0) -> int:
    """Set a model's gene embedding rows to co-expression coordinates (:func:`coexpression_loadings`).

    The rows of genes expressed in at least ``min_cells`` cells of ``X`` are replaced by their
    loadings, scaled so that their entries have standard deviation ``std``; the other rows
    (and the depth tokens' rows) keep their current values; with ``value_scale != 1`` the value
    embedding's look-up table is multiplied by it as well. Call it on a new model before
    :func:`scxtrimo.tl.pretrain` (``model=``) or the corpus training script (``--gene-init``).

    Parameters
    ----------
    model
        An :class:`~scxtrimo.models.XTrimoGene`; modified in place.
    X
        ``(cells, 19264)`` log1p CP10k on the reference genes (for example
        :meth:`scxtrimo.data.Corpus.model_input`, or ``adata.X`` after ``pp.align_genes`` and
        ``pp.normalize``); use the training cells.
    std
        Standard deviation of the new rows' entries (the random rows have 0.02). Untrained
        xtrimo-3m on pbmc3k clustered best at 0.5 of 0.02, 0.1 and 0.5 (``docs/benchmarks.md``).
    value_scale
        Factor applied to the value embedding's look-up table (paper section 3.3). A token is its
        gene's row plus its value's embedding; with rows of sd 0.5 the default value embedding
        is about 60 times smaller per token (norms 0.11 against 6.7 on pbmc3k), so the encoder
        barely sees expression levels, and AdamW at lr 1e-4 needs thousands of steps to grow it.
        At 10, 20 CPU minutes of pretraining (gene table frozen) reach a lower validation
        masked MSE (0.363 against 0.387) but not better clusters (mean ARI 0.478 against
        0.492, ``docs/benchmarks.md``), so the default, 1, leaves the table as it is.
    min_cells
        Genes expressed in fewer cells of ``X`` keep their current rows (10: the bundled
        checkpoint's 16,175 of 19,264 genes on the corpus's training cells).
    random_state
        Seeds the truncated SVD's start vector: the same ``X`` gives the same rows.

    Returns
    -------
    int
        Number of gene rows set.

    Raises
    ------
    ValueError
        ``std`` or ``value_scale`` not a positive number; ``X`` without the model's 19,264
        reference genes as columns; fewer than ``enc_dim + 1`` cells, or genes expressed in at
        least ``min_cells`` of them (too little data for ``enc_dim`` components).
    """
    check_positive("std", std)
    check_positive("value_scale", value_scale)
    n_genes = model.config.n_genes
    if X.shape[1] != n_genes:
        raise ValueError(f"X has {X.shape[1]} genes; the model's gene embedding has {n_genes} (align to the reference genes first).")
    loadings, used = coexpression_loadings(X, model.config.enc_dim, min_cells=min_cells, random_state=random_state)
    rows = loadings[used]
    rows = rows / rows.std() * std
    weight = model.gene_embedding.weight
    idx = torch.from_numpy(np.flatnonzero(used)).to(weight.device)
    weight[idx] = torch.from_numpy(rows).to(weight.device, weight.dtype)
    model.value_embedding.table.weight.mul_(value_scale)
    return int(used.sum())
