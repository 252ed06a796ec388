"""Publish a pretraining run as the bundled default checkpoint, with its model card.

    python scripts/publish_default.py runs/xtrimo-3m

Saves the run's model as float16 into ``src/scxtrimo/models/checkpoints/xtrimo-3m/``, writes
its sha256 into the bundled registry (``models/_io.py``), measures pbmc3k clustering next to
the PCA baseline and masked-value recovery, and writes ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import scxtrimo
from scxtrimo.models import _io
from scxtrimo.pl._recovery import masked_recovery
from scxtrimo.tl._clustering import pca_baseline

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / "src" / "scxtrimo" / "models" / "checkpoints" / "xtrimo-3m"


def main(run: str) -> None:
    run = Path(run)
    info = json.loads((run / "run.json").read_text())
    history = pd.read_csv(run / "history.csv")
    model = scxtrimo.models.load(run)
    folder = model.save(DEST, dtype=torch.float16, metadata=model.metadata)
    digest = _io.sha256_file(folder / "model.safetensors")
    src = (REPO / "src/scxtrimo/models/_io.py").read_text()
    src = re.sub(r'"xtrimo-3m": (None|"[0-9a-f]{64}"),.*', f'"xtrimo-3m": "{digest}",', src)
    (REPO / "src/scxtrimo/models/_io.py").write_text(src)
    _io.BUNDLED["xtrimo-3m"] = digest
    bundled = scxtrimo.models.load("xtrimo-3m")

    adata = scxtrimo.datasets.pbmc3k()
    t = time.perf_counter()
    scxtrimo.tl.embed(adata, model=bundled, progress=False)
    rate = adata.n_obs / (time.perf_counter() - t)
    torch.manual_seed(0)
    scxtrimo.tl.embed(adata, model=scxtrimo.models.XTrimoGene("xtrimo-3m"), key_added="X_random", progress=False)
    xt = scxtrimo.tl.evaluate_clustering(adata, labels_key="cell_type", use_rep="X_xtrimo")
    rnd = scxtrimo.tl.evaluate_clustering(adata, labels_key="cell_type", use_rep="X_random")
    pc = scxtrimo.tl.evaluate_clustering(pca_baseline(adata), labels_key="cell_type", use_rep="X_pca")
    rec = masked_recovery(bundled, adata, n_cells=128)

    md = info
    rows = "\n".join(
        f"| {name} | {s['ari']:.3f} | {s['nmi']:.3f} | {s['homogeneity']:.3f} | {s['completeness']:.3f} | {s['silhouette']:.3f} |"
        for name, s in (("xtrimo-3m (this checkpoint)", xt), ("same architecture, random weights", rnd), ("PCA of 2,000 HVGs (scanpy)", pc))
    )
    curve = "\n".join(
        f"| {int(r.step)} | {int(r.cells_seen):,} | {r.elapsed_s / 60:.1f} | {r.train_mse:.4f} | {r.val_mse:.4f} | {r.val_pearson:.3f} |"
        for r in history.itertuples()
    )
    sparsity = "\n".join(f"| {100 * lo:.1f}-{100 * hi:.1f}% | {r:.3f} | {n:,} |" for lo, hi, r, n in rec["by_sparsity"])
    card = f"""# Model card: xtrimo-3m (bundled default)

The default checkpoint of scxtrimo, shipped inside the package (no download).

| | |
|---|---|
| architecture | xTrimoGene-3M (appendix Table 2): encoder 4 layers / 2 heads / 128 wide (full attention over expressed genes), Performer decoder 2 / 2 / 128 over all 19,264 genes; feed-forward 2x width; 32 random features; 100 auto-discretization bins |
| parameters | {bundled.n_parameters():,} (gene embedding 19,264 x 128 included) |
| file | `model.safetensors`, float16, {(folder / 'model.safetensors').stat().st_size / 2**20:.1f} MiB, sha256 `{digest}` |
| data | every `.h5ad` in the project's shared data folder: {', '.join(f.replace('.h5ad', '') for f in md['files'])} |
| cells | {md['cells']:,} with more than 200 expressed reference genes (appendix 1 QC); split 96:2:2 = {md['split']['train']:,} / {md['split']['validation']:,} / {md['split']['test']:,} (seed 0) |
| training | `scripts/pretrain_default.py`: `tl.pretrain`, batch {md['batch_size']}, AdamW lr {md['lr']:g} ({md['args']['warmup']} warm-up steps, cosine to 10%), no weight decay, clipping 1.0, masking 30% of expressed genes + 0.9x as many zeros, 80/10/10; decoder context during training: each cell's expressed, masked and target genes plus {md['args']['decoder_zeros']} random unexpressed genes (`decoder_zeros`) |
| steps | {md['steps']:,} ({md['cells_seen']:,} cells seen, {md['cells_seen'] / md['split']['train']:.2f} epochs) |
| wall time | {md['wall_time_s'] / 60:.0f} min |
| hardware | CPU only: {md['threads']} threads of an AMD EPYC (AVX2), fp32, torch {md['torch']} |
| final validation | masked-value MSE {md['val_mse']:.4f}, Pearson r {md['val_pearson']:.3f} (log1p CP10k) |
| test split | masked-value MSE {md['test']['mse']:.4f}, Pearson r {md['test']['pearson']:.3f} ({md['test']['n_targets']:,} masked positions) |

How this differs from the paper, and why: the whole run had to fit about 45 minutes of a 2-core
CPU. The learning rate is {md['lr']:g}, not 1e-4, because a few hundred steps at 1e-4 barely move a
fresh model. The decoder saw a sampled gene context (`decoder_zeros`) instead of all 19,264 genes:
a first run with the full-length decoder managed about one cell per second, and after 200 steps
its embedding clustered no better than random weights. The encoder, which alone produces the
embeddings, is exactly the paper's, and the checkpoint runs the full-length decoder like any other.

## Cell clustering on pbmc3k

Leiden at the resolution that gives the 8 labelled types (paper appendix 4; `tl.evaluate_clustering`).
pbmc3k is part of the pretraining data (self-supervised: labels were not used).

| embedding | ARI | NMI | homogeneity | completeness | silhouette |
|---|---|---|---|---|---|
{rows}

The paper's PBMC ablation reached ARI 0.777 with a model pretrained on 5 million cells; this
checkpoint saw {md['cells_seen']:,}.

## Masked-value recovery on pbmc3k (paper section 5.3, Fig. 3A analogue)

Pearson r between predicted and true values at masked expressed genes, 128 cells, grouped by the
cell's share of zero genes: overall r = {rec['pearson']:.3f}. This runs the decoder over all 19,264
genes; training used the sampled context, which is why the test-split r above (sampled context,
as in training) is higher.

| cell sparsity | Pearson r | masked values |
|---|---|---|
{sparsity}

## Training curve

| step | cells seen | minutes | train MSE | validation MSE | validation Pearson r |
|---|---|---|---|---|---|
{curve}

Embedding speed of this checkpoint on the same CPU: {rate:.0f} pbmc3k cells/s (`tl.embed`, 2 threads).

## Intended use and limits

A small, briefly trained model for trying scxtrimo offline and for tests. It has seen
peripheral blood cells and five lung cancer cell lines only, and far fewer cells than the
paper's models. Use a larger checkpoint for research results.
"""
    (folder / "MODEL_CARD.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/xtrimo-3m")
