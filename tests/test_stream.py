"""Streaming .h5ad corpora for pretraining (issue 4, "Data at scale")."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scxtrimo
from scxtrimo.data._stream import H5adCorpus, StreamBatches, split_labels


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory, pbmc3k_session):
    """Two .h5ad files of real pbmc3k counts; 6 cells of the first cut to 50 expressed genes."""
    folder = tmp_path_factory.mktemp("stream")
    a = pbmc3k_session[:90].copy()
    X = a.X.tocsr().astype(np.float32)
    for i in range(0, 12, 2):  # low-quality cells: keep only their first 50 stored genes
        lo, hi = X.indptr[i], X.indptr[i + 1]
        X.data[lo + 50 : hi] = 0
    X.eliminate_zeros()
    a.X = X
    b = pbmc3k_session[90:200].copy()
    paths = [folder / "first.h5ad", folder / "second.h5ad"]
    a.write_h5ad(paths[0])
    b.write_h5ad(paths[1])
    return paths


def _qc_passing(paths, min_genes=201):
    out = set()
    for f, p in enumerate(paths):
        adata = scxtrimo.pp.align_genes(ad.read_h5ad(p))
        n = np.diff(sp.csr_matrix(adata.X).indptr)
        out |= {(f, int(r)) for r in np.flatnonzero(n >= min_genes)}
    return out


def _parts(corpus):
    got = {}
    for part in ("train", "validation", "test"):
        for block in corpus.iter_part(part, shuffle=False):
            got.update({(int(f), int(r)): part for f, r in block.ids})
    return got


def test_stream_yields_every_qc_passing_cell_once_per_epoch(corpus_files):
    expected = _qc_passing(corpus_files)
    corpus = H5adCorpus(corpus_files, block_cells=16)
    try:
        parts = _parts(corpus)
        assert set(parts) == expected and len(expected) < 200  # the cut cells are gone
        train = {k for k, v in parts.items() if v == "train"}
        for epoch in (0, 1):
            seen = [tuple(i) for block in corpus.iter_part("train", epoch=epoch) for i in block.ids]
            assert len(seen) == len(set(seen)) and set(seen) == train
        first = [tuple(i) for block in corpus.iter_part("train", epoch=0) for i in block.ids]
        second = [tuple(i) for block in corpus.iter_part("train", epoch=1) for i in block.ids]
        assert first != second  # reshuffled each epoch
        # the batches of one epoch: every training cell at most once, fewer than a batch left out
        batches = StreamBatches(corpus, batch_size=8, random_state=0)
        used = []
        while batches.epoch == 0:
            X, ids = batches.next_batch()
            assert X.shape == (8, 19264)
            if batches.epoch == 0:
                used += [tuple(i) for i in ids]
        assert len(used) == len(set(used)) and set(used) <= train and len(train) - len(used) < 8
    finally:
        corpus.close()


def test_stream_split_is_deterministic_and_independent_of_blocks(corpus_files):
    corpora = [H5adCorpus(corpus_files, block_cells=b) for b in (16, 16, 50, 1000)]
    try:
        parts = [_parts(c) for c in corpora]
        assert parts[0] == parts[1] == parts[2] == parts[3]
        assert set(parts[0].values()) >= {"train"}
        other = H5adCorpus(corpus_files, block_cells=16, random_state=1)
        assert _parts(other) != parts[0]
        other.close()
    finally:
        for c in corpora:
            c.close()
    # the hash is of (file base name, obs_name): folders and list order do not matter
    names = [f"cell{i}" for i in range(20_000)]
    lab = split_labels("/x/first.h5ad", names, 0)
    assert np.array_equal(lab, split_labels("first.h5ad", names, 0))
    share = np.bincount(lab, minlength=3) / lab.size
    np.testing.assert_allclose(share, [0.96, 0.02, 0.02], atol=0.005)


def test_stream_memory_is_bounded_by_a_block(corpus_files):
    corpus = H5adCorpus(corpus_files, block_cells=16)
    try:
        batches = StreamBatches(corpus, batch_size=4, random_state=0)
        for _ in range(60):  # more than an epoch
            batches.next_batch()
        assert batches.epoch >= 1
        assert 16 <= corpus.peak_cells <= 16 + 4 - 1
        counts, val, test = corpus.scan(eval_cells=3)
        assert len(val) <= 3 and len(test) <= 3
        assert corpus.peak_cells <= 16 + 4 - 1 + 6
        assert counts["cells"] == counts["train"] + counts["validation"] + counts["test"]
    finally:
        corpus.close()


def test_stream_position_restores_the_same_batches(corpus_files):
    corpus = H5adCorpus(corpus_files, block_cells=16)
    try:
        a = StreamBatches(corpus, batch_size=5, random_state=3)
        for _ in range(7):
            a.next_batch()
        state = a.state_dict()
        assert state["leftover_in"]  # a block boundary carried cells over: they are restored too
        expect = [a.next_batch()[1] for _ in range(30)]
        b = StreamBatches(corpus, batch_size=5, random_state=3)
        b.load_state_dict(state)
        got = [b.next_batch()[1] for _ in range(30)]
        assert all(np.array_equal(x, y) for x, y in zip(expect, got))
    finally:
        corpus.close()


def test_pretrain_streams_h5ad_paths(corpus_files, tiny_config):
    model, history = scxtrimo.tl.pretrain([str(p) for p in corpus_files], config=tiny_config, max_steps=2,
                                          batch_size=4, eval_every=0, eval_cells=4, block_cells=32, progress=False)
    corpus = H5adCorpus(corpus_files, block_cells=32)
    counts = corpus.scan()[0]
    corpus.close()
    assert model.metadata["cells"] == counts["cells"]
    assert model.metadata["split"] == {k: counts[k] for k in ("train", "validation", "test")}
    assert list(history["step"]) == [2] and np.isfinite(history["train_mse"]).all()


def test_pretrain_reads_the_named_layer(corpus_files, tmp_path, tiny_config):
    """layer=: counts moved into another layer (X zeroed) train exactly as the counts in X, streamed
    from files and in memory; a layer a file lacks is a KeyError naming the layers it has."""
    moved = []
    for p in corpus_files:
        a = ad.read_h5ad(p)
        a.layers["raw"], a.X = a.X.copy(), a.X * 0
        moved.append(tmp_path / p.name)
        a.write_h5ad(moved[-1])
    kw = dict(config=tiny_config, max_steps=1, batch_size=4, eval_every=0, eval_cells=4, progress=False)
    _, plain = scxtrimo.tl.pretrain([str(p) for p in corpus_files], block_cells=32, **kw)
    _, layered = scxtrimo.tl.pretrain([str(p) for p in moved], block_cells=32, layer="raw", **kw)
    np.testing.assert_allclose(layered["train_mse"], plain["train_mse"], rtol=1e-6)
    memory = ad.read_h5ad(moved[1])
    _, plain = scxtrimo.tl.pretrain(ad.read_h5ad(corpus_files[1]), **kw)
    _, layered = scxtrimo.tl.pretrain(memory, layer="raw", **kw)
    np.testing.assert_allclose(layered["train_mse"], plain["train_mse"], rtol=1e-6)
    with pytest.raises(KeyError, match=r"layer='spliced' is not in adata.layers .*'raw'"):
        scxtrimo.tl.pretrain(memory, layer="spliced", **kw)
    # use_raw=True: the counts kept in raw (X zeroed), streamed and in memory
    in_raw = []
    for p in corpus_files:
        a = ad.read_h5ad(p)
        a.raw = a.copy()
        a.X = a.X * 0
        in_raw.append(tmp_path / "in_raw" / p.name)  # the same file name: the split hashes it
        in_raw[-1].parent.mkdir(exist_ok=True)
        a.write_h5ad(in_raw[-1])
    _, plain = scxtrimo.tl.pretrain([str(p) for p in corpus_files], block_cells=32, **kw)
    _, raw = scxtrimo.tl.pretrain([str(p) for p in in_raw], block_cells=32, use_raw=True, **kw)
    np.testing.assert_allclose(raw["train_mse"], plain["train_mse"], rtol=1e-6)
    _, plain = scxtrimo.tl.pretrain(ad.read_h5ad(corpus_files[1]), **kw)
    _, raw = scxtrimo.tl.pretrain(ad.read_h5ad(in_raw[1]), use_raw=True, **kw)
    np.testing.assert_allclose(raw["train_mse"], plain["train_mse"], rtol=1e-6)
