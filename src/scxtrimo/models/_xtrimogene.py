"""The xTrimoGene module: asymmetric encoder-decoder over sparse expression (paper section 3)."""

from __future__ import annotations

import torch
from torch import nn

from ..data._batching import TokenBatch, select_tokens
from ._autobin import AutoDiscretization
from ._config import XTrimoGeneConfig, get_config
from ._decoder import Decoder
from ._encoder import Encoder

POOLINGS = ("max", "mean")


class XTrimoGene(nn.Module):
    """xTrimoGene (Gong et al., NeurIPS 2023).

    * Input embedding (section 3.3): auto-discretized value embedding ``E`` plus the learned gene
      embedding ``G`` (one row per reference gene). [MASK] and [PAD] are learned vectors.
    * Encoder (section 3.1): full attention over the unmasked expressed genes only.
    * Decoder (section 3.2): the encoder outputs at their genes, the [MASK] embedding at masked
      genes and the zero-value embedding elsewhere, plus gene embeddings, projected by ``W_p``
      to the decoder width and run through a Performer over all genes; a shared ``d -> 1``
      linear head predicts every gene's value.

    Embedding cells needs the encoder only (:meth:`embed_cells`).

    Parameters
    ----------
    config
        A :class:`XTrimoGeneConfig` or a configuration name (``"xtrimo-3m"``, ``"xtrimo-10m"``,
        ``"xtrimo-100m"``).
    """

    def __init__(self, config: XTrimoGeneConfig | str = "xtrimo-3m"):
        super().__init__()
        self.config = cfg = get_config(config)
        self.gene_embedding = nn.Embedding(cfg.n_genes, cfg.enc_dim)
        self.value_embedding = AutoDiscretization(cfg.n_bins, cfg.enc_dim, cfg.autobin_alpha)
        self.mask_token = nn.Parameter(torch.zeros(cfg.enc_dim))
        self.pad_token = nn.Parameter(torch.zeros(cfg.enc_dim))
        self.encoder = Encoder(cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.enc_ff_mult, cfg.dropout)
        self.decoder_proj = nn.Linear(cfg.enc_dim, cfg.dec_dim)
        self.decoder = Decoder(cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, cfg.dec_ff_mult, cfg.nb_features, cfg.dropout)
        self.head = nn.Linear(cfg.dec_dim, 1)
        self.reset_parameters()
        # provenance, filled in by scxtrimo.models.load / save
        self.checkpoint_name: str | None = None
        self.checkpoint_sha256: str | None = None
        self.metadata: dict = {}

    def save(self, path, *, dtype: torch.dtype = torch.float32, metadata: dict | None = None):
        """Write ``config.json``, ``model.safetensors`` and ``genes.txt`` into the folder ``path``.

        ``dtype=torch.float16`` halves the file; loading always returns float32 weights.
        See :func:`scxtrimo.models.load`.
        """
        from ._io import save

        return save(self, path, dtype=dtype, metadata=metadata)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gene_embedding.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pad_token, std=0.02)

    @property
    def embedding_dim(self) -> int:
        """Width ``d`` of the cell embedding (the encoder width)."""
        return self.config.enc_dim

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
        """Cell embeddings ``(B, enc_dim)``: encoder outputs pooled over each cell's genes.

        ``pooling="max"`` is the paper's (appendix 4, 8.1); ``"mean"`` averages instead.
        """
        h = self.encode(batch)
        valid = batch.valid.unsqueeze(-1)
        if pooling == "max":
            return h.masked_fill(~valid, float("-inf")).amax(1)
        if pooling == "mean":
            return (h * valid).sum(1) / valid.sum(1).clamp(min=1)
        raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")

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
    ) -> torch.Tensor:
        """Predict gene values from a corrupted batch.

        Parameters
        ----------
        inputs
            ``(B, n_genes)`` float log1p CP10k values as the model may see them (masked
            positions are ignored).
        is_mask
            ``(B, n_genes)`` bool, positions replaced by [MASK].
        keep
            ``(B, n_genes)`` bool, positions whose prediction is needed (the loss targets);
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
            ``(B, n_genes)`` uniforms to use for that draw instead of ``generator`` (the lowest
            scores win), e.g. per-cell keyed hashes so that the draw does not depend on which
            process or micro-batch holds the cell.

        Returns
        -------
        ``(B, n_genes)`` float predictions.
        """
        visible = (inputs != 0) & ~is_mask
        tokens, (rows, cols, pos) = select_tokens(visible, inputs)
        h = self.encode(tokens)
        zero = self.value_embedding(torch.zeros((), device=inputs.device, dtype=inputs.dtype))
        dec_in = torch.where(is_mask.unsqueeze(-1), self.mask_token.to(h.dtype), zero.to(h.dtype))
        dec_in = dec_in.index_put((rows, cols), h[rows, pos])
        dec_in = dec_in + self.gene_embedding.weight.to(h.dtype)
        if decoder_zeros is None:
            return self.head(self.decoder(self.decoder_proj(dec_in))).squeeze(-1)
        must = visible | is_mask
        if keep is not None:
            must = must | keep
        width = min(inputs.shape[1], int(must.sum(1).max()) + int(decoder_zeros))
        if zero_scores is None:
            zero_scores = torch.rand(inputs.shape, generator=generator, device=inputs.device)
        score = zero_scores.masked_fill(must, -1.0)
        idx = score.topk(width, dim=1, largest=False).indices.sort(dim=1).values
        sub = dec_in.gather(1, idx.unsqueeze(-1).expand(-1, -1, dec_in.shape[-1]))
        pred = self.head(self.decoder(self.decoder_proj(sub))).squeeze(-1)
        return torch.zeros(inputs.shape, dtype=pred.dtype, device=pred.device).scatter(1, idx, pred)
