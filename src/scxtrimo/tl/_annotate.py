"""Cell-type annotation by fine-tuning the xTrimoGene encoder (paper section 5.4.1, appendix 8.1).

Encoder, pooling over genes (the checkpoint's default; max in the paper), one linear layer;
trained on a stratified 8:1:1 split with early stopping on validation macro-F1.
"""

from __future__ import annotations

import copy as _copy
import inspect
import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file
from sklearn import metrics
from torch import nn
from tqdm.auto import tqdm

from .._anndata import package_version, rna_modality, xtrimo_uns
from .._bundled import DEFAULT_CHECKPOINT
from .._device import autocast, resolve_device
from .._oom import retry_on_oom
from .._validation import check_embedding, check_positive
from ..data._batching import TokenBudgetSplit, csr_row_batch, on_grid, sortish_batches
from ..data._prepare import check_no_empty_cells, check_source, iter_log1p_blocks, prepare_input
from ..models._io import load as load_model
from ..models._xtrimogene import XTrimoGene, check_pooling
from ._embed import embed_matrix, map_cells, resolve_model, token_budget

HEAD_FILE = "classifier.safetensors"
CLASSES_FILE = "classes.json"
WARM_START_EPOCHS = 40  # head-only epochs on frozen embeddings before fine-tuning (LP-FT)
WARM_START_PATIENCE = 6
STANDARDIZATIONS = ("reference", "batch")
MIN_BATCH_CELLS = 50  # fewer cells than this: batch standardization warns (noisy per-batch statistics)
TRAINING_ONLY = ("freeze", "epochs", "lr", "head_lr", "patience", "warm_start", "class_weight", "random_state")


class CellTypeClassifier(nn.Module):
    """xTrimoGene encoder + pooling over genes + one linear layer (appendix 8.1).

    Usually built and trained by :func:`annotate`, or read back with :meth:`load`.

    Parameters
    ----------
    backbone
        The xTrimoGene model whose encoder embeds the cells.
    classes
        Class names, at least two and distinct, in the order of the output columns.
    freeze
        ``"none"`` (fine-tune the whole encoder), ``"all"`` (linear probe) or an int ``k`` in
        ``[0, enc_depth]`` (the last ``k`` encoder layers trainable).
    pooling
        ``"max"``, ``"mean"`` or ``"all"`` (models with depth tokens), as in
        :func:`scxtrimo.tl.embed`.
    standardization
        ``"reference"``: the head sees embeddings standardized with the training cells' mean
        and standard deviation (stored in the buffers). ``"batch"`` (linear probe only): each
        batch of cells is standardized with its own mean and standard deviation before the
        head (every feature mean 0, standard deviation 1 within each batch), which removes an
        offset shared by all cells of a sequencing run or protocol; the buffers then stay 0 and
        1, :meth:`classify` expects embeddings already standardized so, and the classifier is
        applied with :func:`annotate` (``batch_key=``), not cell by cell.

    Raises
    ------
    ValueError
        Fewer than two or repeated classes; a ``freeze``, ``pooling`` or ``standardization``
        outside those above; ``standardization="batch"`` with a ``freeze`` other than ``"all"``.

    Attributes
    ----------
    backbone : XTrimoGene
        The (fine-tuned) model; only its encoder side is used.
    head : torch.nn.Linear
        ``d -> n_classes``, applied to the pooled embedding standardized with the training
        cells' per-feature mean and standard deviation (buffers ``feature_mean`` and
        ``feature_scale``). Standardizing is a fixed affine map, so head and standardization
        together are still the paper's one linear layer; it only makes the head train well on
        max-pooled features, whose offsets and scales differ widely.
    classes : list of str
        Class names in the order of the output columns.
    freeze : str or int
        How it was trained: ``"none"`` (whole encoder), ``"all"`` (linear probe) or ``k`` (last
        ``k`` encoder layers trainable).
    pooling : str
        How the encoder output is pooled over genes (``"max"``, ``"mean"`` or ``"all"``, as in
        :func:`scxtrimo.tl.embed`).
    standardization : str
        ``"reference"`` or ``"batch"`` (above).
    """

    def __init__(self, backbone: XTrimoGene, classes: list[str], freeze="none", pooling: str = "max", *,
                 standardization: str = "reference"):
        super().__init__()
        self.backbone = backbone
        self.classes = [str(c) for c in classes]
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"A classifier needs at least two classes, each named once; got {self.classes[:10]}.")
        check_pooling(pooling, backbone.config)
        freeze = _check_freeze(freeze, len(backbone.encoder.blocks))
        if standardization not in STANDARDIZATIONS:
            raise ValueError(f"standardization={standardization!r}: use one of {STANDARDIZATIONS}.")
        if standardization == "batch" and freeze != "all":
            raise ValueError(f"standardization='batch' needs the linear probe (freeze='all'); got freeze={freeze!r}.")
        width = backbone.embedding_width(pooling)
        self.head = nn.Linear(width, len(self.classes))
        self.register_buffer("feature_mean", torch.zeros(width))
        self.register_buffer("feature_scale", torch.ones(width))
        self.freeze = freeze
        self.pooling = pooling
        self.standardization = standardization
        self.summary: dict = {}

    def forward(self, batch) -> torch.Tensor:
        if self.standardization == "batch":
            raise ValueError("This classifier standardizes each batch of cells with its own statistics, which a "
                             "mini-batch does not give; apply it with scxtrimo.tl.annotate(adata, model=classifier, "
                             "batch_key=...).")
        return self.classify(self.backbone.embed_cells(batch, self.pooling))

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Class logits ``(n, n_classes)`` from pooled embeddings ``(n, d)``."""
        return self.head((embedding.float() - self.feature_mean) / self.feature_scale)

    def set_standardization(self, embedding: np.ndarray) -> None:
        """Per-feature mean and standard deviation of training-cell embeddings ``(n, d)``."""
        mean, scale = _moments(embedding)
        self.feature_mean.copy_(torch.from_numpy(mean))
        self.feature_scale.copy_(torch.from_numpy(scale))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the backbone checkpoint plus ``classifier.safetensors`` and ``classes.json`` into the folder ``path``.

        Raises
        ------
        FileExistsError
            If ``path`` is an existing file (a classifier is a folder).
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file; CellTypeClassifier.save writes a folder. Pass a new or existing "
                                  "folder path.")
        self.backbone.save(path / "backbone")
        tensors = {**self.head.state_dict(), "feature_mean": self.feature_mean, "feature_scale": self.feature_scale}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / HEAD_FILE))
        meta = {"classes": self.classes, "freeze": self.freeze, "pooling": self.pooling,
                "standardization": self.standardization, "summary": self.summary,
                "base_model": self.backbone.checkpoint_name, "base_sha256": self.backbone.checkpoint_sha256}
        (path / CLASSES_FILE).write_text(json.dumps(meta, indent=2, default=float) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> CellTypeClassifier:
        """Load a classifier written by :meth:`save` onto ``device`` (``"auto"``: CUDA if available, else CPU).

        The backbone keeps the name of the checkpoint it was trained from; a linear probe's
        (``freeze="all"``, its weights unchanged) also keeps that checkpoint's sha256, so it
        accepts ``use_rep`` embeddings made by :func:`scxtrimo.tl.embed` with the checkpoint.

        Raises
        ------
        ValueError
            If ``path`` is not a folder written by :meth:`save`, or CUDA is asked for but not available.
        """
        path = Path(path)
        if not (path / CLASSES_FILE).is_file() or not (path / HEAD_FILE).is_file():
            raise ValueError(f"{path} is not a saved scxtrimo classifier (no {CLASSES_FILE} / {HEAD_FILE}).")
        meta = json.loads((path / CLASSES_FILE).read_text())
        backbone = load_model(path / "backbone")
        backbone.checkpoint_name = meta.get("base_model") or backbone.checkpoint_name
        if meta["freeze"] == "all" and meta.get("base_sha256"):
            # a linear probe never changes its backbone (saved in float32: the same values), so it is
            # still the base checkpoint, and embeddings tl.embed made with that checkpoint (use_rep) fit it
            backbone.checkpoint_sha256 = meta["base_sha256"]
        # classifiers saved before 0.2 have no "standardization": they used the training cells' statistics
        clf = cls(backbone, meta["classes"], meta["freeze"], meta["pooling"],
                  standardization=meta.get("standardization", "reference"))
        tensors = load_file(str(path / HEAD_FILE))
        clf.feature_mean.copy_(tensors.pop("feature_mean"))
        clf.feature_scale.copy_(tensors.pop("feature_scale"))
        clf.head.load_state_dict(tensors, strict=True)
        clf.summary = meta.get("summary", {})
        return clf.to(resolve_device(device)).eval()


def _moments(embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and population standard deviation (at least 1e-6; 1 for a single cell), float32."""
    e = np.asarray(embedding, dtype=np.float64)
    scale = np.maximum(e.std(0), 1e-6) if len(e) > 1 else np.ones(e.shape[1])
    return e.mean(0).astype(np.float32), scale.astype(np.float32)


