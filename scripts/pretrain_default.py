"""Train the bundled default checkpoint: xtrimo-3m on every shared data set.

Usage (from the repository root)::

    python scripts/pretrain_default.py --data ../shared/data --out runs/xtrimo-3m --max-minutes 85

Every ``.h5ad`` under ``--data`` is used; cells with <= 200 expressed reference genes are
dropped by :func:`scxtrimo.tl.pretrain`. The run's history is written next to the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import scxtrimo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="runs/xtrimo-3m")
    ap.add_argument("--max-minutes", type=float, default=85)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-cells", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoder-zeros", type=int, default=None, help="decoder over expressed/masked genes + this many random zeros (default: all genes)")
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args()

    files = sorted(str(p) for p in Path(args.data).glob("*/*.h5ad"))
    print(f"{len(files)} files:", *files, sep="\n  ")
    model, history = scxtrimo.tl.pretrain(
        files,
        config="xtrimo-3m",
        epochs=10,
        max_time=args.max_minutes * 60,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        decoder_zeros=args.decoder_zeros,
        streaming=False,  # ~25,000 cells fit in memory; every test cell is scored at the end
        eval_every=args.eval_every,
        eval_cells=args.eval_cells,
        random_state=args.seed,
        save_dir=args.out,
    )
    out = Path(args.out)
    history.to_csv(out / "history.csv", index=False)
    info = dict(model.metadata, files=[Path(f).name for f in files], torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(), args=vars(args))
    (out / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(history.to_string())
    print(json.dumps(info, indent=2, default=str))


if __name__ == "__main__":
    main()
