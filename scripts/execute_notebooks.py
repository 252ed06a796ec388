"""Execute the tutorials in place so they are committed with outputs (run on CPU).

    python scripts/execute_notebooks.py [docs/notebooks/02_pretrain.ipynb ...]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

REPO = Path(__file__).resolve().parents[1]


def main(paths: list[str]) -> None:
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures become PNG outputs
    targets = [Path(p) for p in paths] or sorted((REPO / "docs" / "notebooks").glob("*.ipynb"))
    for path in targets:
        nb = nbformat.read(path, as_version=4)
        t = time.perf_counter()
        nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
        nb.metadata.setdefault("scxtrimo", {})["executed_on"] = "2-core CPU, no GPU"
        nbformat.write(nb, path)
        print(f"{path.name}: executed in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
