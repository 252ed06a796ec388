import anndata as ad
import mudata as md
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scxtrimo
from scxtrimo.models import XTrimoGene


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return XTrimoGene("xtrimo-3m").eval()


@pytest.fixture
def small(pbmc3k):
    return pbmc3k[:120].copy()


def test_writes_obsm_and_params_without_touching_x(small, model):
    X0 = small.X.copy()
    assert scxtrimo.tl.embed(small, model=model, progress=False) is None
    emb = small.obsm["X_xtrimo"]
    assert emb.shape == (120, 128) and emb.dtype == np.float32 and np.isfinite(emb).all()
    params = small.uns["xtrimo"]["params"]
    assert params["n_genes_matched"] == 11_213 and params["pooling"] == "max" and params["input"] == "counts"
    assert params["scxtrimo_version"] == scxtrimo.__version__ and params["source"] == "X"
    assert (small.X != X0).nnz == 0 and small.n_vars == 13_714


def test_params_name_the_matrix_that_was_read(small, model):
    layered = small.copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = layered.X * 0  # X no longer holds the counts: the counts layer is what is read
    scxtrimo.tl.embed(layered, model=model, progress=False)
    scxtrimo.tl.embed(small, model=model, progress=False)
    assert layered.uns["xtrimo"]["params"]["source"] == "layers['counts']"
    np.testing.assert_allclose(layered.obsm["X_xtrimo"], small.obsm["X_xtrimo"], atol=1e-5)


def test_layer_names_the_matrix_to_read(small, model):
    """layer=: the counts wherever they are (scanpy's layer=), X holding log1p values; an unknown
    layer is a KeyError naming the layers there are, with nothing written."""
    import scanpy as sc

    cells = small[:40].copy()
    scxtrimo.tl.embed(cells, model=model, progress=False)
    user = cells.copy()
    del user.obsm["X_xtrimo"], user.uns["xtrimo"]
    user.layers["raw"] = user.X.copy()
    user.layers["counts"] = user.X * 0  # a stale layer that the default would read
    sc.pp.normalize_total(user, target_sum=1e4)
    sc.pp.log1p(user)
    with pytest.raises(KeyError, match=r"layer='spliced' is not in adata.layers .*'raw'"):
        scxtrimo.tl.embed(user, model=model, layer="spliced", progress=False)
    with pytest.raises(KeyError, match="layer='spliced'"):
        scxtrimo.tl.gene_embed(user, model=model, genes="CD3E", layer="spliced", progress=False)
    assert "X_xtrimo" not in user.obsm and "xtrimo" not in user.uns
    scxtrimo.tl.embed(user, model=model, layer="raw", progress=False)
    assert user.uns["xtrimo"]["params"]["source"] == "layers['raw']"
    assert user.uns["xtrimo"]["params"]["input"] == "counts"
    np.testing.assert_allclose(user.obsm["X_xtrimo"], cells.obsm["X_xtrimo"], atol=1e-5)
    # bulk="normalized" reads X, or the named layer
    logged = user.copy()
    logged.layers["log"] = logged.X.copy()
    logged.X = logged.X * 0
    with pytest.warns(UserWarning, match="as single cells do"):
        scxtrimo.tl.embed(user, model=model, bulk="normalized", key_added="X_bulk", progress=False)
    with pytest.warns(UserWarning, match="as single cells do"):
        scxtrimo.tl.embed(logged, model=model, bulk="normalized", layer="log", key_added="X_bulk", progress=False)
    assert logged.uns["xtrimo"]["params"]["source"] == "layers['log']"
    np.testing.assert_allclose(logged.obsm["X_bulk"], user.obsm["X_bulk"], atol=1e-5)


def _counts_kept_in_raw(cells):
    """As CELLxGENE and scanpy pipelines leave it: the counts of every gene in ``raw``, ``X``
    log-normalized on 500 highly variable genes."""
    import scanpy as sc

    user = cells.copy()
    user.raw = user.copy()
    sc.pp.normalize_total(user, target_sum=1e4)
    sc.pp.log1p(user)
    sc.pp.highly_variable_genes(user, n_top_genes=500)
    return user[:, user.var["highly_variable"]].copy()


