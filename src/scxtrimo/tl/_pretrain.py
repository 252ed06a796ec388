"""Masked-value pretraining of xTrimoGene (paper section 4, appendix 5).

One process, or data-parallel under ``torchrun`` (DDP or FSDP), in memory or streamed from
.h5ad files, with periodic atomic training-state saves and exact resumes.
"""

from __future__ import annotations

import io
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .._anndata import rna_modality
from .._cell_terms import FACTOR_STAT_CELLS, HEAD_LR_SCALE, CellTerms, CellTermsConfig, stat_rows
from .._device import autocast
from .._inference import resolve_model
from .._oom import retry_on_oom
from .._train_corpus import gene_table_training, param_groups
from .._validation import check_count, check_positive
from .._version import __version__
from .._paths import check_h5ad_files, check_output_dir
from ..data._depth import ThinningConfig
from ..data._masking import MaskingConfig, cell_keys, keyed_uniform
from ..data._objective import counts_to_device, evaluate_masked, lr_factor, masked_sse, training_batch
from ..data._prepare import counts_rows, prepare_input
from ..data._stream import BLOCK_CELLS, H5adCorpus, MemoryBatches, StreamBatches
from ..pp._normalize import log1p_normalize
from ..models._config import XTrimoGeneConfig, get_config
from ..models._gene_init import init_gene_embedding
from ..models._xtrimogene import XTrimoGene
from . import _distributed as D
from ._checkpoint import atomic_write_bytes, check_signature, fingerprint, load_train_state, save_train_state, state_path

MIN_GENES = 201  # appendix 1: keep cells with more than 200 expressed genes
SPLIT = (0.96, 0.02, 0.02)
GENE_INITS = ("random", "coexpression")


def _as_list(data) -> list:
    if isinstance(data, (str, os.PathLike, ad.AnnData)) or hasattr(data, "mod"):
        return [data]
    return list(data)


