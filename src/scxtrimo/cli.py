"""Command line: ``scxtrimo embed IN.h5ad OUT.h5ad`` and ``scxtrimo demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _embed(args) -> int:
    import anndata as ad

    from . import tl

    adata = ad.read_h5ad(args.input)
    t = time.perf_counter()
    tl.embed(adata, model=args.model, batch_size=args.batch_size, device=args.device, pooling=args.pooling,
             key_added=args.key_added, gene_symbols=args.gene_symbols)
    dt = time.perf_counter() - t
    adata.write_h5ad(args.output, compression="gzip")
    print(f"embedded {adata.n_obs} cells into obsm[{args.key_added!r}] "
          f"({adata.obsm[args.key_added].shape[1]} dims) in {dt:.1f} s -> {args.output}")
    return 0


def _demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from . import datasets, pl, tl
    from .tl._clustering import pca_baseline

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adata = datasets.pbmc3k()
    print(f"pbmc3k: {adata.n_obs} cells x {adata.n_vars} genes, {adata.obs['cell_type'].nunique()} labelled types")
    t = time.perf_counter()
    tl.embed(adata, model=args.model, device=args.device, progress=not args.quiet)
    dt = time.perf_counter() - t
    params = adata.uns["xtrimo"]["params"]
    print(f"embedded with {params['model']} ({params['n_genes_matched']} reference genes matched) "
          f"in {dt:.1f} s: {adata.n_obs / dt:.0f} cells/s on {params['device']}")
    xs = tl.evaluate_clustering(adata, labels_key="cell_type", use_rep="X_xtrimo")
    base = pca_baseline(adata)
    ps = tl.evaluate_clustering(base, labels_key="cell_type", use_rep="X_pca")
    print("\nLeiden clustering at the number of labelled types (paper appendix 4):")
    print(f"{'embedding':<22}{'ARI':>7}{'NMI':>7}{'HOMO':>7}{'CP':>7}{'SIL':>7}")
    for name, s in (("xTrimoGene (X_xtrimo)", xs), ("PCA baseline (X_pca)", ps)):
        print(f"{name:<22}{s['ari']:7.3f}{s['nmi']:7.3f}{s['homogeneity']:7.3f}{s['completeness']:7.3f}{s['silhouette']:7.3f}")
    ax = pl.embedding(adata, color=["cell_type", "leiden_X_xtrimo"], show=False)
    fig = (ax[0] if isinstance(ax, list) else ax).figure
    png = out / "pbmc3k_xtrimo_umap.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"\nUMAP saved to {png}")
    if args.save_h5ad:
        adata.write_h5ad(out / "pbmc3k_xtrimo.h5ad", compression="gzip")
    sc.settings.verbosity = 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="scxtrimo", description="xTrimoGene cell embeddings for AnnData files.")
    p.add_argument("--version", action="version", version=f"scxtrimo {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("embed", help="embed the cells of an .h5ad file into obsm['X_xtrimo']")
    e.add_argument("input", help="input .h5ad: raw counts (or normalized) with gene symbols")
    e.add_argument("output", help="output .h5ad (the input plus the embedding)")
    e.add_argument("--model", default="xtrimo-3m", help="checkpoint name or folder (default: xtrimo-3m, bundled)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--pooling", default="max", choices=["max", "mean"])
    e.add_argument("--key-added", default="X_xtrimo")
    e.add_argument("--gene-symbols", default=None, help="var column with gene symbols if var_names are not symbols")
    e.set_defaults(func=_embed)

    d = sub.add_parser("demo", help="embed the bundled PBMC 3k, cluster, compare with PCA, save a UMAP")
    d.add_argument("--out-dir", default="scxtrimo_demo")
    d.add_argument("--model", default="xtrimo-3m")
    d.add_argument("--device", default="auto")
    d.add_argument("--save-h5ad", action="store_true", help="also write the embedded AnnData")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"scxtrimo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
