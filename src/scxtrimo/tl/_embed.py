"""Cell embeddings from the xTrimoGene encoder (paper section 3.1, appendix 4)."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from .._anndata import package_version, rna_modality, xtrimo_uns
from .._device import autocast, resolve_device
from .._oom import halve_rows_on_oom
from ..data._batching import TokenBatch, csr_row_batch, length_batches
from ..data._prepare import check_no_empty_cells, iter_log1p_blocks, prepare_input
from ..models._io import load
from ..models._xtrimogene import POOLINGS, XTrimoGene
from ._distributed import DistContext, init_distributed

#: Default encoder token budget per batch (cells x longest cell), by device type.
MAX_TOKENS = {"cpu": 4_096, "cuda": 262_144}
#: Default most cells per encoder batch, by device type. On CPU one cell per call is fastest
#: (docs/benchmarks.md, "No compute on padding"): the encoder is compute-bound already at one
#: cell, and only an unpadded call runs SDPA's fused CPU kernel instead of the masked one.
BATCH_CELLS = {"cpu": 1, "cuda": 256}


def batch_cells(device: torch.device, batch_size: int | None = None) -> int:
    """``batch_size`` if given, else the default most cells per encoder batch for ``device``."""
    return batch_size or BATCH_CELLS.get(device.type, BATCH_CELLS["cpu"])


def token_budget(device: torch.device, max_tokens: int | None = None) -> int:
    """``max_tokens`` if given, else the default encoder token budget for ``device``."""
    return max_tokens or MAX_TOKENS.get(device.type, MAX_TOKENS["cpu"])


def resolve_model(model: str | os.PathLike | XTrimoGene, device: torch.device) -> XTrimoGene:
    """A checkpoint name, a checkpoint folder or an :class:`XTrimoGene`, on ``device`` in eval mode."""
    if isinstance(model, XTrimoGene):
        return model.to(device).eval()
    return load(model, device=device)


def apply_rows(fn: Callable[[TokenBatch], torch.Tensor], X, rows: np.ndarray, device: torch.device) -> np.ndarray:
    """``fn`` on the cells ``X[rows]`` (log1p rows) as one batch, in inference mode, as float32.

    ``fn`` maps a :class:`TokenBatch` to an ``(n, k)`` tensor. On CUDA out-of-memory the rows are
    halved and retried.
    """

    def run(part: np.ndarray) -> np.ndarray:
        batch = csr_row_batch(X, part).to(device, non_blocking=True)
        with torch.inference_mode(), autocast(device):
            return fn(batch).float().cpu().numpy()

    return halve_rows_on_oom(run, rows)


def map_cells(fn: Callable[[TokenBatch], torch.Tensor], X, rows: np.ndarray, device: torch.device, *, width: int,
              max_cells: int, max_tokens: int) -> np.ndarray:
    """``(len(rows), width)`` float32: :func:`apply_rows` over ``X[rows]`` in length-bucketed batches."""
    out = np.empty((len(rows), width), dtype=np.float32)
    for b in length_batches(np.diff(X.indptr)[rows], max_cells=max_cells, max_tokens=max_tokens):
        b = np.sort(b)
        out[b] = apply_rows(fn, X, rows[b], device)
    return out


def embed_matrix(model: XTrimoGene, X, rows: np.ndarray, pooling: str, device: torch.device, *, max_cells: int,
                 max_tokens: int) -> np.ndarray:
    """Embeddings ``(len(rows), d)`` of ``X[rows]`` (log1p rows), in length-bucketed batches."""
    return map_cells(partial(model.embed_cells, pooling=pooling), X, rows, device, width=model.embedding_dim,
                     max_cells=max_cells, max_tokens=max_tokens)


def _gather_rows(out: np.ndarray, start: int, shards: list[np.ndarray], ctx: DistContext, device: torch.device) -> None:
    """Give every rank the rows the other ranks embedded: ``shards[r]`` are rank ``r``'s rows of
    the block starting at ``start``; ``out[start + shards[ctx.rank]]`` is filled locally."""
    import torch.distributed as dist

    width = max(len(s) for s in shards)
    local = torch.zeros(width, out.shape[1], dtype=torch.float32)
    local[: len(shards[ctx.rank])] = torch.from_numpy(out[start + shards[ctx.rank]])
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    parts = [torch.empty_like(local, device=comm) for _ in shards]
    dist.all_gather(parts, local.to(comm))
    for rows, part in zip(shards, parts):
        out[start + rows] = part[: len(rows)].cpu().numpy()


def embed(
    adata,
    *,
    model: str | os.PathLike | XTrimoGene = "xtrimo-3m",
    batch_size: int | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    pooling: str = "max",
    key_added: str = "X_xtrimo",
    gene_symbols: str | None = None,
    copy: bool = False,
    progress: bool = True,
):
    """Embed cells with the xTrimoGene encoder.

    Only the encoder runs, over each cell's expressed genes (paper section 3.1); its outputs are
    max-pooled over genes into one vector per cell, as in the paper's clustering and annotation
    experiments (appendix 4, 8.1). Raw counts with gene symbols work directly: the data are
    aligned to the 19,264 reference genes and normalized to log1p CP10k on the fly, block by
    block, without touching ``adata.X`` (backed AnnData works too). Data already prepared with
    :func:`scxtrimo.pp.align_genes` and :func:`scxtrimo.pp.normalize` are used as they are.
    Cells are batched with others of similar length, so little work goes to padding. The result
    is deterministic for a given model, input and device.

    Under ``torchrun`` (or inside an initialized ``torch.distributed`` process group) the work is
    sharded: every process reads the same input, embeds every ``world_size``-th length batch on
    its own device (``cuda:LOCAL_RANK``, backend nccl; gloo on CPU) and the rows are gathered so
    that every process ends with the full embedding, identical to a single process's (the
    batches are the same; only their owner changes). ``scxtrimo embed`` writes the output from
    rank 0: ``torchrun --nproc_per_node=4 -m scxtrimo.cli embed in.h5ad out.h5ad``.

    Parameters
    ----------
    adata
        AnnData (or MuData: its RNA modality) with ``n_obs`` cells. ``X`` (or ``layers['counts']``
        if present) holds raw counts, or normalized / log1p values that are turned back into
        counts (see :func:`scxtrimo.pp.normalize`).
    model
        Checkpoint name (``"xtrimo-3m"``, bundled), checkpoint folder, or an
        :class:`~scxtrimo.models.XTrimoGene`.
    batch_size
        Most cells per encoder batch; defaults to 1 on CPU (fastest there, by measurement) and
        256 on CUDA.
    max_tokens
        Most tokens (cells x longest cell in the batch) per batch; defaults to 4,096 on CPU and
        262,144 on CUDA. On CUDA, an out-of-memory batch is halved and retried.
    device
        ``"auto"`` (CUDA if available, with bf16 autocast), ``"cpu"`` or ``"cuda"``.
    pooling
        ``"max"`` (the paper's) or ``"mean"`` over each cell's genes.
    key_added
        ``obsm`` key of the result.
    gene_symbols
        ``var`` column holding gene symbols, if ``var_names`` are not symbols (e.g. Ensembl IDs).
    copy
        Return a new object instead of writing into ``adata``.
    progress
        Show a progress bar.

    Returns
    -------
    ``None``, or with ``copy=True`` a new AnnData/MuData. Writes into the AnnData:

    * ``obsm[key_added]``: ``(n_obs, d)`` float32 cell embeddings (``d`` = 128 for xtrimo-3m).
    * ``uns['xtrimo']['params']``: checkpoint name and sha256, configuration, package version,
      number of reference genes matched, pooling, ``key_added`` and the detected input kind.

    Raises
    ------
    ValueError
        Too few genes match the reference list (e.g. mouse genes, Ensembl IDs without
        ``gene_symbols``); negative or non-finite values; cells with no expressed reference gene
        (filter them with ``sc.pp.filter_cells``); unknown ``pooling``; a checkpoint that does
        not load. ``adata`` is unchanged when anything fails.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")
    target = adata.copy() if copy else adata
    data = rna_modality(target)
    prep = prepare_input(data, gene_symbols=gene_symbols)
    ctx, dev = init_distributed(device)
    try:
        net = resolve_model(model, dev)
        budget, cells = token_budget(dev, max_tokens), batch_cells(dev, batch_size)
        out = np.zeros((data.n_obs, net.embedding_dim), dtype=np.float32)
        bar = tqdm(total=data.n_obs, desc="embed", unit="cell", disable=not progress or not ctx.is_main)
        for start, stop, X in iter_log1p_blocks(prep):
            check_no_empty_cells(X, data.obs_names, start=start)
            batches = [np.sort(b) for b in length_batches(np.diff(X.indptr), max_cells=cells, max_tokens=budget)]
            for rows in batches[ctx.rank :: ctx.world_size]:
                out[start + rows] = apply_rows(partial(net.embed_cells, pooling=pooling), X, rows, dev)
                bar.update(len(rows))
            if ctx.world_size > 1:
                shards = [np.concatenate(batches[r :: ctx.world_size] or [np.zeros(0, np.int64)]).astype(np.int64)
                          for r in range(ctx.world_size)]
                _gather_rows(out, start, shards, ctx, dev)
                bar.update(sum(len(s) for r, s in enumerate(shards) if r != ctx.rank))
            del X, batches  # free this block before the next one is read: one block in memory, not two
        bar.close()
    finally:
        ctx.shutdown()

    data.obsm[key_added] = out
    xtrimo_uns(data)["params"] = {
        "model": str(net.checkpoint_name or "untrained"),
        "sha256": str(net.checkpoint_sha256 or "none"),
        "config": net.config.name,
        "scxtrimo_version": package_version(),
        "n_genes_matched": int(prep.n_matched),
        "pooling": pooling,
        "key_added": key_added,
        "input": prep.kind,
        "device": dev.type,
        "world_size": ctx.world_size,
    }
    return target if copy else None
