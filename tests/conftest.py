"""Shared fixtures: the bundled pbmc3k and the real data sets in ``../shared/data``.

``SCXTRIMO_SHARED_DATA`` may point at another copy of the shared data folder; tests that need a
data set that is not there are skipped with the path they looked in.
"""

from __future__ import annotations

import contextlib

import os
from pathlib import Path

import anndata as ad
import pytest
import torch

import scxtrimo
from scxtrimo.models import _io

REPO = Path(__file__).resolve().parents[1]

#: The bundled default checkpoint's name and configuration (read from its ``config.json``, no
#: weights loaded), for tests that hold for whichever checkpoint is the default: its embedding
#: is ``DEFAULT_CONFIG.enc_dim`` wide, and it has depth tokens if ``DEFAULT_CONFIG.depth_tokens``.
DEFAULT = scxtrimo.models.DEFAULT_CHECKPOINT
DEFAULT_CONFIG = _io.read_config(_io.resolve(DEFAULT)[0] / _io.CONFIG_FILE)[0]


def shared_data_dir() -> Path:
    return Path(os.environ.get("SCXTRIMO_SHARED_DATA", REPO.parent / "shared" / "data"))


def read_shared(name: str) -> ad.AnnData:
    path = shared_data_dir() / name / f"{name}.h5ad"
    if not path.exists():
        pytest.skip(f"shared data set {name} not found at {path} (set SCXTRIMO_SHARED_DATA)")
    return ad.read_h5ad(path)


@pytest.fixture(scope="session")
def pbmc3k_session() -> ad.AnnData:
    return scxtrimo.datasets.pbmc3k()


@pytest.fixture
def pbmc3k(pbmc3k_session) -> ad.AnnData:
    """A fresh copy for each test (tests may mutate it)."""
    return pbmc3k_session.copy()


@pytest.fixture(scope="session")
def pbmc3k_embedded(pbmc3k_session) -> ad.AnnData:
    """pbmc3k (2,638 cells) embedded by ``tl.embed`` with its defaults: the bundled checkpoint,
    its default pooling, ``obsm['X_xtrimo']``. Embedded once per session (about a minute on two
    cores); copy it before changing it."""
    adata = pbmc3k_session.copy()
    scxtrimo.tl.embed(adata, progress=False)
    return adata


@pytest.fixture(scope="session")
def pbmc3k_sixth(pbmc3k_embedded) -> ad.AnnData:
    """Every sixth pbmc3k cell (440 cells, all 8 types) with two embeddings, both mean-pooled:
    ``obsm['X_xtrimo']``, the bundled checkpoint's (those rows of :func:`pbmc3k_embedded`), and
    ``obsm['X_random']``, the same architecture with random weights (``torch.manual_seed(0)``;
    also an untrained model's random gene embeddings). ``uns['xtrimo']['params']`` describes
    the random one, embedded last; ``uns['xtrimo']['params_by_key']`` both. Copy it before
    changing it."""
    from scxtrimo.models import XTrimoGene

    adata = pbmc3k_embedded[::6].copy()
    torch.manual_seed(0)
    random = XTrimoGene(DEFAULT_CONFIG)
    scxtrimo.tl.embed(adata, model=random, key_added="X_random", pooling="mean", progress=False)
    return adata


@pytest.fixture(scope="session")
def cellbench() -> ad.AnnData:
    return read_shared("cellbench_lung_celllines")


@pytest.fixture(scope="session")
def pbmc3k_prepared(pbmc3k_session) -> ad.AnnData:
    """pbmc3k aligned to the 19,264 reference genes and normalized to log1p CP10k."""
    out = scxtrimo.pp.align_genes(pbmc3k_session, copy=True)
    scxtrimo.pp.normalize(out)
    return out


@pytest.fixture(scope="session")
def tiny_config():
    """A small architecture for fast training tests (the real 19,264 genes, narrow layers)."""
    from scxtrimo.models import XTrimoGeneConfig

    return XTrimoGeneConfig(name="tiny", enc_depth=2, enc_heads=2, enc_dim=32, enc_ff_mult=2,
                            dec_depth=1, dec_heads=2, dec_dim=32, dec_ff_mult=2, nb_features=16)


@pytest.fixture(scope="session")
def pretrain_files(tmp_path_factory, pbmc3k_session) -> list[Path]:
    """Two .h5ad files of real pbmc3k counts (70 + 60 cells) for streamed-pretraining tests."""
    folder = tmp_path_factory.mktemp("pretrain_files")
    paths = [folder / "a.h5ad", folder / "b.h5ad"]
    pbmc3k_session[:70].copy().write_h5ad(paths[0])
    pbmc3k_session[70:130].copy().write_h5ad(paths[1])
    return paths


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    """Environment for child processes: one thread each (the machine is small), the repo's src."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread (bitwise-comparable runs across processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
