"""The xTrimoGene module: asymmetric encoder-decoder over sparse expression (paper section 3)."""

from __future__ import annotations

import torch
from torch import nn

from ..data._batching import TokenBatch, on_grid, select_tokens
from ._autobin import AutoDiscretization
from ._config import XTrimoGeneConfig, get_config
from ._decoder import Decoder
from ._encoder import Encoder

POOLINGS = ("max", "mean", "all")


def check_pooling(pooling: str, config: XTrimoGeneConfig) -> None:
    """Raise ``ValueError`` for an unknown pooling, or ``"all"`` on a model without depth tokens."""
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")
    if pooling == "all" and not config.depth_tokens:
        raise ValueError(
            f"pooling='all' concatenates the outputs at the depth tokens T and S, which model {config.name!r} "
            "does not have; use pooling='max' or 'mean'."
        )


def _mean_over(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, L, d)`` outputs averaged over each cell's ``valid`` ``(B, L)`` tokens -> ``(B, d)``."""
    v = valid.unsqueeze(-1)
    return (h * v).sum(1) / v.sum(1).clamp(min=1)


class XTrimoGene(nn.Module):
    """xTrimoGene (Gong et al., NeurIPS 2023).

    * Input embedding (section 3.3): auto-discretized value embedding ``E`` plus the learned gene
      embedding ``G`` (one row per reference gene). [MASK] and [PAD] are learned vectors.
    * Encoder (section 3.1): full attention over the unmasked expressed genes only.
    * Decoder (section 3.2): the encoder outputs at their genes, the [MASK] embedding at masked
      genes and the zero-value embedding elsewhere, plus gene embeddings, projected by ``W_p``
      to the decoder width and run through a Performer over all genes; a shared ``d -> 1``
      linear head predicts every gene's value.
    * Depth tokens (``config.depth_tokens``, the authors' released model): ``T`` and ``S`` follow
      the genes as two more positions with their own gene-embedding rows; a cell's input is then
      ``n_genes + 2`` values, and T or S is an encoder token when its value is positive.

    Embedding cells needs the encoder only (:meth:`embed_cells`).

    Parameters
    ----------
    config
        A :class:`XTrimoGeneConfig` or a configuration name (``"xtrimo-3m"``, ``"xtrimo-10m"``,
        ``"xtrimo-100m"``). The weights are random; :func:`scxtrimo.models.load` reads trained ones.

    Raises
    ------
    ValueError
        ``config`` is not a known configuration name.
    """

    def __init__(self, config: XTrimoGeneConfig | str = "xtrimo-3m"):
        super().__init__()
        self.config = cfg = get_config(config)
        self.gene_embedding = nn.Embedding(cfg.n_embeddings, cfg.enc_dim)
        self.value_embedding = AutoDiscretization(cfg.n_bins, cfg.enc_dim, cfg.autobin_alpha)
        self.mask_token = nn.Parameter(torch.zeros(cfg.enc_dim))
        self.pad_token = nn.Parameter(torch.zeros(cfg.enc_dim))
        self.encoder = Encoder(cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.enc_ff_mult, cfg.dropout,
                               norm_first=cfg.enc_norm_first, activation=cfg.enc_activation)
        self.decoder_proj = nn.Linear(cfg.enc_dim, cfg.dec_dim)
        self.decoder = Decoder(cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, cfg.dec_ff_mult, cfg.nb_features, cfg.dropout,
                               dim_head=cfg.dec_dim_head, key_max=cfg.key_max,
                               redraw_interval=cfg.feature_redraw_interval)
        self.head = nn.Linear(cfg.dec_dim, 1)
        self.out_norm = nn.LayerNorm(cfg.dec_dim) if cfg.out_norm else None
        self.reset_parameters()
        # provenance, filled in by scxtrimo.models.load / save
        self.checkpoint_name: str | None = None
        self.checkpoint_sha256: str | None = None
        self.metadata: dict = {}

    def save(self, path, *, dtype: torch.dtype = torch.float32, metadata: dict | None = None):
        """Write ``config.json``, ``model.safetensors`` and ``genes.txt`` into the folder ``path``.

        ``dtype=torch.float16`` halves the file; loading always returns float32 weights.
        ``config.json`` keeps ``self.metadata`` updated with ``metadata`` (its keys win).
        See :func:`scxtrimo.models.load`.

        Raises
        ------
        ValueError
            ``dtype`` is not a floating-point torch dtype, or the metadata cannot be written as
            JSON (nothing is written then).
        TypeError
            ``metadata`` is not a dict.
        """
        from ._io import save

        return save(self, path, dtype=dtype, metadata=metadata)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gene_embedding.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pad_token, std=0.02)

    @property
    def embedding_dim(self) -> int:
        """Width ``d`` of the encoder outputs (the cell embedding with ``"max"`` or ``"mean"`` pooling)."""
        return self.config.enc_dim

    @property
    def default_pooling(self) -> str:
        """The pooling :func:`scxtrimo.tl.embed` and :func:`scxtrimo.tl.annotate` use unless told:
        the checkpoint's own choice (``metadata["pooling"]``, set where the benchmark measured it
        best), else ``"max"``, the paper's."""
        chosen = (self.metadata or {}).get("pooling")
        return chosen if chosen in POOLINGS else "max"

    def embedding_width(self, pooling: str = "max") -> int:
        """Width of the cell embedding for ``pooling``: ``d``, or ``4 d`` for ``"all"``."""
        check_pooling(pooling, self.config)
        return 4 * self.config.enc_dim if pooling == "all" else self.config.enc_dim

    def n_parameters(self) -> int:
        """Number of trainable parameters (gene embedding included)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- encoder side -------------------------------------------------------------------
    def encode(self, batch: TokenBatch) -> torch.Tensor:
        """Encoder outputs ``(B, L, enc_dim)`` for a padded batch of expressed genes."""
        x = self.value_embedding(batch.values) + self.gene_embedding(batch.genes)
        x = torch.where(batch.valid.unsqueeze(-1), x, self.pad_token.to(x.dtype))
        return self.encoder(x, batch.valid)

    def embed_cells(self, batch: TokenBatch, pooling: str = "max") -> torch.Tensor:
        """Cell embeddings ``(B, width)``: encoder outputs pooled over each cell's tokens.

        ``"max"`` (the paper's, appendix 4, 8.1) and ``"mean"`` pool over every real token, depth
        tokens included (``width = d``). ``"all"`` (models with depth tokens, the authors'
        default) concatenates the outputs at S and at T with the max and the mean over the gene
        tokens only (``width = 4 d``); every cell must then hold both depth tokens.
        """
        check_pooling(pooling, self.config)
        h = self.encode(batch)  # (B, L, d)
        valid = batch.valid.unsqueeze(-1)  # (B, L, 1)
        if pooling == "max":
            return h.masked_fill(~valid, float("-inf")).amax(1)
        if pooling == "mean":
            return _mean_over(h, batch.valid)
        n = self.config.n_genes
        gene = (batch.valid & (batch.genes < n)).unsqueeze(-1)
        at_t, at_s = batch.valid & (batch.genes == n), batch.valid & (batch.genes == n + 1)
        if not bool(at_t.any(1).all() and at_s.any(1).all()):
            raise ValueError("pooling='all' needs both depth tokens (T and S > 0) in every cell.")
        pick = lambda at: (h * at.unsqueeze(-1)).sum(1)  # noqa: E731  the one token at `at`
        gmax = h.masked_fill(~gene, float("-inf")).amax(1)
        gmean = _mean_over(h, gene.squeeze(-1))
        return torch.cat([pick(at_s), pick(at_t), gmax, gmean], dim=-1)

    def _zero_weights(self, zero: torch.Tensor) -> torch.Tensor | None:
        """Key weights ``(B, N)`` of the decoder tokens given which are unexpressed, unmasked genes
        (``zero``, ``(B, N)`` bool): ``decoder_zero_mass`` shared among those, 1 elsewhere;
        ``None`` without a zero mass."""
        mass = self.config.decoder_zero_mass
        if mass is None:
            return None
        n = zero.sum(1, keepdim=True).clamp(min=1)
        return torch.where(zero, mass / n, torch.ones((), device=zero.device))

    def _decoder_states(self, x: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, enc_dim)`` decoder input -> ``(B, N, dec_dim)`` outputs before the ``d -> 1`` head;
        ``zero``: ``(B, N)`` bool, the tokens of unexpressed, unmasked genes (for ``decoder_zero_mass``)."""
        h = self.decoder(self.decoder_proj(x), None if zero is None else self._zero_weights(zero))
        if self.out_norm is not None:
            h = self.out_norm(h)
        return h

    def _decode(self, x: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, enc_dim)`` decoder input -> ``(B, N)`` predicted values."""
        return self.head(self._decoder_states(x, zero)).squeeze(-1)

    def _check_inputs(self, inputs: torch.Tensor) -> None:
        n_pos, n = self.config.n_positions, self.config.n_genes
        if inputs.shape[1] != n_pos:
            raise ValueError(f"inputs have {inputs.shape[1]} columns; this model takes {n_pos} (genes{' + T + S' if n_pos > n else ''}).")

    def _encode_visible(self, inputs: torch.Tensor, is_mask: torch.Tensor):
        """Encoder outputs ``(B, L, enc_dim)`` over each cell's visible (non-zero, unmasked) positions,
        with the token batch, the ``(rows, cols, pos)`` index of those positions and the ``(B, n_positions)``
        visible mask."""
        visible = (inputs != 0) & ~is_mask
        tokens, index = select_tokens(visible, inputs, grid=on_grid(inputs.device))
        return self.encode(tokens), tokens, index, visible

    def pooled_visible(self, inputs: torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the encoder outputs over each cell's visible tokens, ``(B, enc_dim)``: the cell
        embedding of a corrupted cell (``"mean"`` pooling), encoder only. The same as the cells
        ``forward(..., return_cells=True)`` returns, without the decoder (a second view of the
        cell for a contrastive training term)."""
        self._check_inputs(inputs)
        h, tokens, _, _ = self._encode_visible(inputs, is_mask)
        return _mean_over(h, tokens.valid)

    def _decoder_input(self, inputs: torch.Tensor, is_mask: torch.Tensor,
                       pool: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Full-length decoder input ``(B, n_positions, enc_dim)``, the encoder tokens ``(B, n_positions)``
        and, with ``pool``, the mean of the encoder outputs per cell (``"mean"`` pooling of the
        visible tokens, ``(B, enc_dim)``; else ``None``).

        Encoder outputs at the visible non-zero positions, the [MASK] vector at masked ones,
        the value embedding of 0 elsewhere; plus the gene embedding at every position.
        """
        h, tokens, (rows, cols, pos), visible = self._encode_visible(inputs, is_mask)
        cells = _mean_over(h, tokens.valid) if pool else None
        zero = self.value_embedding(torch.zeros((), device=inputs.device, dtype=inputs.dtype))
        dec_in = torch.where(is_mask.unsqueeze(-1), self.mask_token.to(h.dtype), zero.to(h.dtype))
        dec_in = dec_in.index_put((rows, cols), h[rows, pos])
        return dec_in + self.gene_embedding.weight[: inputs.shape[1]].to(h.dtype), visible, cells

    def gene_context(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gene-context embeddings and predicted expression of unmasked cells (nothing is masked).

        The encoder runs over each cell's non-zero values (depth tokens T and S included when
        positive); the decoder over all positions, its input being the encoder outputs at
        those and the value embedding of 0 elsewhere, plus the gene embedding
        (``docs/scfoundation.md``, "Gene-context embeddings"; paper section 3.2, 5.4.2). Every
        cell's outputs depend on that cell only (the Performer's key maximum is taken per cell,
        or per cell and head).

        Parameters
        ----------
        inputs
            ``(B, n_positions)`` float log1p CP10k values; with depth tokens the last two
            columns are T and S (non-positive: no token).

        Returns
        -------
        states
            ``(B, n_genes, dec_dim)``: the decoder's output at each gene after its final
            LayerNorm(s), before the ``d -> 1`` head (depth positions dropped).
        prediction
            ``(B, n_genes)``: the head's output, on the log1p CP10k scale.
        """
        self._check_inputs(inputs)
        dec_in, visible, _ = self._decoder_input(inputs, torch.zeros_like(inputs, dtype=torch.bool))
        h = self._decoder_states(dec_in, ~visible)[:, : self.config.n_genes]
        return h, self.head(h).squeeze(-1)

    # ---- full model ---------------------------------------------------------------------
    def forward(
        self,
        inputs: torch.Tensor,
        is_mask: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        decoder_zeros: int | None = None,
        generator: torch.Generator | None = None,
        zero_scores: torch.Tensor | None = None,
        return_cells: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict gene values from a corrupted batch.

        Parameters
        ----------
        inputs
            ``(B, n_positions)`` float log1p CP10k values as the model may see them (masked
            positions are ignored); with depth tokens the last two columns are T and S.
        is_mask
            ``(B, n_positions)`` bool, positions replaced by [MASK].
        keep
            ``(B, n_positions)`` bool, positions whose prediction is needed (the loss targets);
            only used with ``decoder_zeros``.
        decoder_zeros
            ``None`` (default, the paper): the decoder runs over all genes. An int ``z``: the
            decoder runs over each cell's visible, masked and ``keep`` genes plus ``z``
            unexpressed genes drawn at random (padded to one length per batch with more random
            unexpressed genes), a cheaper training-time approximation of the full-length
            context. Predictions outside the decoded genes are 0.
        generator
            Seeded generator for the ``decoder_zeros`` draw.
        zero_scores
            ``(B, n_positions)`` uniforms to use for that draw instead of ``generator`` (the
            lowest scores win), e.g. per-cell keyed hashes so that the draw does not depend on
            which process or micro-batch holds the cell.
        return_cells
            Also return the mean of the encoder outputs over each cell's visible tokens
            (``(B, enc_dim)``, ``"mean"`` pooling of the corrupted cell), for a cell-level
            training term (:class:`~scxtrimo.models.CellExpressionHead`).

        Returns
        -------
        ``(B, n_genes)`` float predictions (depth positions are not predicted); with
        ``return_cells``, the tuple ``(predictions, cells)``.
        """
        self._check_inputs(inputs)
        n = self.config.n_genes
        dec_in, visible, cells = self._decoder_input(inputs, is_mask, pool=return_cells)
        pred = self._predict(dec_in, inputs, is_mask, visible, keep, decoder_zeros, generator, zero_scores)[:, :n]
        return (pred, cells) if return_cells else pred

    def _predict(self, dec_in, inputs, is_mask, visible, keep, decoder_zeros, generator, zero_scores) -> torch.Tensor:
        """Decoder predictions ``(B, n_positions)``: all positions, or the ``decoder_zeros`` subset (others 0)."""
        zero = ~(visible | is_mask)  # unexpressed, unmasked genes (for decoder_zero_mass)
        if decoder_zeros is None:
            return self._decode(dec_in, zero)
        must = ~zero if keep is None else ~zero | keep
        width = min(inputs.shape[1], int(must.sum(1).max()) + int(decoder_zeros))
        if zero_scores is None:
            zero_scores = torch.rand(inputs.shape, generator=generator, device=inputs.device)
        score = zero_scores.masked_fill(must, -1.0)
        idx = score.topk(width, dim=1, largest=False).indices.sort(dim=1).values
        sub = dec_in.gather(1, idx.unsqueeze(-1).expand(-1, -1, dec_in.shape[-1]))
        pred = self._decode(sub, zero.gather(1, idx))
        return torch.zeros(inputs.shape, dtype=pred.dtype, device=pred.device).scatter(1, idx, pred)