def _batch_standardize(embedding: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """``(n, d)`` embedding with each batch standardized on its own (every feature mean 0, sd 1).

    ``batches``: ``(n,)`` batch labels, e.g. the codes from :func:`_batch_codes`. This is what a
    classifier with ``standardization="batch"`` applies before its linear layer.
    """
    emb = np.asarray(embedding)
    codes = np.asarray(batches)
    out = np.empty(emb.shape, dtype=np.float32)
    for b in np.unique(codes):
        rows = codes == b
        mean, scale = _moments(emb[rows])
        out[rows] = (emb[rows] - mean) / scale
    return out


def _batch_codes(data, batch_key: str | None, *, one_batch: bool = False) -> np.ndarray | None:
    """Integer codes of ``obs[batch_key]``, checked for batch standardization.

    Without a key: ``None``, or with ``one_batch`` all cells as one batch (a query of a
    classifier trained per batch). Raises ``KeyError`` (no such column) or ``ValueError`` (cells
    without a batch, a batch of one cell); warns about batches under ``MIN_BATCH_CELLS`` cells.
    """
    if batch_key is None and not one_batch:
        return None
    if batch_key is not None and batch_key not in data.obs:
        raise KeyError(f"obs[{batch_key!r}] not found; available columns: {list(data.obs.columns)}.")
    column = data.obs[batch_key] if batch_key is not None else pd.Series("all cells", index=data.obs_names)
    where = f"obs[{batch_key!r}]" if batch_key is not None else "the query (no batch_key: one batch)"
    if column.isna().any():
        raise ValueError(f"{int(column.isna().sum())} cells have no batch in {where}; give every cell one "
                         "(e.g. the name of its sequencing run or data set).")
    codes, names = pd.factorize(column)
    sizes = pd.Series(np.bincount(codes, minlength=len(names)), index=[str(n) for n in names])
    if (sizes < 2).any():
        raise ValueError(f"Batches in {where} with a single cell cannot be standardized on their own: "
                         f"{list(sizes.index[sizes < 2])[:5]}. Merge them into a larger batch.")
    if (sizes < MIN_BATCH_CELLS).any():
        warnings.warn(f"Batches in {where} with fewer than {MIN_BATCH_CELLS} cells give noisy statistics for batch "
                      f"standardization: {sizes[sizes < MIN_BATCH_CELLS].to_dict()}.", UserWarning, stacklevel=3)
    return codes


# ---- data -----------------------------------------------------------------------------------
def _collect(adata, gene_symbols, layer, use_raw, backbone: XTrimoGene):
    """All cells as the backbone takes them (log1p CP10k, plus T = 4 and S for depth tokens)."""
    prep = prepare_input(adata, gene_symbols=gene_symbols, layer=layer, use_raw=use_raw)
    depth = (4.0, "fixed") if backbone.config.depth_tokens else None
    X = sp.vstack([b for _, _, b in iter_log1p_blocks(prep, depth=depth)], format="csr")
    check_no_empty_cells(X, adata.obs_names)
    return X, prep


def stratified_split(labels: np.ndarray, random_state: int = 0, fractions=(0.8, 0.1, 0.1)):
    """Stratified 8:1:1 split of labelled cells; classes too small to split go to training.

    Returns ``(split dict of index arrays, list of (class, n_cells) that were too small)``.
    """
    rng = np.random.default_rng(random_state)
    parts = {"train": [], "validation": [], "test": []}
    small = []
    for c in pd.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 3:
            small.append((str(c), len(idx)))
            parts["train"].append(idx)
            continue
        n_val = max(1, int(round(fractions[1] * len(idx))))
        n_test = max(1, int(round(fractions[2] * len(idx))))
        parts["validation"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    return {k: np.sort(np.concatenate(v)) if v else np.array([], dtype=int) for k, v in parts.items()}, small


def _stored_embedding(data, use_rep: str, backbone: XTrimoGene, pooling: str) -> np.ndarray:
    """``obsm[use_rep]`` as float32, checked to be ``backbone``'s embedding from ``tl.embed``."""
    if use_rep not in data.obsm:
        raise KeyError(f"obsm[{use_rep!r}] not found; run scxtrimo.tl.embed(adata, key_added={use_rep!r}) first.")
    entry = data.uns.get("xtrimo", {})
    params = entry.get("params_by_key", {}).get(use_rep) or entry.get("params", {})  # files written before params_by_key have only params
    sha = backbone.checkpoint_sha256
    made_here = (params.get("key_added") == use_rep and sha is not None and params.get("sha256") == str(sha)
                 and params.get("pooling") == pooling)
    if not made_here:
        raise ValueError(f"obsm[{use_rep!r}] was not made by tl.embed with checkpoint "
                         f"{backbone.checkpoint_name or 'untrained'} and pooling={pooling!r} (its record in "
                         f"uns['xtrimo'] says {params or 'nothing'}); embed with that model first, or leave use_rep=None.")
    emb = check_embedding(data.obsm[use_rep], use_rep).astype(np.float32)
    width = backbone.embedding_width(pooling)
    if emb.shape != (data.n_obs, width):
        raise ValueError(f"obsm[{use_rep!r}] has shape {emb.shape}; expected ({data.n_obs}, {width}).")
    return emb


def _check_freeze(freeze, n_layers: int):
    """``freeze`` as ``"none"``, ``"all"`` or a Python int in ``[0, n_layers]``; ``ValueError`` otherwise."""
    if isinstance(freeze, (int, np.integer)) and not isinstance(freeze, bool):
        if not 0 <= freeze <= n_layers:
            raise ValueError(f"freeze={freeze}: the encoder has {n_layers} layers.")
        return int(freeze)
    if not isinstance(freeze, str) or freeze not in ("none", "all"):
        raise ValueError(f"freeze={freeze!r}: use 'auto', 'none' (fine-tune all), 'all' (linear probe) or an int k (last k layers).")
    return freeze


def _set_trainable(clf: CellTypeClassifier, freeze) -> None:
    """Make trainable what ``freeze`` (checked by :func:`_check_freeze`) says."""
    bb = clf.backbone
    for p in bb.parameters():
        p.requires_grad = False
    if freeze == "none":
        for module in (bb.gene_embedding, bb.value_embedding, bb.encoder):
            for p in module.parameters():
                p.requires_grad = True
        bb.pad_token.requires_grad = True
    elif isinstance(freeze, int):
        for block in list(bb.encoder.blocks)[len(bb.encoder.blocks) - freeze :]:
            for p in block.parameters():
                p.requires_grad = True
        for p in bb.encoder.norm.parameters():
            p.requires_grad = freeze > 0


@torch.no_grad()
def _predict_proba(clf: CellTypeClassifier, X: sp.csr_matrix, rows: np.ndarray, device, batch_size: int, max_tokens: int) -> np.ndarray:
    clf.eval()
    return map_cells(lambda batch: torch.softmax(clf(batch).float(), -1), X, rows, device, width=len(clf.classes),
                     max_cells=batch_size, max_tokens=max_tokens)


def _scores(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """Macro-F1, macro precision and accuracy over the classes present; NaN without cells."""
    if not len(y_true):
        return {"macro_f1": float("nan"), "macro_precision": float("nan"), "accuracy": float("nan")}
    y_pred = np.asarray(classes)[proba.argmax(1)]
    present = sorted(set(y_true))
    return {
        "macro_f1": float(metrics.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_precision": float(metrics.precision_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
    }


def _val_macro_f1(proba: np.ndarray, y_true: np.ndarray, classes: list[str]) -> float:
    """Validation macro-F1, or NaN when there are no validation cells."""
    return _scores(y_true, proba, classes)["macro_f1"]


def _run_epochs(clf: CellTypeClassifier, opt: torch.optim.Optimizer, class_weight: torch.Tensor | None, y_idx: np.ndarray, *,
                batches, logits, val_f1, epochs: int, patience: int, stage: str, history: list, progress: bool,
                best: tuple | None = None, autocast_device: torch.device | None = None, micro_batches=None) -> tuple:
    """Train with early stopping on validation macro-F1; return ``(f1, epoch, state_dict)`` of the best.

    ``batches()`` gives one epoch's row-index batches (one optimizer step each), ``logits(rows)``
    the class logits of those cells, ``val_f1()`` the validation macro-F1 (NaN without validation
    cells: then the latest epoch counts as best). ``best`` is the state to beat (epoch 0), e.g. a
    warm-start probe. ``micro_batches(rows)``, if given, splits a batch into parts that go through
    the model one at a time (gradient accumulation, to bound activation memory); the loss is the
    batch's class-weighted mean cross-entropy whatever the split, so the step is the same. A step
    that runs out of CUDA memory is run again after ``micro_batches.shrink()`` (smaller parts).
    """
    best = best if best is not None else (-1.0, 0, _copy.deepcopy(clf.state_dict()))
    params = [p for g in opt.param_groups for p in g["params"]]
    device = params[0].device
    weight = class_weight.to(device) if class_weight is not None else None
    shrink = micro_batches.shrink if micro_batches is not None else (lambda: False)

    def gradients(rows: np.ndarray) -> float:
        """Zero the gradients and accumulate the batch's over its parts; return the batch loss."""
        # the batch's class-weighted mean: every part's summed loss is divided by the whole batch's weight
        total = weight[torch.from_numpy(y_idx[rows]).to(device)].sum() if weight is not None else float(len(rows))
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for part in micro_batches(rows) if micro_batches is not None else [rows]:
            with autocast(autocast_device) if autocast_device is not None else nullcontext():
                out = logits(part)
            part_target = torch.from_numpy(y_idx[part]).to(device)
            loss = nn.functional.cross_entropy(out.float(), part_target, weight=weight, reduction="sum") / total
            loss.backward()
            loss_sum += float(loss.detach())
        return loss_sum

    bar = tqdm(range(epochs), desc=f"annotate ({stage})", unit="epoch", disable=not progress)
    for epoch in range(1, epochs + 1):
        clf.train()
        losses = []
        for rows in batches():
            loss_sum = retry_on_oom(lambda: gradients(rows), shrink, what=f"tl.annotate ({stage})")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss_sum)
        f1 = val_f1()
        history.append({"stage": stage, "epoch": epoch, "train_loss": float(np.mean(losses)), "val_macro_f1": f1})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_f1=f"{f1:.3f}")
        if np.isnan(f1) or f1 > best[0]:
            best = (f1, epoch, _copy.deepcopy(clf.state_dict()))
        elif epoch - best[1] >= patience:
            break
    bar.close()
    return best


# ---- public API -----------------------------------------------------------------------------
def annotate(
    adata,
    *,
    labels_key: str | None = None,
    batch_key: str | None = None,
    model: str | os.PathLike | XTrimoGene | CellTypeClassifier = DEFAULT_CHECKPOINT,
    freeze: str | int = "auto",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    patience: int = 3,
    warm_start: bool = True,
    class_weight: bool = True,
    device: str = "auto",
    random_state: int = 0,
    key_added: str = "xtrimo_label",
    gene_symbols: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    max_tokens: int | None = None,
    use_rep: str | None = None,
    pooling: str | None = None,
    progress: bool = True,
):
    """Annotate cell types: fine-tune xTrimoGene on labelled cells, or apply a trained classifier.

    Training (``labels_key`` given, ``model`` a checkpoint): the encoder plus pooling over genes
    (the checkpoint's :attr:`~scxtrimo.models.XTrimoGene.default_pooling`, as in
    :func:`scxtrimo.tl.embed`; max in the paper) plus one linear layer is trained (paper section
    5.4.1, appendix 8.1) on a stratified 8:1:1 train/validation/test split of the labelled
    cells, with class-weighted cross-entropy (rare types count as much as common ones), AdamW,
    and early stopping on validation macro-F1
    (the best epoch's weights are kept). Fine-tuning starts from a warm head: the linear layer is
    first trained alone on the frozen starting embeddings (linear probing, then fine-tuning:
    LP-FT), and that probe is epoch 0 of early stopping, so the fine-tuned classifier is never
    worse on validation cells than the probe it started from. Prediction (``model`` a :class:`CellTypeClassifier`):
    the classifier is applied to ``adata`` as it is, whatever its genes or depth; the data go
    through the same alignment and normalization as in training.

    Parameters
    ----------
    adata
        AnnData (or MuData: its RNA modality): raw counts (or normalized values) with gene symbols.
    labels_key
        ``obs`` column with cell-type labels to train on. Cells with missing labels are left out
        of training (with a warning) and still get predictions.
    batch_key
        ``obs`` column naming each cell's batch (sequencing run, protocol, data set). Given when
        training, the linear probe standardizes each batch's embeddings with that batch's own
        mean and standard deviation instead of the training cells' (the classifier's
        ``standardization="batch"``), and a query is then standardized the same way: by its
        own ``batch_key`` column, or as one batch without it. This removes an offset that all
        cells of a protocol share: with the bundled checkpoint it lifts the transfer from
        Drop-seq to CEL-seq2 runs (cellbench) from macro-F1 0.45 to 0.97 (three seeds). It
        assumes every batch holds a similar mix of cell types; where the mix differs it costs
        (sorted PBMC -> pbmc3k: 0.84 -> 0.77), so it is not the default (``docs/benchmarks.md``, "Cell-type
        annotation"). Linear probe only: ``freeze="auto"`` then means ``"all"``. Not in the
        paper.
    model
        A checkpoint name/folder or :class:`~scxtrimo.models.XTrimoGene` to fine-tune, or a
        trained :class:`CellTypeClassifier` to apply (then ``labels_key`` is optional: if given,
        the predictions are scored against it). Default: the bundled checkpoint,
        :data:`scxtrimo.models.DEFAULT_CHECKPOINT`.
    freeze
        ``"none"``: fine-tune the whole encoder; ``"all"``: linear probe on frozen embeddings;
        an integer ``k`` (Python or NumPy): train only the last ``k`` encoder layers (and the head). ``"auto"``
        (default): ``"none"`` on CUDA, ``"all"`` on a CPU or with ``batch_key``; on a CPU the
        probe takes a few minutes on pbmc3k and fine-tuning the last 2 layers about 10, to end
        within 0.005 macro-F1 of the probe on pbmc3k and on the two transfer tasks measured
        with the bundled checkpoint (``docs/benchmarks.md``, "Cell-type annotation").
    epochs, batch_size, lr, head_lr, patience
        Training schedule: at most ``epochs`` passes, ``batch_size`` cells per optimizer step,
        encoder learning rate ``lr``, head learning rate ``head_lr``, stop after ``patience``
        epochs without a better validation macro-F1. On the bundled checkpoint an encoder rate
        of 1e-5 fine-tuned pbmc3k better than 1e-4 and the sorted-PBMC transfer worse
        (``docs/benchmarks.md``, "Cell-type annotation"), so the default stays 1e-4.
    warm_start
        Fine-tuning only (``freeze`` not ``"all"``): before fine-tuning, train the head alone on
        the starting encoder's embeddings of the training cells (up to 40 epochs, patience 6;
        costs one embedding pass over the training and validation cells). ``False`` starts the
        fine-tuning from a randomly initialized head.
    class_weight
        Weight the loss by inverse class frequency.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"`` (bf16 autocast on CUDA).
    random_state
        Seeds the split, the head initialization and the batch order.
    key_added
        Where predictions go (below).
    gene_symbols
        ``var`` column with gene symbols if ``var_names`` are not symbols.
    layer
        ``layers`` key of the expression matrix to read, as in :func:`scxtrimo.tl.embed`
        (``None``: ``layers['counts']`` if present, else ``X``).
    use_raw
        Read ``adata.raw.X`` (genes: ``adata.raw.var``), as in :func:`scxtrimo.tl.embed`.
    max_tokens
        Encoder token budget per batch (cells x padded length). ``None``: the default of
        :func:`scxtrimo.tl.embed` (on CUDA smaller for wider encoders). When
        fine-tuning, a step's ``batch_size`` cells go through the encoder in parts within
        this budget and their gradients are summed (gradient accumulation: the same step, with
        activation memory bounded by the budget instead of by ``batch_size`` x the deepest cell).
        On CUDA, a step that runs out of memory is run again with half the budget (and the
        halved budget kept), with a ``RuntimeWarning``; a batch that runs out of memory while
        predicting is split in halves. Only a single cell that does not fit raises.
    use_rep
        Linear probe only (training with ``freeze="all"``, or applying a classifier trained so):
        an ``obsm`` key holding this checkpoint's embeddings from :func:`scxtrimo.tl.embed`
        (same checkpoint sha256 and pooling, as recorded in ``uns['xtrimo']['params_by_key']``), used
        instead of embedding the cells again.
    pooling
        Training only: the pooling over genes (``"max"``, ``"mean"``, or ``"all"`` for a
        checkpoint with depth tokens); ``None``: the checkpoint's
        :attr:`~scxtrimo.models.XTrimoGene.default_pooling`. A trained classifier keeps its own
        (pass ``None`` or the same). Measured with the bundled xtrimo-3m (linear probe, macro-F1,
        ``docs/benchmarks.md``, "Cell-type annotation"): ``"max"`` transfers across protocols
        better (Drop-seq -> CEL-seq2 0.714 against 0.446), its default ``"mean"`` transfers
        across donors better (sorted PBMC -> pbmc3k 0.840 against 0.793) and is better within
        a data set (pbmc3k 0.921; the previous default there: 0.925 mean, 0.891 max).
    progress
        Show a progress bar.

    Returns
    -------
    CellTypeClassifier
        The trained (or the given) classifier; ``classifier.save(path)`` /
        ``CellTypeClassifier.load(path)``. Writes into the AnnData:

        * ``obs[key_added]``: predicted type (categorical), every cell.
        * ``obs[key_added + '_confidence']``: probability of the predicted type (float32).
        * ``obsm[key_added + '_probabilities']``: ``(n_obs, n_classes)`` float32; class names in
          ``uns['xtrimo']['annotate']['classes']``.
        * ``uns['xtrimo']['annotate']``: classes, the standardization (``"reference"`` or
          ``"batch"``, with ``batch_key`` and the number of batches when given) and, after training, test macro-F1, macro
          precision, accuracy, per-class F1 (a DataFrame indexed by class name, column ``"f1"``;
          NaN for a class with no test cells), confusion matrix (rows: true, columns: predicted,
          in ``classes`` order), split sizes, small classes, best epoch; when predicting with
          labels, the same scores on all labelled cells.

    Raises
    ------
    ValueError
        No ``labels_key`` when training; fewer than two labelled classes; bad ``freeze``;
        ``batch_key`` with a ``freeze`` other than ``"all"``, or given to a classifier trained
        without it; cells with no batch, or a batch of a single cell;
        ``epochs``, ``batch_size`` or ``patience`` not a positive integer, ``lr`` or ``head_lr``
        not a positive number; ``key_added`` (or its ``_confidence`` column) equal to
        ``labels_key``; ``model`` a folder written by :meth:`CellTypeClassifier.save` (load it
        with :meth:`CellTypeClassifier.load` and pass the classifier);
        ``use_rep`` without ``freeze="all"``, not made by ``tl.embed`` with this checkpoint and
        pooling, or with NaN or infinite values; an unknown ``pooling``, or one other than a
        trained classifier's; the alignment/validation errors of :func:`scxtrimo.pp.align_genes`
        (e.g. too few matched genes in a query); cells with no expressed reference gene;
        ``use_raw=True`` without ``adata.raw`` or with ``layer``.
    TypeError
        ``obsm[use_rep]`` is a sparse matrix.
    KeyError
        ``labels_key`` or ``batch_key`` not in ``obs``; ``layer`` not in ``layers``.

    Warns
    -----
    UserWarning
        Cells without a label, or classes too small to split (training); batches of fewer
        than 50 cells (noisy batch statistics), or most labelled cells in batches of a single
        cell type (e.g. sorted populations: standardizing them erases the types); training arguments
        (``freeze``, ``epochs``, ``lr``, ``head_lr``, ``patience``, ``warm_start``,
        ``class_weight``, ``random_state``) given with a trained classifier, which only predicts;
        scoring against labels none of which is one of the classifier's classes.
    """
    passed = dict(locals())  # the arguments as given, for the predict-mode warning
    for name, value, integer in (("epochs", epochs, True), ("batch_size", batch_size, True),
                                 ("patience", patience, True), ("lr", lr, False), ("head_lr", head_lr, False)):
        check_positive(name, value, integer=integer)
    data = rna_modality(adata)
    dev = resolve_device(device)
    if labels_key is not None and labels_key not in data.obs:
        raise KeyError(f"obs[{labels_key!r}] not found; available columns: {list(data.obs.columns)}.")
    check_source(data, layer, use_raw)
    if labels_key is not None and labels_key in (key_added, f"{key_added}_confidence"):
        raise ValueError(f"key_added={key_added!r} would overwrite the labels in obs[{labels_key!r}]; pass another "
                         "key_added.")
    saved = Path(model) if isinstance(model, (str, os.PathLike)) else None
    saved = saved.parent if saved is not None and saved.name in (CLASSES_FILE, HEAD_FILE) else saved
    if saved is not None and (saved / CLASSES_FILE).is_file():
        raise ValueError(f"{model} is a saved CellTypeClassifier, not a checkpoint to train; load it with "
                         f"CellTypeClassifier.load({str(saved)!r}) and pass the result as model=.")

    if isinstance(model, CellTypeClassifier):
        defaults = inspect.signature(annotate).parameters
        ignored = [k for k in TRAINING_ONLY if passed[k] != defaults[k].default]
        if ignored:
            warnings.warn(f"model= is a trained classifier, so annotate only predicts: {', '.join(ignored)} "
                          "(training arguments) are ignored. Pass a checkpoint as model= to train.",
                          UserWarning, stacklevel=2)
        if pooling is not None and pooling != model.pooling:
            raise ValueError(f"This classifier was trained with pooling={model.pooling!r}; drop pooling={pooling!r} "
                             "(a trained classifier keeps its pooling).")
        if batch_key is not None and model.standardization != "batch":
            raise ValueError(f"batch_key={batch_key!r}: this classifier standardizes with its training cells' "
                             "statistics, not per batch. Drop batch_key, or train a classifier with batch_key= "
                             "to standardize each batch on its own.")
        if use_rep is not None and model.freeze != "all":
            raise ValueError(f"use_rep={use_rep!r} works with linear-probe classifiers only (freeze='all'); this one "
                             f"was trained with freeze={model.freeze!r}. Drop use_rep.")
        batches = _batch_codes(data, batch_key, one_batch=model.standardization == "batch")
        clf = model.to(dev)
        budget = token_budget(dev, max_tokens, config=clf.backbone.config)
        X, prep = _collect(data, gene_symbols, layer, use_raw, clf.backbone)
        if use_rep is not None or clf.standardization == "batch":
            emb = (_stored_embedding(data, use_rep, clf.backbone, clf.pooling) if use_rep is not None else
                   embed_matrix(clf.backbone, X, np.arange(data.n_obs), clf.pooling, dev, max_cells=256, max_tokens=budget))
            if clf.standardization == "batch":
                emb = _batch_standardize(emb, batches)
            with torch.no_grad():
                proba = torch.softmax(clf.classify(torch.from_numpy(emb).to(dev)), -1).cpu().numpy()
        else:
            proba = _predict_proba(clf, X, np.arange(data.n_obs), dev, batch_size * 4, budget)
        report = {"classes": clf.classes, "mode": "predict", "n_genes_matched": int(prep.n_matched),
                  **_standardization_report(clf, batch_key, batches)}
        if labels_key is not None:
            lab = data.obs[labels_key]
            ok = lab.notna().to_numpy()
            y = lab.to_numpy()[ok].astype(str)
            if len(y) and not np.isin(y, clf.classes).any():
                warnings.warn(f"None of the labels in obs[{labels_key!r}] (e.g. {sorted(set(y))[:3]}) is one of the "
                              f"classifier's classes (e.g. {clf.classes[:3]}), so every score is 0. Labels are compared "
                              "as strings: pass labels of the type it was trained on (e.g. not ints for float "
                              "labels).", UserWarning, stacklevel=2)
            report.update(_scores(y, proba[ok], clf.classes))
        _write(data, clf, proba, key_added, report)
        return clf

    if freeze == "auto":
        freeze = "none" if dev.type == "cuda" and batch_key is None else "all"
    if use_rep is not None and freeze != "all":
        raise ValueError(f"use_rep={use_rep!r} works with the linear probe only; pass freeze='all' or drop use_rep.")
    if batch_key is not None and freeze != "all":
        raise ValueError(f"batch_key={batch_key!r} works with the linear probe only (batch statistics of a fine-tuned "
                         "encoder change as it trains); pass freeze='all' or drop batch_key.")
    if labels_key is None:
        raise ValueError("Pass labels_key= (an obs column of cell types) to train, or a trained classifier as model=.")
    labels = data.obs[labels_key]
    batches = _batch_codes(data, batch_key)
    missing = labels.isna().to_numpy()
    if missing.any():
        warnings.warn(f"{int(missing.sum())} cells have no label in obs[{labels_key!r}]; they are left out of "
                      "training and still get predictions.", UserWarning, stacklevel=2)
    y_all = labels.astype(object).where(~missing, None).to_numpy()
    labelled = np.flatnonzero(~missing)
    classes = sorted({str(v) for v in y_all[labelled]})
    if len(classes) < 2:
        raise ValueError(f"obs[{labels_key!r}] has {len(classes)} labelled class(es); annotation needs at least two.")
    y_str = np.array([str(v) for v in y_all[labelled]])
    if batches is not None:
        _warn_if_batches_are_types(y_str, batches[labelled], batch_key)
    split_local, small = stratified_split(y_str, random_state)
    if small:
        warnings.warn(f"Classes with fewer than 3 cells cannot be split 8:1:1 and are used for training only: {small}.",
                      UserWarning, stacklevel=2)
    split = {k: labelled[v] for k, v in split_local.items()}
    if not len(split["validation"]):
        warnings.warn("No class has 3 or more labelled cells, so there are no validation or test cells: every "
                      "epoch runs (no early stopping) and the test scores are NaN. Label more cells per class.",
                      UserWarning, stacklevel=2)
    class_index = {c: i for i, c in enumerate(classes)}
    y_idx = np.full(data.n_obs, -1, dtype=np.int64)
    y_idx[labelled] = [class_index[c] for c in y_str]

    torch.manual_seed(random_state)
    backbone = _copy.deepcopy(resolve_model(model, torch.device("cpu"))) if isinstance(model, XTrimoGene) else resolve_model(model, torch.device("cpu"))
    pooling = backbone.default_pooling if pooling is None else pooling
    check_pooling(pooling, backbone.config)  # before the gene alignment, so a bad pooling or freeze fails at once
    freeze = _check_freeze(freeze, len(backbone.encoder.blocks))
    budget = token_budget(dev, max_tokens, config=backbone.config)
    X, prep = _collect(data, gene_symbols, layer, use_raw, backbone)
    clf = CellTypeClassifier(backbone, classes, freeze, pooling=pooling,
                             standardization="reference" if batch_key is None else "batch").to(dev)
    _set_trainable(clf, freeze)
    counts = np.bincount(y_idx[split["train"]], minlength=len(classes)).astype(np.float64)
    weight = None
    if class_weight:
        w = np.where(counts > 0, counts.sum() / (len(classes) * np.maximum(counts, 1)), 0.0)
        weight = torch.tensor(w, dtype=torch.float32, device=dev)
    rng = np.random.default_rng(random_state)
    history: list[dict] = []
    frozen = freeze == "all"
    y_names = np.asarray(classes)

    def probe_f1(emb_val: torch.Tensor) -> float:
        with torch.no_grad():
            return _val_macro_f1(torch.softmax(clf.classify(emb_val), -1).cpu().numpy(), y_names[y_idx[split["validation"]]], classes)

    if frozen or warm_start:
        # the probe trains on fixed embeddings: of every cell for the linear probe (it predicts
        # them all), of the training and validation cells for a warm start
        if use_rep is not None:
            emb = _stored_embedding(data, use_rep, backbone, clf.pooling)
            emb_rows = np.arange(data.n_obs)
        else:
            emb_rows = np.arange(data.n_obs) if frozen else np.sort(np.concatenate([split["train"], split["validation"]]))
            emb = embed_matrix(clf.backbone, X, emb_rows, clf.pooling, dev, max_cells=256, max_tokens=budget)
        position = np.full(data.n_obs, -1, dtype=np.int64)
        position[emb_rows] = np.arange(len(emb_rows))
        if clf.standardization == "batch":  # frozen, so emb_rows are all cells: each batch on its own statistics
            emb = _batch_standardize(emb, batches)
        else:
            clf.set_standardization(emb[position[split["train"]]])
        emb_t = torch.from_numpy(emb).to(dev)
        head_opt = torch.optim.AdamW(clf.head.parameters(), lr=head_lr, weight_decay=0.01)
        n_train = len(split["train"])
        best = _run_epochs(
            clf, head_opt, weight, y_idx,
            batches=lambda: [split["train"][np.sort(b)] for b in np.array_split(rng.permutation(n_train), max(1, -(-n_train // batch_size)))],
            logits=lambda rows: clf.classify(emb_t[position[rows]]),
            val_f1=lambda: probe_f1(emb_t[position[split["validation"]]]),
            epochs=epochs if frozen else WARM_START_EPOCHS, patience=patience if frozen else WARM_START_PATIENCE,
            stage="probe" if frozen else "warm start", history=history, progress=progress)
        clf.load_state_dict(best[2])
    else:  # standardize with the starting backbone's embeddings of (up to 512) training cells
        sample = np.sort(rng.permutation(split["train"])[:512])
        clf.set_standardization(embed_matrix(clf.backbone, X, sample, clf.pooling, dev, max_cells=64, max_tokens=budget))
        best = (-1.0, 0, _copy.deepcopy(clf.state_dict()))

    if not frozen:
        groups = [{"params": list(clf.head.parameters()), "lr": head_lr}]
        enc = [p for p in clf.backbone.parameters() if p.requires_grad]
        if enc:
            groups.append({"params": enc, "lr": lr})
        lengths = np.diff(X.indptr)
        train_lengths = lengths[split["train"]]
        best = _run_epochs(
            clf, torch.optim.AdamW(groups, weight_decay=0.01), weight, y_idx,
            # the encoder wants cells of similar length together (length-bucketed batches)
            batches=lambda: [split["train"][np.sort(b)] for b in sortish_batches(train_lengths, batch_size, rng, drop_last=False)],
            logits=lambda rows: clf(csr_row_batch(X, rows, grid=on_grid(dev)).to(dev)),
            val_f1=lambda: _val_macro_f1(_predict_proba(clf, X, split["validation"], dev, batch_size * 4, budget),
                                         y_names[y_idx[split["validation"]]], classes),
            epochs=epochs, patience=patience, stage="fine-tune", history=history, progress=progress,
            best=(best[0], 0, best[2]), autocast_device=dev,
            # each step's cells go through the encoder in parts within the token budget
            micro_batches=TokenBudgetSplit(lengths, max_tokens=budget))
        clf.load_state_dict(best[2])
    clf.eval()

    if frozen:
        with torch.no_grad():
            proba = torch.softmax(clf.classify(emb_t), -1).cpu().numpy()
    else:
        proba = _predict_proba(clf, X, np.arange(data.n_obs), dev, batch_size * 4, budget)
    test = split["test"]
    y_test = np.asarray(classes)[y_idx[test]]
    pred_test = np.asarray(classes)[proba[test].argmax(1)]
    report = {
        "classes": classes,
        "mode": "train",
        **{f"test_{k}": v for k, v in _scores(y_test, proba[test], classes).items()},
        "per_class_f1": {c: float(f) if c in y_test else float("nan")  # NaN: no test cells of that class
                         for c, f in zip(classes, metrics.f1_score(y_test, pred_test, labels=classes, average=None, zero_division=0))}
                        if len(test) else {},
        "confusion_matrix": (metrics.confusion_matrix(y_test, pred_test, labels=classes) if len(test)
                             else np.zeros((len(classes), len(classes)), dtype=np.int64)).tolist(),
        "split_sizes": {k: int(len(v)) for k, v in split.items()},
        "small_classes": [c for c, _ in small],
        "best_epoch": int(best[1]),  # 0: the warm-start probe beat every fine-tuned epoch
        "warm_start": bool(warm_start and not frozen),
        "val_macro_f1": float(best[0]),
        "history": history,
        "freeze": str(freeze),
        **_standardization_report(clf, batch_key, batches),
        "base_model": str(backbone.checkpoint_name or "untrained"),
        "n_genes_matched": int(prep.n_matched),
        "scxtrimo_version": package_version(),
    }
    clf.summary = {k: v for k, v in report.items() if k not in ("history",)}
    _write(data, clf, proba, key_added, report)
    return clf


def _warn_if_batches_are_types(labels: np.ndarray, batches: np.ndarray, batch_key: str) -> None:
    """Warn when most labelled cells sit in batches of a single cell type (e.g. sorted populations):
    standardizing each such batch on its own removes the very differences between the types."""
    kinds = pd.Series(labels).groupby(batches).transform("nunique").to_numpy()
    if len(np.unique(labels)) > 1 and (kinds == 1).mean() > 0.5:
        warnings.warn(f"{(kinds == 1).mean():.0%} of the labelled cells are in batches of obs[{batch_key!r}] that hold "
                      "a single cell type; standardizing each batch on its own removes what its cells share, here "
                      "their type. Use a batch_key whose batches each hold a mix of types (sequencing runs, data "
                      "sets), or drop batch_key.", UserWarning, stacklevel=3)


def _standardization_report(clf: CellTypeClassifier, batch_key: str | None, batches: np.ndarray | None) -> dict:
    """The report's standardization entries (no ``None`` values: ``uns`` must stay writable to .h5ad)."""
    out = {"standardization": clf.standardization}
    if clf.standardization == "batch":
        out["n_batches"] = len(np.unique(batches))
    if batch_key is not None:
        out["batch_key"] = batch_key
    return out


def _write(data, clf: CellTypeClassifier, proba: np.ndarray, key_added: str, report: dict) -> None:
    pred = np.asarray(clf.classes)[proba.argmax(1)]
    data.obs[key_added] = pd.Categorical(pred, categories=clf.classes)
    data.obs[f"{key_added}_confidence"] = proba.max(1).astype(np.float32)
    data.obsm[f"{key_added}_probabilities"] = proba.astype(np.float32)
    entry = dict(report)
    entry["history"] = pd.DataFrame(entry["history"]) if "history" in entry else None
    if entry["history"] is None:
        entry.pop("history")
    # a DataFrame, not a dict: class names such as "CD4+/CD45RA+" would become nested groups in .h5ad
    per_class = entry.get("per_class_f1") or {}
    entry["per_class_f1"] = pd.DataFrame({"f1": np.array(list(per_class.values()), dtype=np.float64)},
                                         index=pd.Index(list(per_class), name="class", dtype=object))
    if "confusion_matrix" in entry:
        entry["confusion_matrix"] = np.asarray(entry["confusion_matrix"], dtype=np.int64)
    xtrimo_uns(data)["annotate"] = entry