def test_use_raw_reads_the_counts_kept_in_raw(small, model):
    """use_raw=True (scanpy's use_raw=): raw.X with raw.var's genes gives the counts' embedding,
    where X (500 genes, log1p) would give another; reading X says that raw holds the counts;
    use_raw without raw, with layer, or not a bool fails before anything is written."""
    cells = small[:40].copy()
    scxtrimo.tl.embed(cells, model=model, progress=False)
    user = _counts_kept_in_raw(cells)
    with pytest.warns(UserWarning, match=r"adata\.raw holds raw counts: pass use_raw=True"):
        scxtrimo.tl.embed(user, model=model, key_added="X_from_x", progress=False)
    assert np.abs(user.obsm["X_from_x"] - cells.obsm["X_xtrimo"]).max() > 0.1  # 500 genes are not the cell
    scxtrimo.tl.embed(user, model=model, use_raw=True, progress=False)
    assert user.uns["xtrimo"]["params"]["source"] == "raw.X" and user.uns["xtrimo"]["params"]["input"] == "counts"
    assert user.uns["xtrimo"]["params"]["n_genes_matched"] == cells.uns["xtrimo"]["params"]["n_genes_matched"]
    np.testing.assert_allclose(user.obsm["X_xtrimo"], cells.obsm["X_xtrimo"], atol=1e-5)
    plain = cells.copy()
    del plain.obsm["X_xtrimo"], plain.uns["xtrimo"]
    for kwargs, error, message in [
        ({"use_raw": True}, ValueError, "use_raw=True, but adata.raw is None"),
        ({"use_raw": True, "layer": "counts"}, ValueError, "either layer='counts' or use_raw=True"),
        ({"use_raw": "yes"}, TypeError, "use_raw must be True or False"),
    ]:
        with pytest.raises(error, match=message):
            scxtrimo.tl.embed(plain, model=model, progress=False, **kwargs)
        with pytest.raises(error, match=message):
            scxtrimo.tl.gene_embed(plain, model=model, genes="CD3E", progress=False, **kwargs)
        with pytest.raises(error, match=message):
            scxtrimo.tl.annotate(plain, labels_key="cell_type", model=model, progress=False, **kwargs)
    assert not plain.obsm and "xtrimo" not in plain.uns and "xtrimo_label" not in plain.obs


def test_use_raw_reads_a_backed_file_and_the_hint_joins_errors(small, model, tmp_path):
    """A backed file's raw.X is streamed like X; X that cannot be read as counts (negative values)
    fails with the pointer to raw."""
    cells = small[:40].copy()
    scxtrimo.tl.embed(cells, model=model, progress=False)
    user = _counts_kept_in_raw(cells)
    user.write_h5ad(tmp_path / "raw.h5ad")
    backed = ad.read_h5ad(tmp_path / "raw.h5ad", backed="r")
    scxtrimo.tl.embed(backed, model=model, use_raw=True, progress=False)
    np.testing.assert_allclose(backed.obsm["X_xtrimo"], cells.obsm["X_xtrimo"], atol=1e-5)
    backed.file.close()
    scaled = user.copy()
    scaled.X = scaled.X.toarray() - 0.5
    with pytest.raises(ValueError, match=r"negative values.*adata\.raw holds raw counts: pass use_raw=True"):
        scxtrimo.tl.embed(scaled, model=model, progress=False)


def test_raw_counts_and_prepared_data_give_the_same_embedding(small, model):
    prepared = scxtrimo.pp.align_genes(small, copy=True)
    scxtrimo.pp.normalize(prepared)
    scxtrimo.tl.embed(small, model=model, progress=False)
    scxtrimo.tl.embed(prepared, model=model, progress=False)
    assert prepared.uns["xtrimo"]["params"]["input"] == "prepared"
    assert prepared.uns["xtrimo"]["params"]["source"] == "X"
    np.testing.assert_allclose(small.obsm["X_xtrimo"], prepared.obsm["X_xtrimo"], atol=1e-5)


