"""Map a data set's genes onto the xTrimoGene reference gene list (paper appendix 1).

The model reads every cell as a vector over the 19,264 reference genes, in the order of the
packaged list. :func:`align_genes` reorders a data set's columns into that order: genes not in
the list are dropped, list genes that the data does not measure stay zero, and several input
columns that carry the same symbol are summed.

Two lower-level pieces are shared with the streaming embedder, which aligns one block of cells
at a time: :func:`gene_mapping` (which input column goes to which reference position, checked
once per data set) and :func:`align_matrix` (apply that mapping to a block of rows).
"""

from __future__ import annotations

import copy as _copy
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._anndata import UNS_KEY, rna_modality
from .._reference import reference_genes
from .._validation import check_finite_nonnegative

__all__ = ["GeneMapping", "gene_mapping", "align_matrix", "align_genes"]

#: Rows read at a time from ``X`` (and ``layers['counts']``); keeps backed files out of memory.
_CHUNK_SIZE = 10_000

#: Refuse to align when fewer than this share of the reference list is matched ...
_MIN_REFERENCE_FRACTION = 0.05
#: ... unless at least this share of the input genes matched (a targeted gene panel).
_PANEL_INPUT_FRACTION = 0.5

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
# Mouse-style symbols: capital first letter followed by lower-case letters (Cd3e, Gapdh, Gm1234).
_TITLE_CASE_RE = re.compile(r"^[A-Z][a-z][A-Za-z0-9.\-]*$")

MATCHED_KEY = "xtrimo_matched"
KEPT_FRACTION_KEY = "xtrimo_kept_fraction"


@dataclass(frozen=True, eq=False)
class GeneMapping:
    """Which input column goes to which reference position.

    Attributes
    ----------
    src
        ``int64`` array of input column indices (0-based) whose symbol is in the reference list.
    dst
        ``int64`` array, same length as ``src``: the reference position of each of those columns.
        Values may repeat when several input columns carry the same symbol; they are summed.
    n_input_genes
        Number of input columns.
    n_matched
        Number of distinct reference genes that received at least one input column.
    duplicates
        Symbols that occur more than once among the matched input columns.
    unmatched_examples
        Up to 10 input symbols that are not in the reference list.
    """

    src: np.ndarray
    dst: np.ndarray
    n_input_genes: int
    n_matched: int
    duplicates: list[str] = field(default_factory=list)
    unmatched_examples: list[str] = field(default_factory=list)

    def selection_matrix(self, n_ref: int) -> sp.csr_matrix:
        """The ``(n_input_genes, n_ref)`` 0/1 ``float32`` matrix ``S`` with ``X @ S`` = aligned ``X``."""
        ones = np.ones(self.src.size, dtype=np.float32)
        return sp.csr_matrix((ones, (self.src, self.dst)), shape=(self.n_input_genes, n_ref))


def _as_symbols(values: Iterable[Any]) -> pd.Index:
    """Strings for matching; missing values become the empty string (which never matches)."""
    s = pd.Series(list(values) if not isinstance(values, (pd.Index, pd.Series)) else values)
    s = s.astype(object)
    s = s.where(s.notna(), "")
    return pd.Index(s.astype(str).to_numpy(), dtype=object)


#: Warn when at least this many (and this share of) input names match only after stripping spaces or changing case.
_NEAR_MISS_MIN = 20
_NEAR_MISS_FRACTION = 0.01


def _near_misses(unmatched: pd.Index, ref: pd.Index) -> list[tuple[str, str]]:
    """``(name, reference symbol)`` for unmatched names that match once stripped of surrounding
    spaces and compared without case (reference symbols that differ only in case are skipped)."""
    folded = pd.Series(ref, index=ref.str.upper())
    folded = folded[~folded.index.duplicated(keep=False)]
    keys = pd.Index([u.strip().upper() for u in unmatched])
    pos = folded.index.get_indexer(keys)
    return [(str(unmatched[i]), str(folded.iloc[p])) for i, p in enumerate(pos) if p >= 0 and unmatched[i]]


