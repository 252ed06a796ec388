"""Gene-context embeddings and predicted expression from the xTrimoGene decoder (paper 5.4.2)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._anndata import UNS_KEY, rna_modality, xtrimo_uns
from .._bundled import DEFAULT_CHECKPOINT
from .._device import resolve_device
from .._inference import resolve_model
from .._oom import halve_rows_on_oom
from .._reference import reference_genes
from .._validation import check_positive
from ..data._prepare import check_no_empty_cells, prepare_input
from ..models._io import load
from ..models._xtrimogene import XTrimoGene
from ..data._bulk import bulk_median, check_bulk, model_input_blocks, quiet_input_detection
from ._embed import check_key_added, depth_options, input_params

#: Default cells per decoder pass, by device type (every pass runs over all 19,266 positions).
GENE_BATCH = {"cpu": 1, "cuda": 4}


def _select_genes(genes: str | Sequence[str] | None) -> tuple[np.ndarray, pd.Index]:
    """Reference positions and names of ``genes`` (all 19,264 for ``None``), in the order given."""
    ref = reference_genes()
    if genes is None:
        return np.arange(len(ref)), ref
    if not isinstance(genes, str) and not (isinstance(genes, Iterable) and all(isinstance(g, str) for g in genes)):
        raise TypeError(f"genes must be a gene symbol or a list of gene symbols, got {genes!r}.")
    names = pd.Index([genes] if isinstance(genes, str) else list(genes), dtype=object)
    if len(names) == 0:
        raise ValueError("genes is empty; pass gene symbols of the reference list, or None for all 19,264.")
    if names.has_duplicates:
        raise ValueError(f"genes lists {list(names[names.duplicated()].unique()[:5])} more than once.")
    idx = ref.get_indexer(names)
    unknown = names[idx < 0]
    if len(unknown):
        raise KeyError(f"{len(unknown)} of the genes are not in the 19,264-gene reference list (e.g. "
                       f"{list(unknown[:5])}); use gene symbols of `scxtrimo.reference_genes()`.")
    return idx.astype(np.int64), names


def _groups(adata, groupby: str | None) -> tuple[np.ndarray | None, pd.Index | None]:
    """Per-cell group code (-1: no group) and the group names (groups with at least one cell)."""
    if groupby is None:
        return None, None
    if not isinstance(groupby, str):
        raise TypeError(f"groupby must be the name of one obs column, got {groupby!r}.")
    if groupby not in adata.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs ({list(adata.obs.columns)[:10]}).")
    cat = pd.Categorical(adata.obs[groupby])
    counts = np.bincount(cat.codes[cat.codes >= 0], minlength=len(cat.categories))
    used = np.flatnonzero(counts > 0)
    if used.size == 0:
        raise ValueError(f"obs[{groupby!r}] has no value for any cell: there is no group to average over.")
    remap = np.full(len(cat.categories) + 1, -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    return remap[cat.codes], pd.Index(cat.categories[used].astype(str))


@contextmanager
def _float32_matmul():
    """Full float32 matrix products on CUDA (no TF32), the precision of the authors' runs."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def gene_embed(
    adata,
    *,
    model: str | os.PathLike | XTrimoGene = DEFAULT_CHECKPOINT,
    genes: str | Sequence[str] | None = None,
    groupby: str | None = None,
    key_added: str = "X_xtrimo_gene",
    batch_size: int | None = None,
    device: str = "auto",
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
    """Gene-context embeddings and predicted expression from the xTrimoGene decoder.

    For each cell the encoder runs over its expressed genes (and the depth tokens T and S of
    models that have them) and the decoder over all 19,264 genes, nothing masked (paper
    section 3.2; the authors' gene-context embeddings, section 5.4.2;
    ``docs/scfoundation.md``, "Gene-context embeddings"). A gene's context embedding is the
    decoder's output at that gene after its final LayerNorm(s); the expression prediction is
    the ``d -> 1`` head on it (log1p CP10k scale; the authors call it "not recommended").
    For the authors' released model load the ``gene`` sub-model:
    ``scxtrimo.models.load("models.ckpt", part="gene")``.

    A cell's outputs are ``19,264 x d`` numbers (``d = 512``: 39 MB per cell for the
    released model), so results are kept for chosen ``genes`` per cell, or averaged over groups
    of cells (``groupby``), or both. Cells are read block by block (backed AnnData works),
    input as in :func:`scxtrimo.tl.embed` (raw counts normalized on the fly, depth tokens,
    ``bulk``). A cell's result never depends on the other cells of its decoder pass (the
    Performer's key maximum is taken per cell), so ``batch_size`` changes speed only.
    Computation is float32 throughout (no mixed precision, no TF32 on CUDA).

    Parameters
    ----------
    adata
        AnnData (or MuData: its RNA modality) with ``n_obs`` cells, as for :func:`scxtrimo.tl.embed`.
    model
        Checkpoint name, checkpoint folder, an :class:`~scxtrimo.models.XTrimoGene`, or the
        path of the authors' ``models.ckpt``, of which the ``gene`` sub-model is then loaded.
        Default: the bundled checkpoint, :data:`scxtrimo.models.DEFAULT_CHECKPOINT`.
    genes
        Gene symbols of the reference list (:func:`scxtrimo.reference_genes`), or one symbol;
        results are kept for these, in this order. ``None``: all 19,264 (needs ``groupby``).
    groupby
        ``obs`` column: results are averaged over the cells of each of its values (cells with
        no value are skipped). ``None``: results per cell (needs ``genes``).
    key_added
        Where results go (see Returns).
    batch_size
        Cells per decoder pass; defaults to 1 on CPU and 4 on CUDA (a pass of the released
        model needs about 1.5 GB per cell). On CUDA an out-of-memory pass is halved and retried.
    device
        ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
    gene_symbols, layer, use_raw, target_depth, target_depth_mode, total_counts_key, bulk
        As in :func:`scxtrimo.tl.embed`.
    copy
        Return a new object instead of writing into ``adata``.
    progress
        Show a progress bar (cells).

    Returns
    -------
    ``None``, or with ``copy=True`` a new AnnData/MuData. Writes, with ``G`` the genes kept,
    ``d`` the decoder width (512 for the released model) and ``k`` the groups:

    * without ``groupby``: ``obsm[key_added]``, ``(n_obs, G, d)`` float32 gene-context
      embeddings, and ``obsm[key_added + '_expression']``, ``(n_obs, G)`` float32 predicted
      log1p CP10k values;
    * with ``groupby``: ``uns[key_added]['embedding']``, ``(k, G, d)`` float32 and
      ``uns[key_added]['expression']``, ``(k, G)`` float32: means over each group's cells
      (accumulated in float64); ``uns[key_added]['groups']`` (``(k,)`` str, the
      categories' order), ``['n_cells']`` (``(k,)`` int64) and ``['groupby']``; per-cell
      results of an earlier call under ``key_added`` (other genes) are removed from ``obsm``;
    * always ``uns[key_added]['genes']``, ``(G,)`` str, and ``uns['xtrimo']['gene_embed']``:
      checkpoint name and sha256, configuration, package version, genes matched, input kind,
      matrix read (``source``), depth-token or bulk settings, ``key_added``, ``groupby``, number
      of genes kept, device.

    Raises
    ------
    ValueError
        Neither ``genes`` nor ``groupby`` (per-cell results for all genes would take 39 MB per
        cell); an empty or duplicated ``genes``; a ``groupby`` column without values; too few
        genes matching the reference list; negative or non-finite values; cells with no
        expressed reference gene; an unknown ``target_depth_mode`` or ``bulk``; ``batch_size``
        not a positive integer; ``key_added='xtrimo'`` (scxtrimo's own record); ``use_raw=True``
        without ``adata.raw`` or with ``layer``; a checkpoint
        that does not load. ``adata`` is unchanged when anything fails. ``bulk=`` samples that
        express a median of fewer than 5,000 reference genes, as single cells do, get a
        ``UserWarning``.
    KeyError
        ``genes`` not in the reference list; ``groupby`` or ``total_counts_key`` not in ``obs``;
        ``layer`` not in ``layers``.
    TypeError
        ``genes`` is not a symbol or a list of symbols; ``groupby`` is not one column name.

    Examples
    --------
    >>> import scxtrimo
    >>> adata = scxtrimo.datasets.pbmc3k()[:5].copy()
    >>> scxtrimo.tl.gene_embed(adata, genes=["CD3E", "MS4A1"], progress=False)
    >>> adata.obsm["X_xtrimo_gene"].shape
    (5, 2, 128)
    """
    check_bulk(bulk, total_counts_key)
    check_positive("batch_size", batch_size, integer=True, optional=True)
    check_key_added(key_added)
    if key_added == UNS_KEY:
        raise ValueError(f"key_added={key_added!r} would replace uns[{UNS_KEY!r}], where scxtrimo records its "
                         "parameters; choose another key (default 'X_xtrimo_gene').")
    if genes is None and groupby is None:
        raise ValueError(
            "Per-cell gene-context embeddings of all 19,264 genes take 19,264 x d float32 per cell (39 MB for the "
            "released model's d = 512); choose genes=[...] (per cell), groupby='<obs column>' (means per group), or both."
        )
    data0 = rna_modality(adata)
    totals = depth_options(data0, target_depth=target_depth, target_depth_mode=target_depth_mode,
                           total_counts_key=total_counts_key)
    sel, names = _select_genes(genes)
    codes, groups = _groups(data0, groupby)
    with quiet_input_detection(bulk):
        prep = prepare_input(data0, gene_symbols=gene_symbols, layer=layer, use_raw=use_raw)
    median = bulk_median(prep) if bulk == "counts" else None
    dev = resolve_device(device)
    if isinstance(model, (str, os.PathLike)) and Path(model).is_file():  # the authors' file: its gene sub-model
        net = load(model, part="gene", device=dev).eval()
    else:
        net = resolve_model(model, dev)
    cells = int(batch_size) if batch_size is not None else GENE_BATCH.get(dev.type, 1)
    n, g, d = data0.n_obs, len(sel), net.config.dec_dim
    index = torch.as_tensor(sel, device=dev)
    if groupby is None:
        emb, expr = np.zeros((n, g, d), np.float32), np.zeros((n, g), np.float32)
    else:
        emb, expr = np.zeros((len(groups), g, d)), np.zeros((len(groups), g))  # float64 sums

    blocks = model_input_blocks(prep, net.config, bulk=bulk, median=median, target_depth=target_depth,
                                target_depth_mode=target_depth_mode, totals=totals)
    n_todo = n if codes is None else int((codes >= 0).sum())
    bar = tqdm(total=n_todo, desc="gene_embed", unit="cell", disable=not progress)
    with _float32_matmul():
        for start, stop, X in blocks:
            check_no_empty_cells(X, data0.obs_names, start=start)

            def run(rows: np.ndarray, X=X) -> np.ndarray:
                inputs = torch.from_numpy(X[rows].toarray()).to(dev)
                with torch.inference_mode():
                    h, pred = net.gene_context(inputs)
                    both = torch.cat([h[:, index], pred[:, index, None]], dim=-1)  # (B, G, d + 1)
                return both.float().cpu().numpy()

            rows = np.arange(stop - start) if codes is None else np.flatnonzero(codes[start:stop] >= 0)
            for i in range(0, len(rows), cells):
                part = rows[i : i + cells]
                out = halve_rows_on_oom(run, part)
                if codes is None:
                    emb[start + part], expr[start + part] = out[..., :d], out[..., d]
                else:
                    np.add.at(emb, codes[start + part], out[..., :d])
                    np.add.at(expr, codes[start + part], out[..., d])
                bar.update(len(part))
            del X
    bar.close()

    target = adata.copy() if copy else adata
    data = rna_modality(target)
    entry = {"genes": np.asarray(names, dtype=str)}
    if groupby is None:
        data.obsm[key_added] = emb
        data.obsm[f"{key_added}_expression"] = expr
    else:  # per-cell results of an earlier call are of other genes: drop them, as uns[key_added] is replaced
        data.obsm.pop(key_added, None)
        data.obsm.pop(f"{key_added}_expression", None)
        n_cells = np.bincount(codes[codes >= 0], minlength=len(groups)).astype(np.int64)
        entry.update(embedding=(emb / n_cells[:, None, None]).astype(np.float32),
                     expression=(expr / n_cells[:, None]).astype(np.float32),
                     groups=np.asarray(groups, dtype=str), n_cells=n_cells, groupby=groupby)
    data.uns[key_added] = entry
    params = input_params(net, prep, bulk=bulk, median=median, target_depth=target_depth,
                          target_depth_mode=target_depth_mode, total_counts_key=total_counts_key)
    xtrimo_uns(data)["gene_embed"] = {**params, "key_added": key_added, "groupby": groupby or "none", "n_genes": int(g),
                                      "device": dev.type}
    return target if copy else None
