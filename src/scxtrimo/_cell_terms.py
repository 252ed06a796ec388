"""The two cell-level training terms beside masked regression, shared by ``tl.pretrain`` and the
corpus trainer (``scripts/train_device.py``).

Masked regression (paper section 4) never asks the pooled cell embedding, the one
``tl.embed`` returns, for anything. The **cell term** (:class:`~scxtrimo.models.CellExpressionHead`)
asks the mean-pooled encoder output of the corrupted cell for the real values at the masked
genes; the **factor-score term** (:class:`~scxtrimo.models.FactorScoreHead`) asks it, up to a
rotation, scale and shift, for the real cell's least-squares scores on the (frozen) gene
embedding. The bundled ``xtrimo-3m`` was trained with both (model card). Neither is in the
paper; the heads are trained alongside the model and then discarded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ._device import autocast
from ._inference import device_batches, token_budget
from .data._depth import depth_columns, log1p_cp10k
from .data._objective import TrainingBatch, counts_to_device
from .models._cell_head import READOUTS, CellExpressionHead
from .models._factor_head import FactorScoreHead

#: Training cells (evenly spaced over the training data) whose factor scores set the factor-score
#: term's centre and spread, and on which its rotation, scale and shift are aligned.
FACTOR_STAT_CELLS = 512

#: Learning-rate multiplier of the heads: the cell head's per-gene biases must travel to the
#: genes' mean levels (about 1-2 log1p units) within a run, which at the encoder's rate (1e-4 per
#: AdamW step) they cannot.
HEAD_LR_SCALE = 100.0


@dataclass(frozen=True)
class CellTermsConfig:
    """Weights of the cell-level terms (0 turns a term off; both 0: the paper's objective).

    cell_weight : weight of the cell term's MSE (per masked target, like the masked MSE).
    cell_readout : the cell head's read-out, ``"bilinear"`` or ``"dot"`` (:class:`~scxtrimo.models.CellExpressionHead`).
    factor_weight : weight of the factor-score term's MSE (per cell, averaged over the factors).
    """

    cell_weight: float = 0.0
    cell_readout: str = "bilinear"
    factor_weight: float = 0.0

    def __post_init__(self):
        if not 0 <= self.cell_weight < float("inf"):
            raise ValueError(f"cell_weight must be a finite number >= 0 (0: masked regression alone); got {self.cell_weight}.")
        if not 0 <= self.factor_weight < float("inf"):
            raise ValueError(f"factor_weight must be a finite number >= 0 (0: no factor-score term); got {self.factor_weight}.")
        if self.cell_readout not in READOUTS:
            raise ValueError(f"cell_readout must be one of {READOUTS}; got {self.cell_readout!r}.")

    @property
    def active(self) -> bool:
        """Whether any term is on (the model must then return the pooled cells)."""
        return self.cell_weight > 0 or self.factor_weight > 0

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def fit_factor_head(model, counts: sp.csr_matrix, device: torch.device, *, align: bool = True,
                    log=None) -> FactorScoreHead:
    """A :class:`~scxtrimo.models.FactorScoreHead` on the model's gene rows as they are now.

    Its targets are standardized on the cells ``counts`` (raw counts on the reference genes,
    ``(n, n_genes)`` CSR; :data:`FACTOR_STAT_CELLS` evenly spaced training cells) and, with
    ``align``, its rotation, scale and shift are set so that the model's mean-pooled embeddings
    of those cells, uncorrupted, match them (a resumed run loads them instead).
    """
    values, total = log1p_cp10k(counts_to_device(counts, device))
    factor = FactorScoreHead(model.gene_embedding.weight[: model.config.n_genes], values).to(device)
    if not align:
        return factor.train()
    inputs = values
    if model.config.depth_tokens:
        inputs = torch.cat([values, depth_columns(torch.log10(total), torch.log10(total))], 1)
    was = model.training
    model.eval()
    # cells of similar length together (as tl.embed batches them), not 32 in corpus order padded
    # to the deepest: on the CPU that was 2.5 s per batch of the tiny test model, most of it padding
    lengths = (inputs != 0).sum(1).cpu().numpy()
    batches = device_batches(lengths, device, max_cells=32, max_tokens=token_budget(device, config=model.config))
    cells = torch.empty(len(values), model.config.enc_dim, device=device)
    with autocast(device):
        for rows in batches:
            idx = torch.as_tensor(rows, device=device)
            part = inputs[idx]
            cells[idx] = model.pooled_visible(part, torch.zeros_like(part, dtype=torch.bool)).float()
    model.train(was)
    before = float(factor(cells, values)) / len(values)
    after = factor.align(cells, values)
    if log is not None:
        log(f"factor-score term: {len(values)} cells, MSE {before:.3f} before alignment, {after:.3f} after "
            f"(rotation, scale {float(factor.scale):.3g}, shift)")
    return factor.train()


def stat_rows(n: int) -> np.ndarray:
    """Positions of the :data:`FACTOR_STAT_CELLS` cells, evenly spaced over ``n`` training cells."""
    return np.linspace(0, n - 1, min(FACTOR_STAT_CELLS, n)).astype(int)


class CellTerms(nn.Module):
    """The heads of the active terms, and their losses on one micro-batch.

    Parameters
    ----------
    model
        The model being trained (its configuration and, for the factor term, its gene rows now).
    cfg
        :class:`CellTermsConfig`.
    stat_counts
        Raw counts of the factor term's statistics cells (see :func:`fit_factor_head`); needed
        when ``cfg.factor_weight > 0``.
    device
        Where the heads live.
    align
        Align the factor head on the model now (``False`` when a saved state is loaded next).
    log
        Where the factor head's alignment line goes.
    """

    def __init__(self, model, cfg: CellTermsConfig, *, stat_counts: sp.csr_matrix | None, device: torch.device,
                 align: bool = True, log=None):
        super().__init__()
        self.cfg = cfg
        self.head = None
        self.factor = None
        if cfg.cell_weight > 0:
            self.head = CellExpressionHead(model.config.enc_dim, model.config.n_genes, cfg.cell_readout).to(device)
        if cfg.factor_weight > 0:
            if stat_counts is None or stat_counts.shape[0] == 0:
                raise ValueError("factor_weight > 0 needs training cells to set the factor-score term's statistics.")
            self.factor = fit_factor_head(model, stat_counts, device, align=align, log=log)
        self.train()

    def losses(self, cells: torch.Tensor, gene_table: torch.Tensor, tb: TrainingBatch) -> dict[str, torch.Tensor]:
        """Sums of squared errors: ``cell`` over the masked targets of ``tb`` (divide by their
        number, like the masked SSE), ``factor`` over cells of the factor MSE (divide by the
        number of cells). Only the active terms' keys are present."""
        out = {}
        if self.head is not None:
            pred = self.head(cells, gene_table, tb.target)
            out["cell"] = (pred - tb.values[tb.target].float()).pow(2).sum()
        if self.factor is not None:
            out["factor"] = self.factor(cells, tb.values)
        return out

    def weighted(self, sse: dict[str, torch.Tensor], n_targets, n_cells) -> torch.Tensor:
        """The terms' contribution to the loss: ``cell_weight * cell / n_targets + factor_weight * factor / n_cells``."""
        weight = {"cell": (self.cfg.cell_weight, n_targets), "factor": (self.cfg.factor_weight, n_cells)}
        return sum(weight[k][0] * v / weight[k][1] for k, v in sse.items())

    def training_state(self) -> dict:
        """Parameters and the factor head's statistics (buffers not in ``state_dict``), for a resume."""
        state = {"params": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}
        if self.factor is not None:
            state["factor_buffers"] = {k: getattr(self.factor, k).detach().cpu().clone()
                                       for k in ("proj", "center", "spread")}
        return state

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["params"])
        if self.factor is not None:
            for k, v in state["factor_buffers"].items():
                getattr(self.factor, k).copy_(v)
