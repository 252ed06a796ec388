"""Sharded embedding under torchrun (gloo, 2 CPU processes) equals one process (issue 3).

Every rank builds the same length batches, embeds every second one and gathers the rest, so the
embedding must be the single process's, row for row.
"""

import subprocess
import sys

import anndata as ad
import numpy as np
from conftest import DEFAULT_CONFIG, free_port, one_thread, subprocess_env

import scxtrimo


def test_torchrun_embedding_equals_single_process(tmp_path):
    cells = scxtrimo.datasets.pbmc3k()[::22].copy()  # 120 cells spread over all types and depths
    src, dst = tmp_path / "cells.h5ad", tmp_path / "embedded.h5ad"
    cells.write_h5ad(src)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "scxtrimo.cli", "embed", str(src), str(dst), "--device", "cpu"]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    sharded = ad.read_h5ad(dst)

    with one_thread():
        scxtrimo.tl.embed(cells, device="cpu", progress=False)
    assert sharded.uns["xtrimo"]["params"]["world_size"] == 2
    assert cells.uns["xtrimo"]["params"]["world_size"] == 1
    assert list(sharded.obs_names) == list(cells.obs_names)
    E1, E2 = cells.obsm["X_xtrimo"], sharded.obsm["X_xtrimo"]
    assert E2.shape == (120, DEFAULT_CONFIG.enc_dim) and np.isfinite(E2).all()
    assert np.abs(E2).sum(1).min() > 0  # no row left unfilled by the gather
    diff = float(np.abs(E1 - E2).max())
    print(f"torchrun 2 x gloo vs 1 process: max |embedding diff| = {diff:.3g}")
    np.testing.assert_array_equal(E2, E1)
