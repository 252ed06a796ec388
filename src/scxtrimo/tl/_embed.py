"""Cell embeddings from the xTrimoGene encoder (paper section 3.1, appendix 4)."""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from .._anndata import package_version, rna_modality, xtrimo_uns
from .._bundled import DEFAULT_CHECKPOINT
from .._validation import check_positive
from .._inference import (  # noqa: F401  (re-exported: the inference loop lived here)
    BATCH_CELLS, MAX_TOKENS, RowSink, apply_rows, batch_cells, device_batches, embed_matrix, map_cells, resolve_model,
    run_rows, token_budget,
)
from ..data._bulk import bulk_median, check_bulk, model_input_blocks, quiet_input_detection
from ..data._depth import DEPTH_MODES
from ..data._prepare import check_no_empty_cells, prepare_input
from ..models._xtrimogene import POOLINGS, XTrimoGene, check_pooling
from ._distributed import DistContext, init_distributed

def check_key_added(key_added) -> None:
    """``ValueError`` unless ``key_added`` is a non-empty string (an ``obsm`` / ``uns`` key that ``write_h5ad`` takes)."""
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")


def depth_options(adata, *, target_depth: float, target_depth_mode: str, total_counts_key: str | None):
    """Check the depth-token arguments of :func:`embed`; return the obs totals (or None)."""
    if target_depth_mode not in DEPTH_MODES:
        raise ValueError(f"Unknown target_depth_mode {target_depth_mode!r}; choose one of {DEPTH_MODES}.")
    if target_depth_mode == "offset":  # T = S + value: any finite shift
        if isinstance(target_depth, bool) or not isinstance(target_depth, (int, float, np.number)) \
                or not np.isfinite(target_depth):
            raise ValueError(f"target_depth must be a finite number with target_depth_mode='offset', got {target_depth!r}.")
    else:  # T = value, or log10(total * value): a non-positive one leaves the T token out without a word
        try:
            check_positive("target_depth", target_depth)
        except ValueError:
            raise ValueError(f"target_depth must be a positive number with target_depth_mode={target_depth_mode!r} "
                             f"(4: 10,000 reads), got {target_depth!r}.") from None
    if total_counts_key is None:
        return None
    if total_counts_key not in adata.obs:
        raise KeyError(f"total_counts_key={total_counts_key!r} is not a column of adata.obs.")
    totals = np.asarray(adata.obs[total_counts_key], dtype=np.float64)
    if not np.all(np.isfinite(totals)) or np.any(totals <= 1):
        raise ValueError(f"obs[{total_counts_key!r}] must hold finite total counts above 1 (S = log10(total) is "
                         f"a token only when positive); its minimum is {np.nanmin(totals) if totals.size else None}.")
    return totals


def input_params(net, prep, *, bulk: str | None, median: float | None, target_depth: float, target_depth_mode: str,
                 total_counts_key: str | None) -> dict:
    """The provenance entries shared by :func:`embed` and :func:`~scxtrimo.tl.gene_embed`."""
    depth = net.config.depth_tokens and bulk is None
    source = (net.metadata or {}).get("source_sha256")
    return {
        "model": str(net.checkpoint_name or "untrained"),
        "sha256": str(net.checkpoint_sha256 or "none"),
        **({"source_sha256": str(source)} if source and source != net.checkpoint_sha256 else {}),
        "config": net.config.name,
        "scxtrimo_version": package_version(),
        "n_genes_matched": int(prep.n_matched),
        **({"target_depth": float(target_depth), "target_depth_mode": target_depth_mode} if depth else {}),
        **({"total_counts_key": total_counts_key} if depth and total_counts_key else {}),
        **({"bulk": bulk} if bulk else {}),
        **({"bulk_target_sum": float(median)} if median is not None else {}),
        "input": f"bulk-{bulk}" if bulk else prep.kind,
        "source": prep.source,
    }