def collect_cells(data, *, gene_symbols: str | None = None, layer: str | None = None, use_raw: bool = False,
                  min_genes: int = MIN_GENES) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Stack every input's cells that pass QC, as raw counts on the reference genes.

    Returns the CSR float32 matrix (sorted indices) and a table of ``source`` (input index or
    file name) and ``obs_name`` per kept cell. The training step normalizes (and thins).
    """
    blocks, rows = [], []
    for i, item in enumerate(_as_list(data)):
        label = str(item) if isinstance(item, (str, os.PathLike)) else f"input{i}"
        adata = ad.read_h5ad(item, backed="r") if isinstance(item, (str, os.PathLike)) else rna_modality(item)
        prep = prepare_input(adata, gene_symbols=gene_symbols, layer=layer, use_raw=use_raw)
        for start in range(0, adata.n_obs, prep.block_cells()):
            stop = min(start + prep.block_cells(), adata.n_obs)
            X = counts_rows(prep, start, stop)
            X.sort_indices()
            keep = np.diff(X.indptr) >= min_genes
            blocks.append(X[keep])
            rows.append(pd.DataFrame({"source": label, "obs_name": np.asarray(adata.obs_names[start:stop])[keep]}))
        if getattr(adata, "isbacked", False):
            adata.file.close()
    if not blocks or sum(b.shape[0] for b in blocks) == 0:
        raise ValueError(f"No cell has at least {min_genes} expressed reference genes; nothing to pretrain on.")
    return sp.vstack(blocks, format="csr"), pd.concat(rows, ignore_index=True)


def split_cells(n: int, random_state: int = 0, fractions: Sequence[float] = SPLIT) -> dict[str, np.ndarray]:
    """Deterministic 96:2:2 train/validation/test split of ``n`` cells (appendix 1)."""
    order = np.random.default_rng(random_state).permutation(n)
    n_val = max(1, int(round(fractions[1] * n))) if n >= 3 else 0
    n_test = max(1, int(round(fractions[2] * n))) if n >= 3 else 0
    return {
        "validation": np.sort(order[:n_val]),
        "test": np.sort(order[n_val : n_val + n_test]),
        "train": order[n_val + n_test :],
    }


def evaluate(model: XTrimoGene, X: sp.csr_matrix, *, batch_size: int, masking: MaskingConfig, device: torch.device,
             seed: int = 0, decoder_zeros: int | None = None, thinning: ThinningConfig | None = None) -> dict:
    """Masked-position MSE and Pearson r on the counts ``X`` with fixed (keyed) masks."""
    return evaluate_masked(model, X, device=device, batch_size=batch_size, masking=masking, thinning=thinning,
                           seed=seed, decoder_zeros=decoder_zeros)


def _is_h5ad_path(item) -> bool:
    return isinstance(item, (str, os.PathLike)) and str(item).lower().endswith(".h5ad")


def _use_streaming(items: list, streaming: bool | None) -> bool:
    all_paths = bool(items) and all(_is_h5ad_path(i) for i in items)
    if streaming is None:
        return all_paths
    if streaming and not all_paths:
        raise ValueError("streaming=True needs .h5ad paths as input (in-memory AnnData/MuData cannot be streamed).")
    return bool(streaming)


def _check_gene_init(gene_init: str, use_stream: bool, given_model: bool) -> None:
    if gene_init not in GENE_INITS:
        raise ValueError(f"Unknown gene_init {gene_init!r}; choose one of {GENE_INITS}.")
    if gene_init == "coexpression" and given_model:
        raise ValueError(
            "gene_init='coexpression' initialises a new model, but model= was given. Call "
            "scxtrimo.models.init_gene_embedding(model, X) on it first, or leave model=None."
        )
    if gene_init == "coexpression" and use_stream:
        raise ValueError(
            "gene_init='coexpression' needs the training cells in memory, but this input is streamed. "
            "Compute it on a sample instead: model = XTrimoGene(config); "
            "scxtrimo.models.init_gene_embedding(model, X_sample); then pretrain(..., model=model)."
        )


def _check_args(*, batch_size, grad_accum_steps, world_size, save_every, eval_every, block_cells, save_dir, lr,
                grad_clip, warmup_steps, eval_cells, min_genes, random_state, decoder_zeros):
    check_positive("batch_size", batch_size, integer=True)
    check_positive("grad_accum_steps", grad_accum_steps, integer=True)
    if batch_size < world_size * grad_accum_steps:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) is smaller than world size {world_size} x "
            f"grad_accum_steps={grad_accum_steps}: every rank needs at least one cell per micro-batch."
        )
    check_positive("save_every", save_every, integer=True, optional=True)
    if save_every is not None and save_dir is None:
        raise ValueError("save_every needs save_dir: the folder the training state is written to.")
    check_count("eval_every", eval_every, optional=True)
    check_positive("block_cells", block_cells, integer=True)
    check_positive("lr", lr)
    check_positive("grad_clip", grad_clip)  # 0 would zero every gradient, a negative one flip it into ascent
    check_count("warmup_steps", warmup_steps, optional=True)
    check_positive("eval_cells", eval_cells, integer=True)
    check_positive("decoder_zeros", decoder_zeros, integer=True, optional=True)
    check_positive("min_genes", min_genes, integer=True)
    check_count("random_state", random_state)
    if save_dir is not None:
        check_output_dir(save_dir)


def pretrain(
    data,
    *,
    config: str | XTrimoGeneConfig = "xtrimo-3m",
    model: XTrimoGene | str | os.PathLike | None = None,
    epochs: float = 1.0,
    max_steps: int | None = None,
    max_time: float | None = None,
    batch_size: int = 8,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_steps: int | None = None,
    grad_clip: float = 1.0,
    masking: MaskingConfig | None = None,
    eval_every: int = 200,
    eval_cells: int = 256,
    min_genes: int = MIN_GENES,
    gene_symbols: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    device: str = "auto",
    random_state: int = 0,
    save_dir: str | os.PathLike | None = None,
    progress: bool = True,
    grad_accum_steps: int = 1,
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    save_every: int | None = None,
    resume: bool = False,
    resume_from: str | os.PathLike | None = None,
    streaming: bool | None = None,
    block_cells: int = BLOCK_CELLS,
    callback: Callable[[dict], None] | None = None,
    decoder_zeros: int | None = None,
    thinning: ThinningConfig | None = None,
    gene_init: str = "random",
    gene_lr_scale: float = 1.0,
    cell_weight: float = 0.0,
    cell_readout: str = "dot",
    factor_weight: float = 0.0,
) -> tuple[XTrimoGene, pd.DataFrame]:
    """Pretrain xTrimoGene by regressing masked expression values (paper section 4, appendix 5).

    Cells are aligned to the 19,264 reference genes and normalized to log1p CP10k on the fly,
    cells with fewer than ``min_genes`` expressed reference genes are dropped (appendix 1 keeps
    cells with more than 200), and the rest are split 96:2:2 into train / validation / test
    with ``random_state``. Each step masks ~30% of every cell's expressed genes and about as
    many unexpressed ones (80% [MASK], 10% random value, 10% unchanged; section 4.2, appendix
    6) and minimizes the MSE at those positions. AdamW with linear warm-up and cosine decay to
    10% of ``lr``, gradient clipping; bf16 autocast on CUDA, fp32 on CPU.

    **Data at scale.** When every input is a path to an ``.h5ad`` file, the files are opened in
    backed mode and streamed: read in blocks of ``block_cells`` rows, aligned, normalized and
    quality-controlled per block, blocks visited in a new random order every epoch and cells
    shuffled within a block (:class:`~scxtrimo.data.StreamBatches`). Host memory then
    holds at most ``block_cells + batch_size - 1`` training cells plus ``2 x eval_cells``
    evaluation cells, whatever the corpus size. One extra pass at the start counts the cells
    and collects the evaluation cells. The split assigns each cell by a seeded hash of its
    file's base name and its ``obs_name`` (96:2:2 in expectation), independent of block size
    and order. In-memory inputs (AnnData, MuData, mixtures) are stacked in memory and split by
    a seeded permutation (exactly 96:2:2).

    **Distributed training** (appendix 5: data parallelism, gradient accumulation, ZeRO-2,
    activation checkpointing). Under ``torchrun`` (or with an initialized
    ``torch.distributed`` process group) each of the ``W`` ranks trains on a disjoint shard of
    every global batch of ``batch_size`` cells (positions ``rank, rank + W, ...``), split into
    ``grad_accum_steps`` micro-batches; the loss is normalized by the number of masked
    positions in the whole global batch, and each cell's mask is a function of
    ``(random_state, step, position in the global batch)`` only
    (:func:`~scxtrimo.data.mask_values_keyed`), so ``W`` processes compute the same
    update as one process with the same ``batch_size`` (up to float rounding; with
    ``decoder_zeros`` the decoded set of a micro-batch is sized from its longest cell, so a
    different micro-batch size also changes how many unexpressed genes a cell's decoder
    sees, a small change of the update). Every rank
    reads every block of a stream (and uses only its shard); every rank evaluates.

    **Checkpoint and resume.** With ``save_dir``, every ``save_every`` steps (and at each
    evaluation and at the end) rank 0 writes the model files (``config.json``,
    ``model.safetensors``, ``genes.txt``: :func:`scxtrimo.models.load` reads the folder),
    ``history.csv``, and ``train_state.pt``: weights, AdamW state, step, epoch, data position,
    torch CPU/CUDA RNG states, history and the run's settings. Every file is written to a
    temporary name in the same folder, fsynced and renamed, so a crash leaves the previous
    save intact. ``resume=True`` continues from it and, with the same arguments, reproduces
    the uninterrupted run (exactly in fp32 on one device; a different world size or
    ``grad_accum_steps`` changes only float rounding, and with ``decoder_zeros`` the sampled
    context as above). Batch order and masks are stateless
    functions of ``(random_state, epoch, step)``; no generator state needs restoring for them.

    Parameters
    ----------
    data
        AnnData (raw counts, or prepared with :func:`scxtrimo.pp.normalize`), MuData (its RNA
        modality), a path to an ``.h5ad`` file, or a list of these (each file once). Not modified.
    config
        Architecture for a new model: ``"xtrimo-3m"``, ``"xtrimo-10m"``, ``"xtrimo-100m"`` or a
        :class:`~scxtrimo.models.XTrimoGeneConfig`. Ignored when ``model`` is given (with a
        ``UserWarning`` if it is not the default).
    model
        Continue training this model instead of starting from random weights: an
        :class:`~scxtrimo.models.XTrimoGene` (trained in place; with ``strategy="fsdp"`` on
        several processes it is sharded in place, so use the returned model), or a checkpoint
        name or folder (``"xtrimo-3m"``), loaded as :func:`scxtrimo.models.load` does.
        Continuing a pretrained model on the data set at hand (a few epochs) adapts it to that
        data set before :func:`scxtrimo.tl.embed`, as scVI is trained per data set.
    epochs, max_steps, max_time
        Stop after ``epochs`` passes over the training cells, ``max_steps`` optimizer steps, or
        ``max_time`` seconds of wall time (rank 0's clock, summed over resumed segments),
        whichever comes first.
    batch_size
        Cells per optimizer step: the **global** batch, over all ranks and micro-batches.
    lr, weight_decay, warmup_steps, grad_clip
        AdamW settings (the authors': lr 1e-4, no weight decay, clipping the gradient norm at
        1.0; ``lr`` and ``grad_clip`` must be positive). Warm-up defaults to 5% of the planned
        steps, at most 1,000.
    masking
        Masking ratios, :class:`~scxtrimo.data.MaskingConfig`.
    eval_every, eval_cells
        Every ``eval_every`` steps (and at the end), evaluate on up to ``eval_cells`` validation
        cells with fixed masks. Streamed input: also the test metrics use the first
        ``eval_cells`` test cells (in file order); in-memory input: all test cells.
    min_genes
        Keep cells with at least this many expressed reference genes.
    gene_symbols
        ``var`` column with gene symbols, if ``var_names`` are not symbols.
    layer
        ``layers`` key of the counts to read in every input (AnnData or ``.h5ad`` file), as in
        :func:`scxtrimo.tl.embed`; ``None``: ``layers['counts']`` if present, else ``X``.
    use_raw
        Read every input's ``raw.X`` (genes: its ``raw.var``), as in :func:`scxtrimo.tl.embed`.
    device
        ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``; under torchrun on CUDA each
        rank uses ``cuda:LOCAL_RANK``.
    random_state
        Seeds the split, the initialization, the batch order and the masks.
    save_dir
        Folder for the model files, ``history.csv`` and ``train_state.pt`` (rank 0 writes;
        created if missing, refused before training if it is a file).
    progress
        Show a progress bar (rank 0 only).
    grad_accum_steps
        Micro-batches per optimizer step on each rank (same update, less activation memory).
        Needs ``batch_size >= world size x grad_accum_steps``. In a single process, a step that
        runs out of CUDA memory is run again in twice as many micro-batches (kept for later
        steps; masks are keyed per cell, so the update is the same), with a ``RuntimeWarning``.
        Under torchrun the error is raised: lower ``batch_size`` or raise this.
    strategy
        Data parallelism when more than one process runs: ``"auto"`` / ``"ddp"``
        (DistributedDataParallel) or ``"fsdp"`` (FSDP2 ``fully_shard`` of encoder blocks,
        decoder layers and the root with ``reshard_after_forward=False``: gradients and
        optimizer state sharded, the ZeRO stage-2 equivalent, for large models on CUDA). With
        one process all three train the plain model.
    activation_checkpointing
        Recompute encoder blocks and decoder layers in the backward pass
        (:func:`torch.utils.checkpoint.checkpoint`) to save activation memory.
    save_every
        Steps between saves into ``save_dir`` (``None``: only at evaluations and at the end).
    resume, resume_from
        Continue from ``save_dir/train_state.pt`` (``resume=True``) or from the given
        ``train_state.pt`` file or folder (``resume_from``; implies ``resume``).
    streaming
        ``None`` (default): stream when every input is an ``.h5ad`` path; ``True`` insists;
        ``False`` loads everything into memory.
    block_cells
        Rows per block when streaming (default 2,048).
    callback
        Called on rank 0 after every optimizer step with a dict ``step``, ``epoch``,
        ``loss`` (the global batch's masked MSE), ``lr``, ``elapsed_s``.
    decoder_zeros
        ``None`` (default): the decoder reconstructs all 19,264 genes, as in the paper. An int
        ``z``: the decoder runs over each cell's expressed, masked and target genes plus ``z``
        random unexpressed genes (drawn per cell from its masking key), several times cheaper
        per step (:meth:`~scxtrimo.models.XTrimoGene.forward`). The encoder is unaffected.
    thinning
        ``None`` (default, the paper): the model sees each training cell as it is. A
        :class:`~scxtrimo.data.ThinningConfig`: depth-aware pretraining (the authors' released
        model): cells are binomially thinned to a random fraction of their reads
        (per-cell keyed, like the masks), the encoder sees the thinned cell and the loss is
        the MSE against the real cell's values. Models whose configuration has
        ``depth_tokens`` then get ``T`` = log10 of the real total and ``S`` = log10 of the
        thinned total; without thinning ``T = S``. Validation and test scores use the real
        cells (no thinning).
    gene_init
        Gene embedding of a new model (``model=None``, not resuming): ``"random"`` (the paper:
        normal, sd 0.02) or ``"coexpression"``: every gene expressed in at least 10 training
        cells starts at its coordinates in the top ``enc_dim`` components of the training
        cells' standardized log1p CP10k values (:func:`scxtrimo.models.init_gene_embedding`;
        a truncated SVD, about a minute for 27,000 cells on two CPU cores). In-memory input
        only; for streamed files call that function on a sample and pass ``model=``.
    gene_lr_scale
        Learning-rate multiplier of the gene embedding table: 1 (default, the paper) trains it
        with the rest; 0 freezes it (it stays exactly as it was), which keeps a co-expression
        start and the factor-score term's teacher fixed. The bundled ``xtrimo-3m`` was
        trained with it frozen.
    cell_weight, cell_readout
        Weight of the cell term (0, default: off; the bundled ``xtrimo-3m``: 1 with the
        ``"dot"`` read-out): a :class:`~scxtrimo.models.CellExpressionHead` predicts the real
        values at the masked genes from the mean-pooled encoder outputs of the corrupted cell
        (the embedding :func:`scxtrimo.tl.embed` returns with ``pooling="mean"``); its MSE per
        masked gene, times this weight, is added to the masked MSE. ``cell_readout``:
        ``"dot"`` (a learned scale, so the embedding's own geometry must predict expression) or
        ``"bilinear"`` (a learned map). Not in the paper.
    factor_weight
        Weight of the factor-score term (0, default: off; the bundled ``xtrimo-3m``: 2): a
        :class:`~scxtrimo.models.FactorScoreHead` asks the mean-pooled encoder output of the
        corrupted cell, up to a learned rotation, scale and shift, for the real cell's
        least-squares scores on the gene embedding table as it is when training starts (use
        with ``gene_lr_scale=0``); its MSE per cell, times this weight, is added. Its
        statistics and alignment come from 512 training cells spread over the input
        (streamed: spread over at most 8 of its blocks). Not in the paper. The heads of
        both terms train at 100x ``lr`` (same schedule), are all-reduced across ranks, and
        are discarded afterwards; to continue the bundled model on its own objective, pass
        ``model="xtrimo-3m", gene_lr_scale=0, cell_weight=1, factor_weight=2,
        decoder_zeros=1024, thinning=ThinningConfig(p_thin=0.8)``.

    Returns
    -------
    model : XTrimoGene
        The trained model (eval mode, on ``device``, unwrapped and unsharded), with
        ``model.metadata`` describing the run. A continued ``model`` whose metadata names its
        pooling (the bundled ``xtrimo-3m``: ``"mean"``) keeps it, so :func:`scxtrimo.tl.embed`
        pools the result as it pooled the start; pass ``pooling=`` there to choose another.
        The training state records it, so a resume keeps it even with ``config=`` in place of
        ``model=``.
    history : pandas.DataFrame
        One row per evaluation: ``step``, ``epoch``, ``cells_seen``, ``lr``, ``elapsed_s``,
        ``train_mse`` (mean since the last evaluation), ``val_mse``, ``val_pearson`` (masked
        positions); with ``cell_weight`` / ``factor_weight``, also ``train_cell_mse`` (per
        masked gene) / ``train_factor_mse`` (per cell). ``history.attrs['test']`` holds the
        final test-split metrics.

    Raises
    ------
    ValueError
        No input (``data=[]``); an input file given twice, or one that is not ``.h5ad`` (HDF5; a
        packed ``.xtc`` corpus is pointed to ``scripts/train_device.py``); ``decoder_zeros`` not a
        positive integer; ``cell_weight`` or ``factor_weight`` not finite;
        no cell passes QC; fewer training cells than ``batch_size``; ``epochs``, ``max_time``,
        ``lr`` or ``grad_clip`` not a positive number; ``max_steps``, ``batch_size``,
        ``eval_cells``, ``min_genes``, ``grad_accum_steps``, ``block_cells`` or ``save_every``
        not a positive integer; ``warmup_steps``, ``eval_every`` or ``random_state`` not an
        integer >= 0; an unknown ``config`` name; an unknown ``strategy``,
        ``gene_init`` or ``cell_readout``; a negative ``gene_lr_scale``, ``cell_weight`` or
        ``factor_weight``; ``cell_weight > 0`` with a trained gene table under FSDP on several
        processes; ``gene_init="coexpression"`` with streamed input or with ``model``;
        ``use_raw=True`` with ``layer``, or for an input without ``raw``;
        ``batch_size`` smaller than world size x ``grad_accum_steps``; ``save_every`` without
        ``save_dir``; ``resume`` without a saved training state, or with settings (model
        configuration, batch size, learning-rate schedule, masking, seed, data, ...) that
        differ from the saved run's; the alignment and validation errors of
        :func:`scxtrimo.pp.align_genes`; the errors of :func:`scxtrimo.models.load` for a
        ``model`` name or folder that is not a valid checkpoint.
    TypeError
        ``masking`` not a :class:`~scxtrimo.data.MaskingConfig`, ``thinning`` not a
        :class:`~scxtrimo.data.ThinningConfig`, ``config`` neither a name nor an
        :class:`~scxtrimo.models.XTrimoGeneConfig`; ``use_raw`` not a bool.
    FileNotFoundError
        An input path that does not exist.
    KeyError
        ``layer`` is not a key of an input's ``layers``.
    NotADirectoryError
        ``save_dir`` is a file, or lies inside one (checked before training).
    RuntimeError
        ``strategy="fsdp"`` on a device / backend where torch refuses FSDP.
    """
    strategy = D.check_strategy(strategy)
    check_positive("epochs", epochs)
    check_positive("max_steps", max_steps, integer=True, optional=True)
    check_positive("max_time", max_time, optional=True)
    resume = bool(resume) or resume_from is not None
    masking = masking or MaskingConfig()
    items = _as_list(data)
    if not items:
        raise ValueError("no input data: data is empty; pass an AnnData, a MuData, an .h5ad path or a list of them.")
    paths = [item for item in items if isinstance(item, (str, os.PathLike))]
    packed = [str(p) for p in paths if Path(p).suffix == ".xtc"]
    if packed:
        raise ValueError(f"{packed[0]} is a packed corpus (scxtrimo corpus / data.pack_corpus); tl.pretrain reads "
                         ".h5ad files. Train from the corpus with `python scripts/train_device.py train --corpus "
                         f"{packed[0]} ...`, or pass the .h5ad files it was packed from.")
    if paths:
        check_h5ad_files(paths)
    if not isinstance(masking, MaskingConfig):
        raise TypeError(f"masking must be a MaskingConfig, got {masking!r}; e.g. scxtrimo.data.MaskingConfig(p_mask=0.8).")
    if thinning is not None and not isinstance(thinning, ThinningConfig):
        raise TypeError(f"thinning must be a ThinningConfig or None, got {thinning!r}; e.g. "
                        "scxtrimo.data.ThinningConfig(p_thin=0.5).")
    if model is not None and config != "xtrimo-3m":
        warnings.warn(f"config={getattr(config, 'name', config)!r} is ignored: model= is given, "
                      "and training continues its architecture.", UserWarning, stacklevel=2)
    if model is None:
        if not isinstance(config, (str, XTrimoGeneConfig)):
            raise TypeError(f"config must be a configuration name or an XTrimoGeneConfig, got {type(config).__name__}; "
                            "e.g. XTrimoGeneConfig.from_dict(mapping).")
        get_config(config)  # an unknown name fails here, not after the data are read
    use_stream = _use_streaming(items, streaming)
    _check_gene_init(gene_init, use_stream, model is not None)
    terms = CellTermsConfig(float(cell_weight), cell_readout, float(factor_weight))
    if not gene_lr_scale >= 0:
        raise ValueError(f"gene_lr_scale must be >= 0 (0 freezes the gene embedding); got {gene_lr_scale}.")
    ctx, dev = D.init_distributed(device)
    try:
        _check_args(batch_size=batch_size, grad_accum_steps=grad_accum_steps, world_size=ctx.world_size,
                    save_every=save_every, eval_every=eval_every, block_cells=block_cells, save_dir=save_dir, lr=lr,
                    grad_clip=grad_clip, warmup_steps=warmup_steps, eval_cells=eval_cells, min_genes=min_genes,
                    random_state=random_state, decoder_zeros=decoder_zeros)
        state = load_train_state(state_path(resume_from, save_dir)) if resume else None
        result = _train(
            items, use_stream=use_stream, ctx=ctx, dev=dev, state=state, config=config, model=model, epochs=epochs,
            max_steps=max_steps, max_time=max_time, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, grad_clip=grad_clip, masking=masking, eval_every=eval_every,
            eval_cells=eval_cells, min_genes=min_genes, gene_symbols=gene_symbols, layer=layer, use_raw=use_raw,
            random_state=random_state, save_dir=save_dir, progress=progress, grad_accum_steps=grad_accum_steps, strategy=strategy,
            activation_checkpointing=activation_checkpointing, save_every=save_every, block_cells=block_cells,
            callback=callback, decoder_zeros=decoder_zeros, thinning=thinning, gene_init=gene_init,
            gene_lr_scale=float(gene_lr_scale), terms=terms,
        )
        if ctx.owned and ctx.world_size > 1:
            torch.distributed.barrier()  # rank 0 has finished writing before anyone leaves
        return result
    finally:
        ctx.shutdown()


def _train(items, *, use_stream, ctx, dev, state, config, model, epochs, max_steps, max_time, batch_size, lr,
           weight_decay, warmup_steps, grad_clip, masking, eval_every, eval_cells, min_genes, gene_symbols, layer,
           use_raw, random_state, save_dir, progress, grad_accum_steps, strategy, activation_checkpointing, save_every,
           block_cells, callback, decoder_zeros=None, thinning=None, gene_init="random", gene_lr_scale=1.0,
           terms=CellTermsConfig()):
    torch.manual_seed(random_state)
    corpus = None
    X_train = None
    if use_stream:
        corpus = H5adCorpus(items, block_cells=block_cells, gene_symbols=gene_symbols, layer=layer, use_raw=use_raw,
                            min_genes=min_genes,
                            random_state=random_state)
        counts, val, test = corpus.scan(eval_cells)
        if counts["cells"] == 0:
            corpus.close()
            raise ValueError(f"No cell has at least {min_genes} expressed reference genes; nothing to pretrain on.")
        X_val, X_test = val.X, test.X
        n_cells = counts["cells"]
        split_sizes = {k: counts[k] for k in ("train", "validation", "test")}
        source = StreamBatches(corpus, batch_size, random_state)
        data_desc = {"kind": "stream", "files": [list(d) for d in corpus.describe()], "block_cells": int(block_cells),
                     "fingerprint": fingerprint(corpus.names())}
    else:
        X, _ = collect_cells(items, gene_symbols=gene_symbols, layer=layer, use_raw=use_raw, min_genes=min_genes)
        split = split_cells(X.shape[0], random_state)
        X_train, X_val, X_test = (X[split[k]] for k in ("train", "validation", "test"))
        n_cells = X.shape[0]
        split_sizes = {k: int(len(v)) for k, v in split.items()}
        source = MemoryBatches(X_train, batch_size, random_state)
        data_desc = {"kind": "memory", "cells": int(X.shape[0]), "nnz": int(X.nnz),
                     "fingerprint": fingerprint((X.indptr, X.indices, X.data))}
    X_val = X_val[:eval_cells]
    stat_counts = None  # the factor-score term's statistics cells
    if terms.factor_weight > 0:
        stat_counts = corpus.spread_cells(FACTOR_STAT_CELLS) if X_train is None else X_train[stat_rows(X_train.shape[0])]
    try:
        return _loop(
            source=source, corpus=corpus, X_val=X_val, X_test=X_test, n_cells=n_cells, split_sizes=split_sizes,
            data_desc=data_desc, ctx=ctx, dev=dev, state=state, config=config, model=model, epochs=epochs,
            max_steps=max_steps, max_time=max_time, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, grad_clip=grad_clip, masking=masking, eval_every=eval_every,
            min_genes=min_genes, random_state=random_state, save_dir=save_dir, progress=progress,
            grad_accum_steps=grad_accum_steps, strategy=strategy, activation_checkpointing=activation_checkpointing,
            save_every=save_every, callback=callback, decoder_zeros=decoder_zeros, thinning=thinning,
            gene_init_counts=X_train if gene_init == "coexpression" else None, gene_lr_scale=gene_lr_scale,
            terms=terms, stat_counts=stat_counts,
        )
    finally:
        if corpus is not None:
            corpus.close()


def _loop(*, source, corpus, X_val, X_test, n_cells, split_sizes, data_desc, ctx, dev, state, config, model, epochs,
          max_steps, max_time, batch_size, lr, weight_decay, warmup_steps, grad_clip, masking, eval_every,
          min_genes, random_state, save_dir, progress, grad_accum_steps, strategy, activation_checkpointing,
          save_every, callback, decoder_zeros=None, thinning=None, gene_init_counts=None, gene_lr_scale=1.0,
          terms=CellTermsConfig(), stat_counts=None):
    if model is None:
        model = XTrimoGene(config)
        if gene_init_counts is not None and state is None:
            init_gene_embedding(model, log1p_normalize(gene_init_counts), random_state=random_state)
    else:
        model = resolve_model(model, dev)
    # a continued checkpoint keeps the pooling it was measured best with (tl.embed's default);
    # a resume keeps the pooling of the run it continues, even when the model is rebuilt from config
    kept = {"pooling": model.default_pooling} if "pooling" in (model.metadata or {}) else {}
    if state is not None:
        kept = state.get("kept", {}) | kept
    # how the run's model was initialised: a resume keeps the record of the run it continues,
    # whatever gene_init it is called with (a state from before this was saved: as this call says)
    began = "coexpression" if gene_init_counts is not None else "random"
    if state is not None:
        began = state.get("gene_init", began)
    cfg = model.config
    n_train = split_sizes["train"]
    if n_train < batch_size:
        raise ValueError(f"{n_train} training cells are fewer than batch_size={batch_size}.")
    steps_per_epoch = max(1, n_train // batch_size)
    total = int(math.ceil(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, int(max_steps))
    warmup = warmup_steps if warmup_steps is not None else max(1, min(1000, total // 20))
    signature = {
        "config": cfg.to_dict(), "batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay),
        "warmup_steps": int(warmup), "total_steps": int(total), "grad_clip": float(grad_clip),
        "masking": dict(masking.__dict__), "random_state": int(random_state), "min_genes": int(min_genes),
        "decoder_zeros": decoder_zeros, "max_time": None if max_time is None else float(max_time), "data": data_desc,
        "thinning": None if thinning is None else dict(thinning.__dict__),
        "gene_lr_scale": float(gene_lr_scale), "cell_terms": terms.to_dict() if terms.active else None,
    }
    if state is not None:
        check_signature(_with_defaults(state["signature"], data_desc), signature)
        D.load_model_state(model, state["model"])
    raw = model.to(dev).train()
    step, history, running, elapsed0 = 0, [], [], 0.0
    sharded = D.is_sharded(strategy, ctx)
    if sharded and terms.cell_weight > 0 and gene_lr_scale > 0:
        raise ValueError("cell_weight > 0 reads the gene table outside the model's forward pass, which FSDP "
                         "shards; freeze the table (gene_lr_scale=0) or use strategy='ddp'.")
    heads = None
    if terms.active:  # built on the unsharded model; a resume loads the saved heads instead of aligning
        heads = CellTerms(raw, terms, stat_counts=stat_counts, device=dev, align=state is None)
        if state is not None:
            heads.load_training_state(state["cell_terms"])
    # the cell head's gene table: the model's own, or under FSDP (which shards it) a copy of the frozen table
    gene_table = raw.gene_embedding.weight.detach().clone() if sharded else raw.gene_embedding.weight
    if sharded:
        # FSDP2 warns when a wrapped module returns a view; every consumer here (performer's
        # residual `x = x + f(x)`, the loss's boolean indexing) is out-of-place, so it is harmless
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    gene_trainable = raw.gene_embedding.weight.requires_grad
    with D.activation_checkpointing(raw, activation_checkpointing), gene_table_training(raw, gene_lr_scale > 0):
        wrapped = D.wrap_model(raw, strategy, ctx, dev)
        # one group as before unless the gene table's rate differs (old training states still resume)
        groups = raw.parameters() if gene_lr_scale == 1 else param_groups(raw, gene_lr_scale)
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        head_opt = torch.optim.AdamW(heads.parameters(), lr=lr * HEAD_LR_SCALE, weight_decay=weight_decay) \
            if heads is not None else None
        if state is not None:
            D.load_optimizer_state(raw, opt, state["optimizer"], strategy, ctx)
            if head_opt is not None:
                head_opt.load_state_dict(state["cell_terms"]["optimizer"])
            source.load_state_dict(state["data"])
            step, history, running = int(state["step"]), list(state["history"]), [
                r if isinstance(r, dict) else {"mse": float(r)} for r in state["running"]]  # older states: floats
            elapsed0 = float(state["elapsed_s"])
            torch.set_rng_state(state["rng"]["torch"])
            if dev.type == "cuda" and state["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        t0 = time.perf_counter() - elapsed0

        def elapsed() -> float:
            """Seconds since the start (over resumed segments); rank 0's clock when it matters."""
            now = time.perf_counter() - t0
            if max_time is None or ctx.world_size == 1:
                return now
            return float(ctx.broadcast(torch.tensor([now], dtype=torch.float64, device=dev)))

        def metadata(extra: dict | None = None, now: float | None = None) -> dict:
            now = elapsed() if now is None else now
            return _metadata(cfg, n_cells, split_sizes, step, batch_size, lr, now, dev, history, masking,
                             world_size=ctx.world_size, grad_accum_steps=grad_accum_steps, decoder_zeros=decoder_zeros,
                             thinning=thinning,
                             strategy=("ddp" if strategy == "auto" else strategy) if ctx.world_size > 1 else "single") \
                | ({"gene_init": "coexpression"} if began == "coexpression" else {}) \
                | ({"gene_lr_scale": float(gene_lr_scale)} if gene_lr_scale != 1 else {}) \
                | ({"cell_terms": terms.to_dict()} if terms.active else {}) | kept | (extra or {})

        def save(extra: dict | None = None):
            model_sd = D.full_model_state(raw, strategy, ctx)
            opt_sd = D.full_optimizer_state(raw, opt, strategy, ctx)
            now = elapsed()  # collective when max_time is set
            if not ctx.is_main:
                return
            meta = metadata(extra, now)
            train_state = {
                "step": int(step), "epoch": int(source.epoch), "data": source.state_dict(),
                "model": model_sd, "optimizer": opt_sd, "lr": float(opt.param_groups[0]["lr"]),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if dev.type == "cuda" else []},
                "signature": signature, "history": history, "running": [{k: float(v) for k, v in r.items()} for r in running],
                "elapsed_s": float(now), "world_size": int(ctx.world_size),
                "grad_accum_steps": int(grad_accum_steps), "scxtrimo_version": __version__, "kept": kept,
                "gene_init": began,
            }
            if heads is not None:
                train_state["cell_terms"] = {**heads.training_state(), "optimizer": head_opt.state_dict()}
            save_train_state(train_state, save_dir)
            target = raw
            if sharded:
                target = XTrimoGene(cfg)
                D.load_model_state(target, model_sd)
            target.metadata = meta
            target.save(save_dir, metadata=meta)
            buf = io.StringIO()
            pd.DataFrame(history).to_csv(buf, index=False)
            atomic_write_bytes(buf.getvalue().encode(), Path(save_dir) / "history.csv")

        def record():
            metrics = evaluate(raw, X_val, batch_size=max(1, batch_size // grad_accum_steps), masking=masking,
                               device=dev, seed=random_state, decoder_zeros=decoder_zeros)
            row = {
                "step": int(step), "epoch": step / steps_per_epoch, "cells_seen": int(step * batch_size),
                "lr": float(opt.param_groups[0]["lr"]), "elapsed_s": elapsed(),
                "train_mse": float(np.mean([r["mse"] for r in running])) if running else float("nan"),
                "val_mse": metrics["mse"], "val_pearson": metrics["pearson"],
            }
            for key in ("cell_mse", "factor_mse"):  # the cell-level terms that are on
                if running and key in running[0]:
                    row[f"train_{key}"] = float(np.mean([r[key] for r in running]))
            history.append(row)
            running.clear()

        # a step that runs out of CUDA memory is run again in twice as many micro-batches (one process)
        micro = _MicroBatches(grad_accum_steps, world_size=ctx.world_size)
        bar = tqdm(total=total, initial=min(step, total), desc="pretrain", unit="step",
                   disable=not (progress and ctx.is_main))
        while step < total:
            now = elapsed()
            if max_time is not None and now > max_time:
                break
            X_batch, _ = source.next_batch()
            frac = max((step - warmup) / max(1, total - warmup), now / max_time if max_time else 0.0)
            factor = lr_factor(step, warmup, frac)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0) * factor
            if head_opt is not None:
                head_opt.param_groups[0]["lr"] = lr * HEAD_LR_SCALE * factor
            losses = retry_on_oom(
                lambda: _train_step(wrapped, opt, X_batch, step=step, ctx=ctx, dev=dev, masking=masking,
                                    random_state=random_state, grad_accum_steps=micro.count,
                                    strategy=strategy, params=raw.parameters(), grad_clip=grad_clip,
                                    decoder_zeros=decoder_zeros, thinning=thinning, heads=heads, head_opt=head_opt,
                                    gene_table=gene_table),
                lambda: micro.double(X_batch.shape[0]), what="tl.pretrain")
            loss = losses["mse"]
            step += 1
            running.append(losses)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if callback is not None and ctx.is_main:
                callback({"step": step, "epoch": step / steps_per_epoch, "loss": loss,
                          "lr": float(opt.param_groups[0]["lr"]), "elapsed_s": time.perf_counter() - t0})
            evaluated = bool(eval_every) and step % eval_every == 0
            if evaluated:
                record()
            if save_dir is not None and (evaluated or (save_every and step % save_every == 0)) and step < total:
                save()
        bar.close()
        if not history or history[-1]["step"] != step:
            record()
        test = evaluate(raw, X_test, batch_size=max(1, batch_size // grad_accum_steps), masking=masking,
                        device=dev, seed=random_state + 1, decoder_zeros=decoder_zeros)
        if save_dir is not None:
            save({"test": test})
        if sharded:
            out = XTrimoGene(cfg)
            D.load_model_state(out, D.full_model_state(raw, strategy, ctx, all_ranks=True))
            out = out.to(dev)
        else:
            out = raw
    hist = pd.DataFrame(history)
    hist.attrs["test"] = test
    out.metadata = metadata({"test": test})
    out.gene_embedding.weight.requires_grad_(gene_trainable)
    return out.eval(), hist


class _MicroBatches:
    """How many micro-batches a step is cut into; doubled when a step runs out of CUDA memory.

    Only one process can do that: under torchrun the other ranks are already waiting in the
    step's collective operations, so there the error is raised (lower ``batch_size`` or raise
    ``grad_accum_steps``).
    """

    def __init__(self, count: int, *, world_size: int):
        self.count, self.world_size = int(count), int(world_size)

    def double(self, cells: int) -> bool:
        if self.world_size > 1 or self.count >= cells:
            return False
        self.count = min(2 * self.count, cells)
        return True


def _with_defaults(saved: dict, data_desc: dict) -> dict:
    """A saved run signature with the settings added to scxtrimo since it was written filled in
    with their defaults (which reproduce the older behaviour), so that such a run still resumes.
    A state saved before data fingerprints cannot be checked for them: it takes this run's."""
    saved = dict(saved)
    if "fingerprint" in data_desc and "fingerprint" not in saved.get("data", {}):
        saved["data"] = {**saved.get("data", {}), "fingerprint": data_desc["fingerprint"]}
    saved["masking"] = {**MaskingConfig().__dict__, **saved.get("masking", {})}
    saved["config"] = XTrimoGeneConfig.from_dict(saved["config"]).to_dict()
    if saved.get("thinning") is not None:
        saved["thinning"] = {**ThinningConfig().__dict__, **saved["thinning"]}
    saved.setdefault("gene_lr_scale", 1.0)
    saved.setdefault("cell_terms", None)
    return saved


def _train_step(wrapped, opt, X_batch: sp.csr_matrix, *, step, ctx, dev, masking, random_state, grad_accum_steps,
                strategy, params, grad_clip, decoder_zeros=None, thinning=None, heads: CellTerms | None = None,
                head_opt=None, gene_table=None) -> dict[str, float]:
    """One optimizer step on this rank's shard of the global batch (counts).

    Returns the global batch's masked MSE (``mse``) and, with ``heads``, its cell-level terms
    (``cell_mse`` per masked gene, ``factor_mse`` per cell, for the terms that are on). The
    heads are replicated on every rank: their gradients are averaged here, after the last
    micro-batch, as DDP / FSDP average the model's.
    """
    depth_tokens = getattr(wrapped, "module", wrapped).config.depth_tokens
    positions = np.arange(X_batch.shape[0])[ctx.rank :: ctx.world_size]
    micro = [m for m in np.array_split(positions, grad_accum_steps) if m.size]
    batches, scores = [], []
    for m in micro:
        counts = counts_to_device(X_batch[m], dev)
        keys = cell_keys(random_state, step, m, device=dev)
        tb = training_batch(counts, keys, masking=masking, thinning=thinning, depth_tokens=depth_tokens)
        batches.append(tb)
        scores.append(keyed_uniform(keys, tb.inputs.shape[1]) if decoder_zeros is not None else None)
    n_local = sum(tb.target.sum() for tb in batches)
    n_global = ctx.all_reduce_sum(torch.as_tensor(n_local, dtype=torch.float64, device=dev).clone()).clamp(min=1)
    scale = (ctx.world_size / n_global).float()
    opt.zero_grad(set_to_none=True)
    if head_opt is not None:
        head_opt.zero_grad(set_to_none=True)
    totals = torch.zeros(3, dtype=torch.float64, device=dev)  # masked SSE, cell SSE, factor SSE
    for i, tb in enumerate(batches):
        with D.grad_sync(wrapped, strategy, ctx, sync=i == len(batches) - 1):
            with autocast(dev):
                out = wrapped(tb.inputs, tb.is_mask, keep=tb.keep, decoder_zeros=decoder_zeros, zero_scores=scores[i],
                              return_cells=heads is not None)
            pred, cells = out if heads is not None else (out, None)
            sse = masked_sse(pred, tb)
            loss = sse * scale
            if heads is not None:
                terms = heads.losses(cells, gene_table, tb)
                # DDP / FSDP average over ranks: the global normalizers times the world size
                loss = loss + heads.weighted(terms, n_global.float(), X_batch.shape[0]) * ctx.world_size
                for j, key in ((1, "cell"), (2, "factor")):
                    if key in terms:
                        totals[j] += terms[key].detach().double()
            loss.backward()
        totals[0] += sse.detach().double()
    torch.nn.utils.clip_grad_norm_(list(params), grad_clip)
    opt.step()
    if heads is not None:
        for p in heads.parameters():  # replicated heads: average their gradients over the ranks
            if p.grad is not None and ctx.world_size > 1:
                p.grad = ctx.all_reduce_sum(p.grad.contiguous()) / ctx.world_size
        for h in heads.children():  # clipped on their own: their gradients must not shrink the model's step
            torch.nn.utils.clip_grad_norm_(h.parameters(), grad_clip)
        head_opt.step()
    totals = ctx.all_reduce_sum(totals)
    result = {"mse": float(totals[0] / n_global)}
    if heads is not None and heads.head is not None:
        result["cell_mse"] = float(totals[1] / n_global)
    if heads is not None and heads.factor is not None:
        result["factor_mse"] = float(totals[2] / X_batch.shape[0])
    return result


def _metadata(cfg, n_cells, split_sizes, step, batch_size, lr, wall_time_s, dev, history, masking, *,
              world_size=1, grad_accum_steps=1, strategy="single", decoder_zeros=None, thinning=None) -> dict:
    last = history[-1] if history else {}
    return {
        "cells": int(n_cells),
        "split": {k: int(v) for k, v in split_sizes.items()},
        "steps": int(step),
        "batch_size": int(batch_size),
        "cells_seen": int(step * batch_size),
        "lr": float(lr),
        "wall_time_s": round(float(wall_time_s), 1),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "world_size": int(world_size),
        "grad_accum_steps": int(grad_accum_steps),
        "strategy": strategy,
        "masking": dict(masking.__dict__),
        "decoder_zeros": decoder_zeros,
        "thinning": None if thinning is None else dict(thinning.__dict__),
        "val_mse": last.get("val_mse"),
        "val_pearson": last.get("val_pearson"),
    }