def test_log_normalized_input_is_reverted(small, model):
    import scanpy as sc

    logged = small.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    scxtrimo.tl.embed(small, model=model, progress=False)
    with pytest.warns(UserWarning, match="log"):
        scxtrimo.tl.embed(logged, model=model, progress=False)
    np.testing.assert_allclose(small.obsm["X_xtrimo"], logged.obsm["X_xtrimo"], atol=1e-4)


def test_deterministic_and_batch_size_independent(small, model):
    a, b, c = small.copy(), small.copy(), small.copy()
    scxtrimo.tl.embed(a, model=model, progress=False)
    scxtrimo.tl.embed(b, model=model, progress=False)
    scxtrimo.tl.embed(c, model=model, progress=False, batch_size=5, max_tokens=2_000)
    np.testing.assert_array_equal(a.obsm["X_xtrimo"], b.obsm["X_xtrimo"])
    np.testing.assert_allclose(a.obsm["X_xtrimo"], c.obsm["X_xtrimo"], atol=1e-5)



def test_results_held_on_the_device_land_in_their_rows(small, model, monkeypatch):
    """On CUDA the results of several length batches wait on the device and come back in one
    copy; the same path on the CPU (forced) gives exactly the per-batch result."""
    from scxtrimo import _inference

    a = small.copy()
    scxtrimo.tl.embed(a, model=model, progress=False, batch_size=7, max_tokens=6_000)
    monkeypatch.setitem(_inference.PENDING_BATCHES, "cpu", 4)
    b = small.copy()
    scxtrimo.tl.embed(b, model=model, progress=False, batch_size=7, max_tokens=6_000)
    np.testing.assert_array_equal(a.obsm["X_xtrimo"], b.obsm["X_xtrimo"])
    X = scxtrimo.data._prepare.log1p_rows(scxtrimo.data._prepare.prepare_input(small), 0, small.n_obs)
    rows = np.random.default_rng(0).permutation(small.n_obs)[:50]
    kw = dict(width=1, max_cells=6, max_tokens=100_000)
    fn = lambda batch: batch.valid.sum(1, keepdim=True)  # noqa: E731  each cell's number of genes
    held = _inference.map_cells(fn, X, rows, torch.device("cpu"), pending=3, **kw)
    np.testing.assert_array_equal(held[:, 0], np.diff(X.indptr)[rows])
    np.testing.assert_array_equal(held, _inference.map_cells(fn, X, rows, torch.device("cpu"), pending=1, **kw))

def test_copy_key_added_and_mean_pooling(small, model):
    out = scxtrimo.tl.embed(small, model=model, progress=False, copy=True, key_added="X_mean", pooling="mean")
    assert "X_mean" in out.obsm and "X_mean" not in small.obsm and "xtrimo" not in small.uns
    scxtrimo.tl.embed(small, model=model, progress=False)
    assert not np.allclose(out.obsm["X_mean"], small.obsm["X_xtrimo"])


def test_mudata_rna_modality(small, model):
    mdata = md.MuData({"rna": small, "prot": ad.AnnData(np.ones((small.n_obs, 3), dtype=np.float32), obs=small.obs[[]])})
    scxtrimo.tl.embed(mdata, model=model, progress=False)
    assert mdata.mod["rna"].obsm["X_xtrimo"].shape == (120, 128)


def test_ensembl_ids_need_gene_symbols(small, model):
    ens = small.copy()
    ens.var["symbol"] = ens.var_names
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    with pytest.raises(ValueError, match="gene_symbols"):
        scxtrimo.tl.embed(ens, model=model, progress=False)
    assert "X_xtrimo" not in ens.obsm
    scxtrimo.tl.embed(ens, model=model, progress=False, gene_symbols="symbol")
    scxtrimo.tl.embed(small, model=model, progress=False)
    np.testing.assert_array_equal(ens.obsm["X_xtrimo"], small.obsm["X_xtrimo"])