def check_depth_tokens(X, obs_names, *, start: int, n_genes: int) -> None:
    """Refuse cells of a depth-token block that lack T or S (needed by ``pooling='all'``)."""
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    has_t = np.bincount(rows[X.indices == n_genes], minlength=X.shape[0]) > 0
    has_s = np.bincount(rows[X.indices == n_genes + 1], minlength=X.shape[0]) > 0
    bad = np.flatnonzero(~(has_t & has_s))
    if bad.size:
        names = list(obs_names[start + bad[:5]])
        raise ValueError(
            f"{bad.size} cells (e.g. {names}) have a total count of at most 1 (S = log10(total) <= 0) or a "
            "non-positive target depth T, so they have no depth token for pooling='all'. Remove them "
            "(`sc.pp.filter_cells(adata, min_counts=2)`), use pooling='max', or pass a positive target_depth."
        )

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
    model: str | os.PathLike | XTrimoGene = DEFAULT_CHECKPOINT,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    pooling: str | None = None,
    key_added: str = "X_xtrimo",
    gene_symbols: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    target_depth: float = 4.0,
    target_depth_mode: str = "fixed",
    total_counts_key: str | None = None,
    bulk: str | None = None,
    copy: bool = False,
    progress: bool = True,
):
    """Embed cells with the xTrimoGene encoder.

    Only the encoder runs, over each cell's expressed genes (paper section 3.1); its outputs are
    pooled over genes into one vector per cell: by the checkpoint's default pooling (mean for the
    bundled xtrimo-3m; max, as in the paper's clustering and annotation experiments, appendix 4
    and 8.1, for a checkpoint that names none). Raw counts with gene symbols work directly: the
    data are aligned to the 19,264 reference genes and normalized to log1p CP10k on the fly,
    block by block, without touching ``adata.X`` (backed AnnData works too). Data already prepared with
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
        if present, or ``layers[layer]``, or ``raw.X`` with ``use_raw``) holds raw counts, or
        normalized / log1p values that are turned back into counts (see :func:`scxtrimo.pp.normalize`).
    model
        Checkpoint name, checkpoint folder, or an :class:`~scxtrimo.models.XTrimoGene`. Default:
        the bundled checkpoint, :data:`scxtrimo.models.DEFAULT_CHECKPOINT` (no download).
    batch_size
        Most cells per encoder batch; defaults to 1 on CPU (fastest there, by measurement) and
        256 on CUDA.
    max_tokens
        Most tokens (cells x padded length) per batch; defaults to 4,096 on CPU and, on CUDA,
        what keeps a batch's activations near 1.25 GB: 151,552 for xtrimo-10m, 49,152 for
        xtrimo-100m and the authors' 100M model (peak GPU memory then under 2 GB). On CUDA each
        batch is padded to a fixed grid of lengths (at most 12.5% more), so that its few shapes
        reuse cuDNN's attention plans, and an out-of-memory batch is halved and retried.
    device
        ``"auto"`` (CUDA if available, with bf16 autocast), ``"cpu"`` or ``"cuda"``.
    pooling
        ``"max"`` (the paper's) or ``"mean"`` over each cell's tokens; ``"all"`` (models with
        depth tokens only; the authors' default) concatenates the encoder outputs at S and T
        with the max and the mean over the genes (``4 d`` numbers). ``None`` (default): the
        checkpoint's own choice (:attr:`~scxtrimo.models.XTrimoGene.default_pooling`; the
        bundled ``xtrimo-3m`` uses ``"mean"``, measured best for it), else ``"max"``.
    key_added
        ``obsm`` key of the result.
    gene_symbols
        ``var`` column holding gene symbols, if ``var_names`` are not symbols (e.g. Ensembl IDs).
    layer
        ``layers`` key of the matrix to read (e.g. ``"raw_counts"``), as scanpy's ``layer=``.
        ``None`` (default): ``layers['counts']`` if present, else ``X``.
    use_raw
        Read ``adata.raw.X``, with the genes of ``adata.raw.var`` (and ``gene_symbols`` a column
        of it), as scanpy's ``use_raw=``: where files from CELLxGENE and many other sources keep
        the raw counts beside a normalized ``X``. When ``X`` is read, is not raw counts and
        ``adata.raw`` holds counts, the warning (or error) about ``X`` says so.
    target_depth, target_depth_mode
        Models with depth tokens only: the target depth ``T`` given to the encoder beside the
        observed depth ``S = log10(total counts)``. ``"fixed"``: ``T = target_depth`` (default
        4, i.e. 10,000 reads, the authors' default); ``"scale"``: ``T = log10(total x
        target_depth)``; ``"offset"``: ``T = S + target_depth`` (``0``: the observed depth).
    total_counts_key
        Models with depth tokens only: ``obs`` column with each cell's raw total count, used for
        ``S`` (and ``T``) instead of the total recovered from the data, e.g. for log-normalized
        input whose raw totals are known.
    bulk
        Bulk RNA-seq samples instead of single cells, with the authors' conventions (paper
        section 5.4.3; ``docs/scfoundation.md``, "Bulk RNA-seq"). The values
        (``layers[layer]`` or ``raw.X`` if named, else ``X``, or ``layers['counts']`` for ``"counts"``) are taken as given, not checked for
        being integers or turned back into counts. ``"counts"``: raw (or expected) counts;
        every sample is scaled to the **median** total of all samples and ``log1p``'d (scanpy's
        ``normalize_total(target_sum=None)`` + ``log1p``); depth tokens ``T = S = log10`` of the
        sample's sum of those log values. ``"normalized"``: values already normalized and
        log-transformed, fed as they are; ``T = S`` = their plain sum. ``target_depth`` and
        ``target_depth_mode`` do not apply; ``total_counts_key`` must be ``None``.
    copy
        Return a new object instead of writing into ``adata``.
    progress
        Show a progress bar.

    Returns
    -------
    ``None``, or with ``copy=True`` a new AnnData/MuData. Writes into the AnnData:

    * ``obsm[key_added]``: ``(n_obs, d)`` float32 cell embeddings (``d`` = 128 for xtrimo-3m;
      ``4 d`` with ``pooling="all"``).
    * ``uns['xtrimo']['params']``: checkpoint name and sha256 (for the authors' file: the
      file's sha256; for a folder converted from it also ``source_sha256``), configuration,
      package version, number of reference genes matched, pooling, ``key_added``, the detected
      input kind (``'bulk-counts'`` / ``'bulk-normalized'`` with ``bulk``), the matrix read
      (``source``: ``"X"``, ``"raw.X"`` or ``"layers['<name>']"``), the depth-token
      settings, and with ``bulk="counts"`` the median total used (``bulk_target_sum``). This
      describes the latest call; ``uns['xtrimo']['params_by_key'][key_added]`` keeps the same
      record for every ``key_added`` embedded so far (so that embeddings of several checkpoints
      or poolings under different keys each keep theirs).

    Raises
    ------
    ValueError
        Too few genes match the reference list (e.g. mouse genes, Ensembl IDs without
        ``gene_symbols``); negative or non-finite values; cells with no expressed reference gene
        (filter them with ``sc.pp.filter_cells``); unknown ``pooling``, or ``"all"`` for a model
        without depth tokens or for cells with a total count of at most 1; an unknown
        ``target_depth_mode`` or ``bulk``; ``bulk`` with ``total_counts_key``; ``batch_size``
        or ``max_tokens`` not a positive integer; ``target_depth`` not a positive number
        (any finite number with ``target_depth_mode='offset'``); ``obs[total_counts_key]``
        totals of at most 1; ``key_added`` not a non-empty string; ``use_raw=True`` without
        ``adata.raw`` or with ``layer``; ``copy=True`` for a backed
        AnnData; cells after the first block whose values are of another kind (counts against
        log1p or normalized values) than the first cells'; a checkpoint that does not load.
        ``adata`` is unchanged when anything fails. A gene symbol in several columns is summed,
        with a ``UserWarning`` (as in :func:`scxtrimo.pp.align_genes`); gene names that match
        only without surrounding spaces or in another case are left out, with a ``UserWarning``;
        ``bulk=`` samples that express a median of fewer than 5,000 reference genes, as single
        cells do, get a ``UserWarning``. Data
        marked by :func:`scxtrimo.pp.normalize` are taken as the model's input only if
        normalized to 10,000 and still holding those values; otherwise their counts are read.
    KeyError
        ``total_counts_key`` is not a column of ``obs``; ``gene_symbols`` is not a column of
        ``var`` (``raw.var`` with ``use_raw``); ``layer`` is not a key of ``layers``.
    TypeError
        ``use_raw`` is not a bool.
    """
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")
    check_key_added(key_added)
    check_bulk(bulk, total_counts_key)
    data0 = rna_modality(adata)
    if copy and data0.isbacked:
        raise ValueError("copy=True of a backed AnnData needs a file name (anndata), which embed cannot take: use "
                         "copy=False (the embedding is kept in memory, in adata.obsm), or `adata.to_memory()` first.")
    totals = depth_options(data0, target_depth=target_depth, target_depth_mode=target_depth_mode,
                           total_counts_key=total_counts_key)
    target = adata.copy() if copy else adata
    data = rna_modality(target)
    with quiet_input_detection(bulk):
        prep = prepare_input(data, gene_symbols=gene_symbols, layer=layer, use_raw=use_raw)
    median = bulk_median(prep) if bulk == "counts" else None
    ctx, dev = init_distributed(device)
    try:
        net = resolve_model(model, dev)
        pooling = net.default_pooling if pooling is None else pooling
        check_pooling(pooling, net.config)
        budget, cells = token_budget(dev, max_tokens, config=net.config), batch_cells(dev, batch_size)
        out = np.zeros((data.n_obs, net.embedding_width(pooling)), dtype=np.float32)
        bar = tqdm(total=data.n_obs, desc="embed", unit="cell", disable=not progress or not ctx.is_main)
        blocks = model_input_blocks(prep, net.config, bulk=bulk, median=median, target_depth=target_depth,
                                    target_depth_mode=target_depth_mode, totals=totals)
        for start, stop, X in blocks:
            check_no_empty_cells(X, data.obs_names, start=start)
            if pooling == "all":
                check_depth_tokens(X, data.obs_names, start=start, n_genes=net.config.n_genes)
            batches = [np.sort(b) for b in device_batches(np.diff(X.indptr), dev, max_cells=cells, max_tokens=budget)]
            sink = RowSink(out, dev)
            for rows in batches[ctx.rank :: ctx.world_size]:
                sink.add(start + rows, run_rows(partial(net.embed_cells, pooling=pooling), X, rows, dev))
                bar.update(len(rows))
            sink.flush()
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
    params = input_params(net, prep, bulk=bulk, median=median, target_depth=target_depth,
                          target_depth_mode=target_depth_mode, total_counts_key=total_counts_key)
    record = {**params, "pooling": pooling, "key_added": key_added, "device": dev.type, "world_size": ctx.world_size}
    entry = xtrimo_uns(data)
    entry["params"] = record
    by_key = entry.get("params_by_key")
    entry["params_by_key"] = {**(by_key if isinstance(by_key, dict) else {}), key_added: dict(record)}
    return target if copy else None