def _near_miss_hint(fixable: list[tuple[str, str]]) -> str:
    examples = ", ".join(f"{a!r} -> {b!r}" for a, b in fixable[:3])
    return (f"{len(fixable)} gene names match a reference symbol only without surrounding spaces or another case "
            f"(e.g. {examples}): clean `adata.var_names` (e.g. `.str.strip()`), or for mouse genes map them to "
            "human orthologs")


def _symbol_columns(var: pd.DataFrame | None, gene_list: pd.Index) -> list[str]:
    """Columns of ``var`` whose values look like reference symbols, best match first."""
    if var is None:
        return []
    found: list[tuple[int, str]] = []
    threshold = max(1, int(np.ceil(_MIN_REFERENCE_FRACTION * len(gene_list))))
    for col in var.columns:
        series = var[col]
        if not (
            pd.api.types.is_object_dtype(series)
            or pd.api.types.is_string_dtype(series)
            or isinstance(series.dtype, pd.CategoricalDtype)
        ):
            continue
        n_hit = int(pd.Index(_as_symbols(series)).unique().isin(gene_list).sum())
        if n_hit >= threshold:
            found.append((n_hit, str(col)))
    return [col for _, col in sorted(found, key=lambda t: -t[0])]


def gene_mapping(
    var_names: Sequence[str] | pd.Index,
    gene_list: Sequence[str] | pd.Index,
    *,
    var: pd.DataFrame | None = None,
) -> GeneMapping:
    """Match input gene symbols to a reference gene list.

    Matching is exact and case-sensitive (HGNC symbols are upper-case; mouse symbols are not and
    so do not match). Entries of the reference list that no input symbol equals exactly, such as
    the ``MT-ATP6__chrM``-style duplicates of mitochondrial genes or ``PCDHA@``, simply stay zero.

    Parameters
    ----------
    var_names
        The input gene symbols, one per column of the expression matrix.
    gene_list
        The reference gene symbols in model order (unique), e.g.
        :func:`scxtrimo.reference_genes`.
    var
        Optional ``adata.var``. Only used to improve error messages: when the input symbols look
        like Ensembl IDs or match too few genes, the message names the ``var`` columns that do
        hold matching symbols.

    Returns
    -------
    GeneMapping
        Column indices ``src`` into the input and reference positions ``dst``, plus match
        statistics.

    Raises
    ------
    ValueError
        If ``gene_list`` is not unique; if most input names look like Ensembl gene IDs (the
        message says which ``gene_symbols=`` column to use, if ``var`` has one); or if fewer than
        5% of the reference genes are matched and fewer than half of the input genes match (the
        message lists unmatched examples and the likely cause, e.g. mouse symbols). A targeted
        panel (most input genes matched, but few in total) is accepted with a ``UserWarning``.
    """
    ref = pd.Index(_as_symbols(gene_list))
    if not ref.is_unique:
        dup = ref[ref.duplicated()].unique()[:5].tolist()
        raise ValueError(f"gene_list must be unique; repeated symbols include {dup}.")
    names = _as_symbols(var_names)
    n_input = len(names)
    if n_input == 0:
        raise ValueError("The input has no genes (0 columns); nothing to align.")

    # Ensembl IDs instead of symbols: the commonest reason for a failed match.
    is_ensembl = np.fromiter((bool(_ENSEMBL_RE.match(n)) for n in names), dtype=bool, count=n_input)
    if is_ensembl.mean() > 0.5:
        columns = _symbol_columns(var, ref)
        if columns:
            fix = (
                f"`adata.var` has gene symbols in column(s) {columns}: pass "
                f"`gene_symbols='{columns[0]}'`."
            )
        else:
            fix = (
                "No column of `adata.var` holds matching symbols; map the IDs to HGNC symbols "
                "(e.g. with a GENCODE/Ensembl ID-to-name table), store them in a `var` column and "
                "pass `gene_symbols='<column>'`."
            )
        raise ValueError(
            f"{int(is_ensembl.sum())} of {n_input} gene names look like Ensembl IDs (e.g. "
            f"{names[is_ensembl][:3].tolist()}), but the reference list uses gene symbols. {fix}"
        )

    pos = ref.get_indexer(names)
    hit = pos >= 0
    src = np.flatnonzero(hit).astype(np.int64)
    dst = pos[hit].astype(np.int64)
    n_matched = int(np.unique(dst).size)

    matched_names = pd.Series(names[hit])
    duplicates = matched_names[matched_names.duplicated()].unique().tolist()
    unmatched = names[~hit]
    unmatched_examples = [str(u) for u in unmatched[:10]]

    fixable = _near_misses(unmatched, ref)
    too_few = n_matched < _MIN_REFERENCE_FRACTION * len(ref)
    if too_few and n_matched < _PANEL_INPUT_FRACTION * n_input:
        nonempty = [u for u in unmatched if u]
        title = np.mean([bool(_TITLE_CASE_RE.match(u)) for u in nonempty]) if nonempty else 0.0
        causes = []
        if title > 0.5:
            n_upper = int(pd.Index([u.upper() for u in nonempty]).isin(ref).sum())
            causes.append(
                f"most unmatched names are Title-case (like mouse symbols, e.g. 'Cd3e'); {n_upper} "
                "of them match once upper-cased. xTrimoGene is a human model: map mouse genes to "
                "their human orthologs (e.g. with biomaRt or pybiomart) before aligning"
            )
        elif len(fixable) > n_matched:
            causes.append(_near_miss_hint(fixable))
        columns = _symbol_columns(var, ref)
        if columns:
            causes.append(
                f"`adata.var` column(s) {columns} hold reference symbols: pass "
                f"`gene_symbols='{columns[0]}'`"
            )
        if not causes:
            causes.append(
                "the gene names may not be HGNC symbols (check `adata.var_names`, or pass the var "
                "column that holds symbols as `gene_symbols=`)"
            )
        raise ValueError(
            f"Only {n_matched} of the {len(ref)} reference genes matched the {n_input} input gene "
            f"names (at least {int(np.ceil(_MIN_REFERENCE_FRACTION * len(ref)))} are needed). "
            f"Unmatched examples: {unmatched_examples}. Likely cause: " + "; ".join(causes) + "."
        )
    elif len(fixable) >= max(_NEAR_MISS_MIN, _NEAR_MISS_FRACTION * n_input):
        warnings.warn(_near_miss_hint(fixable) + "; they are left out until the names are fixed.", UserWarning,
                      stacklevel=3)
    if too_few:
        warnings.warn(
            f"Only {n_matched} of the {len(ref)} reference genes are measured ({n_matched} of "
            f"{n_input} input genes matched): a targeted gene panel. The model will see very few "
            "genes per cell.",
            UserWarning,
            stacklevel=2,
        )
    return GeneMapping(
        src=src,
        dst=dst,
        n_input_genes=n_input,
        n_matched=n_matched,
        duplicates=[str(d) for d in duplicates],
        unmatched_examples=unmatched_examples,
    )