def test_bad_input_fails_cleanly(small, model):
    bad = small.copy()
    bad.X.data[0] = -1.0
    with pytest.raises(ValueError, match="negative"):
        scxtrimo.tl.embed(bad, model=model, progress=False)
    assert "X_xtrimo" not in bad.obsm and "xtrimo" not in bad.uns

    empty = small.copy()
    keep = np.ones(empty.n_obs)
    keep[3] = 0
    X = (sp.diags(keep) @ empty.X).tocsr()
    X.eliminate_zeros()
    empty.X = X.astype(np.float32)
    with pytest.raises(ValueError, match="express none of the reference genes"):
        scxtrimo.tl.embed(empty, model=model, progress=False)
    assert "X_xtrimo" not in empty.obsm

    mouse = small.copy()
    mouse.var_names = [g.capitalize() for g in small.var_names]
    with pytest.raises(ValueError):
        scxtrimo.tl.embed(mouse, model=model, progress=False)

    with pytest.raises(ValueError, match="pooling"):
        scxtrimo.tl.embed(small, model=model, progress=False, pooling="cls")


def test_backed_h5ad(small, model, tmp_path):
    path = tmp_path / "small.h5ad"
    small.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    scxtrimo.tl.embed(backed, model=model, progress=False)
    scxtrimo.tl.embed(small, model=model, progress=False)
    np.testing.assert_array_equal(backed.obsm["X_xtrimo"], small.obsm["X_xtrimo"])
    backed.file.close()


def test_backed_dense_h5ad_streams_in_byte_bounded_blocks(small, model, tmp_path):
    """A dense on-disk matrix is read in blocks of at most 256 MB, never 10,000 wide rows at once."""
    from scxtrimo.data._prepare import DENSE_BLOCK_BYTES, prepare_input

    dense = small.copy()
    dense.X = dense.X.toarray()
    path = tmp_path / "dense.h5ad"
    dense.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    block = prepare_input(backed).block_cells()
    assert block == DENSE_BLOCK_BYTES // (4 * small.n_vars) and block * small.n_vars * 4 <= DENSE_BLOCK_BYTES
    assert prepare_input(small).block_cells() == 10_000  # sparse rows are cheap
    scxtrimo.tl.embed(backed, model=model, progress=False)
    scxtrimo.tl.embed(small, model=model, progress=False)
    np.testing.assert_array_equal(backed.obsm["X_xtrimo"], small.obsm["X_xtrimo"])
    backed.file.close()


def test_cellbench_deep_cells(cellbench, model):
    """The long-sequence case: CEL-seq2 cells with thousands of expressed genes."""
    deep = cellbench[cellbench.obs["batch"] == "sc_celseq2"][:12].copy()  # about 1 s per cell on a CPU core
    scxtrimo.tl.embed(deep, model=model, progress=False)
    assert deep.obsm["X_xtrimo"].shape == (12, 128) and np.isfinite(deep.obsm["X_xtrimo"]).all()
    assert deep.uns["xtrimo"]["params"]["n_genes_matched"] > 14_000


def test_default_pooling_is_the_checkpoints_choice(small, model):
    """pooling=None takes the checkpoint's metadata['pooling'] (max when it has none)."""
    import copy

    chosen = copy.deepcopy(model)
    chosen.metadata = {"pooling": "mean"}
    assert model.default_pooling == "max" and chosen.default_pooling == "mean"
    scxtrimo.tl.embed(small, model=chosen, progress=False)
    assert small.uns["xtrimo"]["params"]["pooling"] == "mean"
    scxtrimo.tl.embed(small, model=model, pooling="mean", key_added="X_mean", progress=False)
    np.testing.assert_array_equal(small.obsm["X_xtrimo"], small.obsm["X_mean"])
    chosen.metadata = {"pooling": "cls"}  # not a pooling: the paper's max
    assert chosen.default_pooling == "max"
