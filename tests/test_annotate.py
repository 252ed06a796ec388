import numpy as np
import pandas as pd
import pytest
import torch

import scxtrimo
from scxtrimo.models import XTrimoGene
from scxtrimo.tl import CellTypeClassifier
from scxtrimo.tl._annotate import stratified_split


@pytest.fixture(scope="module")
def probe(pbmc3k_session):
    """Linear probe of the bundled checkpoint on pbmc3k (8 types)."""
    adata = pbmc3k_session.copy()
    clf = scxtrimo.tl.annotate(adata, labels_key="cell_type", freeze="all", epochs=30, patience=5, progress=False)
    return adata, clf


def test_stratified_split_8_1_1_and_small_classes():
    labels = np.array(["a"] * 100 + ["b"] * 50 + ["c"] * 2)
    split, small = stratified_split(labels, random_state=0)
    assert small == [("c", 2)]
    assert {k: len(v) for k, v in split.items()} == {"train": 122, "validation": 15, "test": 15}
    assert set(labels[split["test"]]) == {"a", "b"}
    assert len(np.unique(np.concatenate(list(split.values())))) == 152


def test_linear_probe_outputs_and_beats_majority_baseline(probe):
    adata, clf = probe
    rep = adata.uns["xtrimo"]["annotate"]
    classes = rep["classes"]
    assert len(classes) == 8 and list(adata.obs["xtrimo_label"].cat.categories) == classes
    P = adata.obsm["xtrimo_label_probabilities"]
    assert P.shape == (adata.n_obs, 8) and np.allclose(P.sum(1), 1, atol=1e-4)
    np.testing.assert_allclose(adata.obs["xtrimo_label_confidence"], P.max(1))
    sizes = rep["split_sizes"]
    assert sizes["train"] + sizes["validation"] + sizes["test"] == adata.n_obs
    assert abs(sizes["test"] / adata.n_obs - 0.1) < 0.01
    # majority-class macro-F1 on 8 classes is < 0.1; a useful probe is far above it
    assert rep["test_macro_f1"] > 0.6, rep["test_macro_f1"]
    assert rep["test_accuracy"] > 0.8
    cm = np.asarray(rep["confusion_matrix"])
    assert cm.shape == (8, 8) and cm.sum() == sizes["test"]
    assert set(rep["per_class_f1"]) == set(classes)


def test_classifier_save_load_and_query(probe, tmp_path, pbmc3k_session):
    adata, clf = probe
    clf.save(tmp_path / "clf")
    loaded = CellTypeClassifier.load(tmp_path / "clf")
    assert loaded.classes == clf.classes
    # a query with other genes (half the genes dropped) and other depth (counts halved)
    query = pbmc3k_session[:300, ::2].copy()
    query.X = query.X.multiply(0.5).tocsr()
    query.X.data = np.ceil(query.X.data)
    scxtrimo.tl.annotate(query, model=loaded, labels_key="cell_type", progress=False)
    rep = query.uns["xtrimo"]["annotate"]
    assert rep["mode"] == "predict" and query.obsm["xtrimo_label_probabilities"].shape == (300, 8)
    assert rep["accuracy"] > 0.5
    same = pbmc3k_session[:300].copy()
    scxtrimo.tl.annotate(same, model=loaded, progress=False)
    agree = (same.obs["xtrimo_label"].astype(str).to_numpy() == adata.obs["xtrimo_label"].astype(str).to_numpy()[:300]).mean()
    assert agree == 1.0


def test_fine_tuning_last_layer_updates_only_that_layer(pbmc3k, tiny_config):
    torch.manual_seed(0)
    base = XTrimoGene(tiny_config)
    small = pbmc3k[:160].copy()
    small.obs.loc[small.obs_names[:10], "cell_type"] = np.nan
    with pytest.warns(UserWarning, match="no label"):
        clf = scxtrimo.tl.annotate(small, labels_key="cell_type", model=base, freeze=1, epochs=1, batch_size=16, progress=False)
    before, after = base.state_dict(), clf.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.blocks.1.") or k.startswith("encoder.norm.") for k in changed)
    assert small.obs["xtrimo_label"].notna().all()


def test_bad_labels_are_reported(pbmc3k, tiny_config):
    small = pbmc3k[:40].copy()
    with pytest.raises(KeyError, match="not found"):
        scxtrimo.tl.annotate(small, labels_key="celltype", model=XTrimoGene(tiny_config), progress=False)
    small.obs["one"] = "T"
    with pytest.raises(ValueError, match="at least two"):
        scxtrimo.tl.annotate(small, labels_key="one", model=XTrimoGene(tiny_config), progress=False)
    with pytest.raises(ValueError, match="freeze"):
        scxtrimo.tl.annotate(small, labels_key="cell_type", model=XTrimoGene(tiny_config), freeze="half", progress=False)