def _as_float32_csr(X) -> sp.csr_matrix:
    if sp.issparse(X):
        out = X.tocsr() if X.format != "csr" else X
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        return out
    return sp.csr_matrix(np.asarray(X, dtype=np.float32))


def align_matrix(X, mapping: GeneMapping, n_ref: int) -> sp.csr_matrix:
    """Reorder the columns of an expression block into reference order.

    Parameters
    ----------
    X
        ``(n_obs, mapping.n_input_genes)`` matrix: scipy CSR/CSC/COO or dense, any numeric dtype.
        May be any block of rows of a larger matrix.
    mapping
        From :func:`gene_mapping`.
    n_ref
        Length of the reference list (19,264 for the packaged one).

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_obs, n_ref)``, ``float32``, sorted indices, no explicit zeros. Values are those of
        ``X`` (cast to ``float32``); columns that share a reference gene are summed; reference
        genes without an input column are zero. ``X`` is not modified.
    """
    if X.shape[1] != mapping.n_input_genes:
        raise ValueError(
            f"X has {X.shape[1]} columns but the gene mapping was built for "
            f"{mapping.n_input_genes} genes."
        )
    Xc = _as_float32_csr(X)
    out = (Xc @ mapping.selection_matrix(n_ref)).tocsr()
    if out.dtype != np.float32:
        out = out.astype(np.float32)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def _row_sums(X) -> np.ndarray:
    return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()


