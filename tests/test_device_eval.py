"""benchmarks/device_eval.py: the embedding benchmark's cells as rows of the travelling corpus
(plus the pack's own counts), and the device's embeddings keyed as the benchmark's cache."""

import importlib.util

import numpy as np
import pytest

from scxtrimo.data._corpus import load_corpus, pack_corpus
from scxtrimo.data._prepare import counts_rows, prepare_input
from scxtrimo.models import XTrimoGene, load

from conftest import REPO


@pytest.fixture(scope="module")
def device_eval():
    spec = importlib.util.spec_from_file_location("device_eval", REPO / "benchmarks" / "device_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def corpus_path(pbmc3k, tmp_path):
    """A corpus of pbmc3k's first 60 cells."""
    src = tmp_path / "pbmc3k.h5ad"
    pbmc3k[:60].write_h5ad(src)
    pack_corpus([src], tmp_path / "c.xtc", min_genes=1, progress=False)
    return tmp_path / "c.xtc"


def test_pack_rebuilds_the_cells_in_their_order_from_corpus_rows_and_its_own_counts(device_eval, pbmc3k,
                                                                                      corpus_path, tmp_path):
    counts = counts_rows(prepare_input(pbmc3k), 0, pbmc3k.n_obs)
    pick = [55, 100, 3, 51, 104, 59]  # in the corpus, not, in it but changed below, in, not, in
    C = counts[pick].tocsr(copy=True)
    C.sort_indices()
    C.data[C.indptr[2]] += 1  # the corpus's cell 3 no longer: its counts travel in the pack
    names = np.asarray(pbmc3k.obs_names[pick], dtype=str)
    out = tmp_path / "sets.npz"
    assert device_eval.write_pack(out, load_corpus(corpus_path), corpus_path, {"s": (C, names, "pbmc3k"), "t": (C[:1], names[:1], "other")}) \
        == {"s": 3, "t": 1}
    packed = device_eval.eval_sets(out, load_corpus(corpus_path), corpus_path)
    assert packed.sources == ["s", "t"]
    rows = packed.rows(source="s")
    assert list(packed.obs_names[rows]) == list(names)
    assert (packed.counts[rows] != C).nnz == 0
    np.testing.assert_array_equal(packed.total[rows], np.asarray(C.sum(axis=1)).ravel())
    # log1p CP10k with T = S, as the benchmark's input path writes it for counts
    X = packed.model_input(rows, depth=(0.0, "offset"))
    tot = np.asarray(C.sum(axis=1)).ravel()
    np.testing.assert_allclose(X[:, -1].toarray().ravel(), np.log10(tot), rtol=1e-6)
    np.testing.assert_allclose(X[:, :-2].toarray(), np.log1p(C.toarray() / tot[:, None] * 1e4), rtol=1e-5)
    assert (packed.counts[packed.rows(source="t")] != C[:1]).nnz == 0
    # a pack names the corpus it was written against
    pack_corpus([tmp_path / "pbmc3k.h5ad"], corpus_path, min_genes=100, progress=False)
    with pytest.raises(ValueError, match="another corpus"):
        device_eval.eval_sets(out, load_corpus(corpus_path), corpus_path)


def test_unpack_writes_the_benchmark_cache_keys_of_the_right_checkpoint_only(device_eval, tiny_config, tmp_path):
    folder = XTrimoGene(tiny_config).save(tmp_path / "ckpt")
    sha = load(folder).checkpoint_sha256
    rng = np.random.default_rng(0)
    emb = {v: rng.normal(size=(4, 8)).astype(np.float32) for v in ("max", "mean")}
    key = device_eval.cache_name("pbmc3k", 4, sha)  # embedding_quality.py's key (pooled_variants)
    arrays = {f"fp32|{key}|mean": emb["mean"], f"fp32|{key}|max": emb["max"].astype(np.float16),
              f"bf16|{key}|mean": -emb["mean"].astype(np.float16)}
    npz = device_eval.write_split(arrays, tmp_path, limit=200)  # 128 + 64 + 64 bytes: two files
    assert [p.name for p in npz] == ["eq_embeddings-1.npz", "eq_embeddings-2.npz"]
    npz = [str(p) for p in npz]
    emb["max"] = emb["max"].astype(np.float16).astype(np.float32)
    written = device_eval.unpack(npz, tmp_path / "cache", str(folder))
    assert [p.name for p in written] == [f"pbmc3k_4_{sha[:16]}.npz"]  # embedding_quality.py's key
    with np.load(written[0]) as got:
        assert sorted(got.files) == ["max", "mean"]
        for v, e in emb.items():
            assert got[v].dtype == np.float32
            np.testing.assert_array_equal(got[v], e)  # the float32 embeddings, not the bf16 ones
    bf16 = device_eval.unpack(npz, tmp_path / "cache_bf16", str(folder), precision="bf16")
    with np.load(bf16[0]) as got:
        assert got.files == ["mean"]
        np.testing.assert_allclose(got["mean"], -emb["mean"], rtol=1e-3)  # the bf16 set, under the same key
    other = XTrimoGene(tiny_config).save(tmp_path / "other")
    with pytest.raises(ValueError, match="merge the returned shards"):
        device_eval.unpack(npz, tmp_path / "cache2", str(other))
    assert not (tmp_path / "cache2").exists()