def warn_duplicates(mapping: GeneMapping, *, stacklevel: int = 2) -> None:
    """Warn when gene symbols occur in more than one column (their counts are summed)."""
    if mapping.duplicates:
        warnings.warn(
            f"{len(mapping.duplicates)} gene symbols occur in more than one column and were "
            f"summed, e.g. {mapping.duplicates[:5]}.",
            UserWarning,
            stacklevel=stacklevel,
        )


def align_genes(
    adata,
    *,
    gene_list: Sequence[str] | pd.Index | None = None,
    gene_symbols: str | None = None,
    copy: bool = False,
) -> ad.AnnData:
    """Put a data set's genes in the order of the xTrimoGene reference list.

    Implements the gene mapping of paper appendix 1 ("scRNA-seq data collection and
    processing"): genes outside the 19,264-gene list are dropped, list genes the data lacks are
    zero. Matching is exact and case-sensitive on symbols; reference entries that no data set
    names exactly (the ``MT-ATP6__chrM``-style mitochondrial duplicates, ``PCDHA@`` and similar)
    stay zero. Input columns that carry the same symbol are summed (with a warning).

    Parameters
    ----------
    adata
        :class:`~anndata.AnnData` (in memory or backed, ``read_h5ad(..., backed='r')``) or a
        ``MuData``, whose RNA modality is used. ``X`` holds raw counts or non-negative
        normalized values; it is read in blocks of 10,000 cells, so a backed file is never
        loaded whole. Never modified.
    gene_list
        Reference symbols in model order; defaults to :func:`scxtrimo.reference_genes`.
    gene_symbols
        Column of ``adata.var`` holding gene symbols, to use instead of ``var_names`` (for data
        indexed by Ensembl IDs).
    copy
        The gene axis changes, so the result is always a new object with newly built ``X``,
        ``var``, ``obs`` and layers. With ``copy=False`` the entries of ``obsm``, ``obsp`` and
        ``uns`` are shared with the input (the containers are new, the arrays inside are the
        same objects); ``copy=True`` deep-copies them.

    Returns
    -------
    anndata.AnnData
        ``n_obs x len(gene_list)`` (19,264 by default):

        - ``X``: CSR ``float32``, the input values (counts stay counts) in reference order
          (``None`` if the input's ``X`` is ``None`` and its counts are in ``layers['counts']``).
        - ``layers['counts']``: aligned the same way, if the input has that layer; other layers
          are dropped.
        - ``var``: index = reference symbols; boolean ``var['xtrimo_matched']``.
        - ``obs``: a copy of the input's, plus ``obs['xtrimo_kept_fraction']``, the share of each
          cell's total (of ``layers['counts']`` if present, else ``X``) that falls on reference
          genes; 0.0 for cells whose total is zero.
        - ``uns['xtrimo']['align']``: ``n_input_genes``, ``n_matched`` (distinct reference genes
          matched), ``fraction_matched`` (of the reference list), ``n_duplicates``,
          ``kept_fraction_median``, ``kept_fraction_min``. The marker of
          :func:`scxtrimo.pp.normalize` (``uns['xtrimo']['normalize']``) is dropped: values
          normalized over the input's genes are not log1p CP10k over the reference genes, so
          run :func:`~scxtrimo.pp.normalize` after ``align_genes`` (it reads ``layers['counts']``).

        ``obsm``, ``obsp`` and ``uns`` are carried over (see ``copy``); ``varm``, ``varp``,
        ``raw`` and the input's ``var`` columns are not, as they describe the old gene axis.

    Raises
    ------
    ValueError
        Too few genes match, or the names look like Ensembl IDs (see
        :func:`~scxtrimo.pp._align.gene_mapping`); ``X`` (or ``layers['counts']``) has negative,
        NaN or infinite values; ``X`` is ``None`` with no ``layers['counts']``; an empty
        ``gene_list``.
    TypeError
        ``gene_list`` is a single string.
    KeyError
        ``gene_symbols`` is not a column of ``adata.var``.

    Warns
    -----
    UserWarning
        When duplicate symbols are summed (naming up to 5).

    Examples
    --------
    >>> import scxtrimo
    >>> adata = scxtrimo.datasets.pbmc3k()
    >>> aligned = scxtrimo.pp.align_genes(adata)
    >>> aligned.shape
    (2638, 19264)
    """
    data = rna_modality(adata)
    if isinstance(gene_list, str):
        raise TypeError(f"gene_list must be a list of gene symbols, got the string {gene_list!r}.")
    ref = reference_genes() if gene_list is None else pd.Index(_as_symbols(gene_list))
    n_ref = len(ref)
    if n_ref == 0:
        raise ValueError("gene_list is empty; pass the model's gene symbols, or None for the reference list.")

    if gene_symbols is None:
        names = data.var_names
    else:
        if gene_symbols not in data.var.columns:
            raise KeyError(
                f"gene_symbols={gene_symbols!r} is not a column of adata.var (columns: "
                f"{list(data.var.columns)})."
            )
        names = data.var[gene_symbols]
    mapping = gene_mapping(names, ref, var=data.var)

    warn_duplicates(mapping, stacklevel=3)

    has_counts = "counts" in data.layers
    sources = {} if data.X is None else {"X": data.X}
    if has_counts:
        sources["counts"] = data.layers["counts"]
    if not sources:
        raise ValueError("adata.X is None and there is no layers['counts']; put the expression matrix in X.")

    n_obs = data.n_obs
    blocks: dict[str, list[sp.csr_matrix]] = {k: [] for k in sources}
    totals, kept = [], []
    total_key = "counts" if has_counts else "X"
    for start in range(0, n_obs, _CHUNK_SIZE):
        stop = min(start + _CHUNK_SIZE, n_obs)
        for key, M in sources.items():
            block = M[start:stop]
            what = "adata.X" if key == "X" else "adata.layers['counts']"
            check_finite_nonnegative(block, what=what)
            aligned = align_matrix(block, mapping, n_ref)
            blocks[key].append(aligned)
            if key == total_key:
                totals.append(_row_sums(block))
                kept.append(_row_sums(aligned))

    def stack(parts: list[sp.csr_matrix]) -> sp.csr_matrix:
        if not parts:
            return sp.csr_matrix((0, n_ref), dtype=np.float32)
        if len(parts) == 1:
            return parts[0]
        out = sp.vstack(parts, format="csr").astype(np.float32, copy=False)
        out.sort_indices()
        return out

    X_al = stack(blocks["X"]) if "X" in blocks else None
    total = np.concatenate(totals) if totals else np.zeros(0)
    kept_sum = np.concatenate(kept) if kept else np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(total > 0, kept_sum / np.where(total > 0, total, 1.0), 0.0)
    frac = np.clip(frac, 0.0, 1.0)

    obs = data.obs.copy()
    obs[KEPT_FRACTION_KEY] = frac
    matched = np.zeros(n_ref, dtype=bool)
    matched[mapping.dst] = True
    var = pd.DataFrame({MATCHED_KEY: matched}, index=pd.Index(ref, name=None).astype(str))

    def carry(mapping_like) -> dict:
        d = dict(mapping_like)
        return _copy.deepcopy(d) if copy else d

    uns = carry(data.uns)
    entry = uns.get(UNS_KEY)
    entry = dict(entry) if isinstance(entry, dict) else {}  # never write into the input's dict
    # values normalized over the input's genes no longer sum to target_sum over the reference genes:
    # drop the marker, so that tl.embed and pp.normalize start again from the aligned counts
    entry.pop("normalize", None)
    entry["align"] = {
        "n_input_genes": int(mapping.n_input_genes),
        "n_matched": int(mapping.n_matched),
        "fraction_matched": float(mapping.n_matched / n_ref),
        "n_duplicates": int(len(mapping.duplicates)),
        "kept_fraction_median": float(np.median(frac)) if frac.size else 0.0,
        "kept_fraction_min": float(frac.min()) if frac.size else 0.0,
    }
    uns[UNS_KEY] = entry

    layers = {"counts": stack(blocks["counts"])} if has_counts else {}
    return ad.AnnData(
        X=X_al,
        obs=obs,
        var=var,
        uns=uns,
        obsm=carry(data.obsm),
        obsp=carry(data.obsp),
        layers=layers,
    )
