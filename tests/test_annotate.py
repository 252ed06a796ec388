import copy
import warnings
from contextlib import nullcontext

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scxtrimo
from conftest import DEFAULT_CONFIG
from scxtrimo.models import XTrimoGene
from scxtrimo.tl import CellTypeClassifier
from scxtrimo.tl._annotate import stratified_split


@pytest.fixture(scope="module")
def probe(pbmc3k_embedded):
    """Linear probe of the bundled checkpoint on pbmc3k (8 types), on the session's stored
    embedding (``use_rep``: the same probe as embedding the cells again, as
    ``test_linear_probe_reuses_stored_embedding`` checks)."""
    adata = pbmc3k_embedded.copy()
    clf = scxtrimo.tl.annotate(adata, labels_key="cell_type", freeze="all", use_rep="X_xtrimo", epochs=30, patience=5,
                               progress=False)
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
    # a constant majority-class prediction: macro-F1 ~0.08 on 8 classes; the probe is far above it
    y = adata.obs["cell_type"].astype(str).to_numpy()
    majority = pd.Series(y).value_counts().index[0]
    from sklearn.metrics import f1_score
    baseline_f1 = f1_score(y, np.full_like(y, majority), average="macro", zero_division=0)
    assert rep["test_macro_f1"] > baseline_f1 + 0.15, (rep["test_macro_f1"], baseline_f1)
    # standardized max-pooled features: the probe reaches macro-F1 ~0.79 (0.44 without)
    assert rep["test_macro_f1"] > 0.6, rep["test_macro_f1"]
    assert not torch.allclose(clf.feature_scale, torch.ones_like(clf.feature_scale))
    assert rep["test_accuracy"] > (y == majority).mean()
    cm = np.asarray(rep["confusion_matrix"])
    assert cm.shape == (8, 8) and cm.sum() == sizes["test"]
    f1 = rep["per_class_f1"]["f1"]  # every class has test cells here
    assert list(f1.index) == classes and f1.between(0, 1).all()


def test_classifier_save_load_and_query(probe, tmp_path, pbmc3k_session):
    adata, clf = probe
    clf.save(tmp_path / "clf")
    loaded = CellTypeClassifier.load(tmp_path / "clf")
    assert loaded.classes == clf.classes
    auto = CellTypeClassifier.load(tmp_path / "clf", device="auto")
    assert auto.head.weight.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        clf.save(tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "x"
    # a saved classifier is not a checkpoint: annotate says how to apply it
    query = pbmc3k_session[:40].copy()
    for path in (tmp_path / "clf", str(tmp_path / "clf" / "classes.json")):
        with pytest.raises(ValueError, match=r"CellTypeClassifier\.load"):
            scxtrimo.tl.annotate(query, model=path, labels_key="cell_type", progress=False)
    assert "xtrimo_label" not in query.obs and "xtrimo" not in query.uns
    # training arguments given with a trained classifier are ignored, with a warning naming them
    with pytest.warns(UserWarning, match="freeze, epochs .*ignored"):
        scxtrimo.tl.annotate(query, model=loaded, freeze=1, epochs=50, batch_size=8, progress=False)
    # labels of another type than the classifier's classes (here integer codes): every score would be 0
    query.obs["code"] = query.obs["cell_type"].cat.codes
    with pytest.warns(UserWarning, match="None of the labels"):
        scxtrimo.tl.annotate(query, model=loaded, labels_key="code", progress=False)
    assert query.uns["xtrimo"]["annotate"]["macro_f1"] == 0
    # the same cells sequenced twice as deep: normalization removes depth, predictions are identical
    # (a model with depth tokens also sees S = log10 of the total count, 0.301 higher: its
    # probabilities move slightly, by up to 1.7e-3 for an xtrimo-10m trained on thinned cells)
    deep = pbmc3k_session[:300].copy()
    deep.X = (deep.X * 2).tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # default arguments and matching labels: no warning
        scxtrimo.tl.annotate(deep, model=loaded, labels_key="cell_type", progress=False)
    rep = deep.uns["xtrimo"]["annotate"]
    assert rep["mode"] == "predict" and deep.obsm["xtrimo_label_probabilities"].shape == (300, 8)
    np.testing.assert_array_equal(deep.obs["xtrimo_label"].astype(str).to_numpy(),
                                  adata.obs["xtrimo_label"].astype(str).to_numpy()[:300])
    np.testing.assert_allclose(deep.obsm["xtrimo_label_probabilities"], adata.obsm["xtrimo_label_probabilities"][:300],
                               atol=1e-2 if DEFAULT_CONFIG.depth_tokens else 1e-5)
    # a query measuring other genes (every second gene only) goes through the same alignment
    sparse_genes = pbmc3k_session[:300, ::2].copy()
    scxtrimo.tl.annotate(sparse_genes, model=loaded, progress=False)
    rep2 = sparse_genes.uns["xtrimo"]["annotate"]
    assert rep2["n_genes_matched"] < rep["n_genes_matched"] == 11_213
    assert np.allclose(sparse_genes.obsm["xtrimo_label_probabilities"].sum(1), 1, atol=1e-4)
    mouse = pbmc3k_session[:20].copy()
    mouse.var_names = [g.capitalize() for g in mouse.var_names]
    with pytest.raises(ValueError):
        scxtrimo.tl.annotate(mouse, model=loaded, progress=False)


def test_fine_tuning_last_layer_updates_only_that_layer(pbmc3k, tiny_config):
    torch.manual_seed(0)
    base = XTrimoGene(tiny_config)
    small = pbmc3k[:160].copy()
    small.obs.loc[small.obs_names[:10], "cell_type"] = np.nan
    with pytest.warns(UserWarning, match="no label"):
        clf = scxtrimo.tl.annotate(small, labels_key="cell_type", model=base, freeze=np.int64(1), epochs=1,
                                   batch_size=16, warm_start=False, progress=False)
    assert type(clf.freeze) is int and clf.freeze == 1  # a NumPy integer is taken, stored as an int (JSON)
    assert small.uns["xtrimo"]["annotate"]["best_epoch"] == 1  # no probe to fall back to: the tuned epoch is kept
    before, after = base.state_dict(), clf.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.blocks.1.") or k.startswith("encoder.norm.") for k in changed)
    assert small.obs["xtrimo_label"].notna().all()


def test_fine_tuning_starts_from_a_warm_probe_and_never_ends_below_it(pbmc3k, tiny_config):
    torch.manual_seed(0)
    small = pbmc3k[:300].copy()
    clf = scxtrimo.tl.annotate(small, labels_key="cell_type", model=XTrimoGene(tiny_config), freeze=1, epochs=2,
                               batch_size=16, random_state=1, progress=False)
    rep = small.uns["xtrimo"]["annotate"]
    hist = rep["history"]
    stages = list(hist["stage"])
    assert stages[0] == "warm start" and stages[-1] == "fine-tune" and stages.count("fine-tune") <= 2
    assert stages.index("fine-tune") == stages.count("warm start")  # the probe runs first, then fine-tuning
    probe_best = hist.loc[hist["stage"] == "warm start", "val_macro_f1"].max()
    tuned = hist.loc[hist["stage"] == "fine-tune", "val_macro_f1"]
    assert rep["warm_start"] and rep["val_macro_f1"] == max(probe_best, tuned.max())
    assert rep["best_epoch"] == (0 if probe_best >= tuned.max() else int(tuned.to_numpy().argmax()) + 1)
    # the head reads embeddings standardized with the training cells' statistics
    assert torch.all(clf.feature_scale > 0) and not torch.allclose(clf.feature_mean, torch.zeros_like(clf.feature_mean))


def test_fine_tuning_within_a_token_budget_takes_the_same_steps(pbmc3k, tiny_config, monkeypatch):
    """max_tokens bounds the encoder's input per call (gradient accumulation), not the result;
    a step that runs out of CUDA memory is run again in smaller parts, to the same result."""
    torch.manual_seed(0)
    base = XTrimoGene(tiny_config)
    small = pbmc3k[:120].copy()
    widths = {}
    forward = CellTypeClassifier.forward

    def recording_forward(self, batch):
        if torch.is_grad_enabled() and self.training:
            if run == "oom" and batch.valid.shape[0] > 2:  # simulated: a GPU that holds 2 cells at a time
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            widths.setdefault(run, []).append(tuple(batch.valid.shape))
        return forward(self, batch)

    monkeypatch.setattr(CellTypeClassifier, "forward", recording_forward)
    runs = {}
    for run, budget in (("whole", 10**9), ("one cell", 1), ("oom", 10**9)):
        adata = small.copy()
        oom_warning = pytest.warns(RuntimeWarning, match="out of memory") if run == "oom" else nullcontext()
        with pytest.warns(UserWarning, match="cannot be split"), oom_warning:  # 2 dendritic cells among these 120
            clf = scxtrimo.tl.annotate(adata, labels_key="cell_type", model=base, freeze="none", epochs=1, lr=1e-4,
                                       batch_size=16, warm_start=False, max_tokens=budget, progress=False)
        runs[run] = (clf.backbone.state_dict(), adata.obsm["xtrimo_label_probabilities"])
    n_train = adata.uns["xtrimo"]["annotate"]["split_sizes"]["train"]  # same split for every run
    assert max(b for b, _ in widths["whole"]) == 16 and len(widths["one cell"]) == n_train  # whole steps vs one cell per call
    assert all(b == 1 for b, _ in widths["one cell"])
    assert max(b for b, _ in widths["oom"]) == 2 and sum(b for b, _ in widths["oom"]) == n_train  # every cell once
    start = base.state_dict()
    whole, parts, oom = (torch.cat([(runs[r][0][k].float() - start[k].float()).flatten() for k in start])
                         for r in ("whole", "one cell", "oom"))
    assert whole.abs().max() > 1e-4  # the step did move the encoder
    for other in (parts, oom):
        assert torch.nn.functional.cosine_similarity(whole, other, dim=0) > 0.9999
        assert (whole - other).abs().max() < 0.1 * whole.abs().max()
    np.testing.assert_allclose(runs["one cell"][1], runs["whole"][1], atol=1e-4)
    np.testing.assert_allclose(runs["oom"][1], runs["whole"][1], atol=1e-4)


def test_without_validation_cells_the_trained_weights_are_kept(pbmc3k, tiny_config):
    torch.manual_seed(0)
    base = XTrimoGene(tiny_config)
    small = pbmc3k[:4].copy()
    small.obs["cell_type"] = ["A", "A", "B", "B"]  # too small to split: all four cells train
    with pytest.warns(UserWarning, match="cannot be split"), pytest.warns(UserWarning, match="no validation"):
        clf = scxtrimo.tl.annotate(small, labels_key="cell_type", model=base, freeze=1, epochs=2, warm_start=False,
                                   patience=1, progress=False)
    rep = small.uns["xtrimo"]["annotate"]
    assert rep["split_sizes"] == {"train": 4, "validation": 0, "test": 0}
    assert rep["best_epoch"] == 2 and len(rep["history"]) == 2  # not the untrained start, no early stop
    assert np.isnan(rep["test_macro_f1"]) and np.asarray(rep["confusion_matrix"]).sum() == 0
    assert rep["per_class_f1"].empty
    before, after = base.state_dict(), clf.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bad_labels_are_reported(pbmc3k, tiny_config):
    small = pbmc3k[:40].copy()
    with pytest.raises(KeyError, match="not found"):
        scxtrimo.tl.annotate(small, labels_key="celltype", model=XTrimoGene(tiny_config), progress=False)
    small.obs["one"] = "T"
    with pytest.raises(ValueError, match="at least two"):
        scxtrimo.tl.annotate(small, labels_key="one", model=XTrimoGene(tiny_config), progress=False)
    with pytest.raises(ValueError, match="freeze"):
        scxtrimo.tl.annotate(small, labels_key="cell_type", model=XTrimoGene(tiny_config), freeze="half", progress=False)
    # freeze is checked before the genes are aligned (mouse-cased symbols would fail the alignment)
    mouse = small.copy()
    mouse.var_names = [g.capitalize() for g in mouse.var_names]
    with pytest.raises(ValueError, match="the encoder has 2 layers"):
        scxtrimo.tl.annotate(mouse, labels_key="cell_type", model=XTrimoGene(tiny_config), freeze=np.int64(3), progress=False)
    # predictions written over the labels they are trained on: refused before any work
    before = small.obs.copy()
    with pytest.raises(ValueError, match="overwrite the labels"):
        scxtrimo.tl.annotate(small, labels_key="cell_type", key_added="cell_type", model=XTrimoGene(tiny_config),
                             progress=False)
    pd.testing.assert_frame_equal(small.obs, before)


def test_linear_probe_reuses_stored_embedding(pbmc3k_session, pbmc3k_embedded, tmp_path):
    """use_rep: the probe on tl.embed's obsm equals the probe that embeds the cells itself."""
    adata = pbmc3k_session[::6].copy()  # 440 cells, all 8 types
    kw = dict(labels_key="cell_type", freeze="all", epochs=5, progress=False)
    with pytest.raises(ValueError, match="freeze='all'"):
        scxtrimo.tl.annotate(adata, use_rep="X_xtrimo", labels_key="cell_type", freeze="none")
    with pytest.raises(KeyError, match="tl.embed"):
        scxtrimo.tl.annotate(adata, use_rep="X_xtrimo", **kw)
    scxtrimo.tl.embed(adata, pooling="max", key_added="X_max", progress=False)
    with pytest.raises(ValueError, match="pooling='mean'"):  # stored embedding made with another pooling than
        # the checkpoint's default (mean for the bundled checkpoint), which tl.annotate uses
        scxtrimo.tl.annotate(adata, use_rep="X_max", **kw)
    # pooling= chooses another: the max-pooled probe on the stored max-pooled embedding
    maxed = adata.copy()
    clf_max = scxtrimo.tl.annotate(maxed, use_rep="X_max", pooling="max", **kw)
    assert clf_max.pooling == "max" and clf_max.head.in_features == DEFAULT_CONFIG.enc_dim
    assert maxed.uns["xtrimo"]["annotate"]["test_macro_f1"] > 0.5  # 8 types: a majority guess scores about 0.08
    with pytest.raises(ValueError, match="trained with pooling='max'"):
        scxtrimo.tl.annotate(maxed.copy(), model=clf_max, pooling="mean", progress=False)
    with pytest.raises(ValueError, match="Unknown pooling"):
        scxtrimo.tl.annotate(adata.copy(), use_rep="X_max", pooling="median", **kw)
    # tl.embed's defaults on these cells: the session's embedding of all pbmc3k, at these rows
    # (tl.embed gives each cell the same embedding whatever cells it is embedded with), as if
    # embedded under its own key beside the max-pooled one; uns['xtrimo']['params'] describes the
    # latest call only, params_by_key each key
    stored = pbmc3k_embedded[::6]
    adata.obsm["X_xtrimo"] = stored.obsm["X_xtrimo"].copy()
    adata.uns["xtrimo"]["params_by_key"]["X_xtrimo"] = copy.deepcopy(stored.uns["xtrimo"]["params_by_key"]["X_xtrimo"])
    by_key = adata.uns["xtrimo"]["params_by_key"]
    assert by_key["X_max"]["pooling"] == "max" and by_key["X_xtrimo"]["pooling"] == "mean"
    assert adata.uns["xtrimo"]["params"]["key_added"] == "X_max"
    own, query = adata.copy(), adata.copy()
    clf = scxtrimo.tl.annotate(adata, use_rep="X_xtrimo", **kw)
    scxtrimo.tl.annotate(own, **kw)
    np.testing.assert_allclose(adata.obsm["xtrimo_label_probabilities"], own.obsm["xtrimo_label_probabilities"], atol=1e-4)
    assert adata.uns["xtrimo"]["annotate"]["test_macro_f1"] == pytest.approx(own.uns["xtrimo"]["annotate"]["test_macro_f1"])
    # applying the probe to a query that carries the same checkpoint's embedding skips the encoder;
    # the query's record is a file's from before params_by_key, which had uns['xtrimo']['params'] only
    query.uns["xtrimo"] = {"params": dict(by_key["X_xtrimo"])}
    scxtrimo.tl.annotate(query, model=clf, use_rep="X_xtrimo", progress=False)
    np.testing.assert_allclose(query.obsm["xtrimo_label_probabilities"], adata.obsm["xtrimo_label_probabilities"], atol=1e-5)
    # batch standardization on two halves of one data set (the same mix of types in each) costs
    # little against the training cells' statistics, and survives save/load
    halves = adata.copy()
    halves.obs["half"] = np.where(np.random.default_rng(0).random(halves.n_obs) < 0.5, "a", "b")
    clf_batch = scxtrimo.tl.annotate(halves, use_rep="X_xtrimo", batch_key="half", **kw)
    f1_ref, f1_batch = (a.uns["xtrimo"]["annotate"]["test_macro_f1"] for a in (adata, halves))
    assert f1_batch > 0.5 and f1_batch > f1_ref - 0.1, (f1_batch, f1_ref)
    clf_batch.save(tmp_path / "clf_batch")
    loaded = CellTypeClassifier.load(tmp_path / "clf_batch")
    assert loaded.standardization == "batch" and loaded.freeze == "all"
    # a probe's backbone is the base checkpoint still: the stored embedding (use_rep) fits the loaded one
    assert loaded.backbone.checkpoint_sha256 == clf_batch.backbone.checkpoint_sha256
    # a query standardized as one batch (no batch_key) is the one-batch column's result; a query
    # standardized per half gives the training run's own predictions back
    one, per_half = halves.copy(), halves.copy()
    scxtrimo.tl.annotate(one, model=loaded, use_rep="X_xtrimo", progress=False)
    per_half.obs["one"] = "x"
    scxtrimo.tl.annotate(per_half, model=loaded, use_rep="X_xtrimo", batch_key="one", progress=False)
    np.testing.assert_allclose(one.obsm["xtrimo_label_probabilities"], per_half.obsm["xtrimo_label_probabilities"])
    assert one.uns["xtrimo"]["annotate"]["n_batches"] == 1 and "batch_key" not in one.uns["xtrimo"]["annotate"]
    scxtrimo.tl.annotate(per_half, model=loaded, use_rep="X_xtrimo", batch_key="half", progress=False)
    np.testing.assert_allclose(per_half.obsm["xtrimo_label_probabilities"], halves.obsm["xtrimo_label_probabilities"],
                               atol=1e-5)
    # a classifier trained on the training cells' statistics refuses a batch_key rather than ignore it
    with pytest.raises(ValueError, match="not per batch"):
        scxtrimo.tl.annotate(halves.copy(), model=clf, use_rep="X_xtrimo", batch_key="half", progress=False)
    # NaN or infinite embedding rows are refused, in training and in prediction, before anything is written
    bad = pbmc3k_session[::6].copy()
    record = {"params_by_key": {"X_xtrimo": dict(adata.uns["xtrimo"]["params_by_key"]["X_xtrimo"])}}
    bad.obsm["X_xtrimo"], bad.uns["xtrimo"] = adata.obsm["X_xtrimo"].copy(), record
    bad.obsm["X_xtrimo"][:3] = np.nan
    bad.obsm["X_xtrimo"][5, 0] = np.inf
    for call in (lambda: scxtrimo.tl.annotate(bad, use_rep="X_xtrimo", **kw),
                 lambda: scxtrimo.tl.annotate(bad, model=clf, use_rep="X_xtrimo", progress=False)):
        with pytest.raises(ValueError, match="non-finite values in 4 cells"):
            call()
        assert "xtrimo_label" not in bad.obs and list(bad.uns["xtrimo"]) == ["params_by_key"]
    assert torch.isfinite(clf.feature_mean).all()


def test_per_class_f1_round_trips_and_is_nan_without_test_cells(pbmc3k, tiny_config, tmp_path):
    """Class names with '/' survive write_h5ad; a class with no test cells has no F1 (NaN), not 0."""
    small = pbmc3k[:150].copy()
    small.obs["type"] = small.obs["cell_type"].astype(str).str.replace("CD4 T cells", "CD4+/CD45RA+ T")
    small.obs.loc[small.obs_names[0], "type"] = "Rare"  # one cell: training only
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="cannot be split"):
        scxtrimo.tl.annotate(small, labels_key="type", model=XTrimoGene(tiny_config), freeze="all", epochs=1,
                             progress=False)
    rep = small.uns["xtrimo"]["annotate"]
    f1 = rep["per_class_f1"]["f1"]
    assert list(f1.index) == rep["classes"] and "CD4+/CD45RA+ T" in f1.index
    # NaN exactly for the classes too small to have test cells (Rare, and 2 dendritic cells among these 150)
    assert "Rare" in rep["small_classes"] and set(f1.index[f1.isna()]) == set(rep["small_classes"])
    assert f1.dropna().between(0, 1).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning about '/' in keys
        small.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["xtrimo"]["annotate"]["per_class_f1"]
    pd.testing.assert_series_equal(back["f1"], f1)


def test_default_freeze_is_the_linear_probe_on_cpu(pbmc3k, tiny_config):
    """freeze='auto' (the default) trains the head alone on a CPU: minutes, not an hour, on pbmc3k."""
    small = pbmc3k[:150].copy()
    torch.manual_seed(0)
    base = XTrimoGene(tiny_config)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    clf = scxtrimo.tl.annotate(small, labels_key="cell_type", model=base, epochs=2, device="cpu", progress=False)
    assert clf.freeze == "all" and small.uns["xtrimo"]["annotate"]["freeze"] == "all"
    for k, v in clf.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # layer=: the counts read from the named layer give the same probe as the counts in X
    moved = pbmc3k[:150].copy()
    moved.layers["raw"], moved.X = moved.X.copy(), moved.X * 0
    with pytest.raises(KeyError, match=r"layer='counts_' is not in adata.layers .*'raw'"):
        scxtrimo.tl.annotate(moved, labels_key="cell_type", model=base, layer="counts_", progress=False)
    assert "xtrimo" not in moved.uns
    scxtrimo.tl.annotate(moved, labels_key="cell_type", model=base, layer="raw", epochs=2, device="cpu", progress=False)
    np.testing.assert_allclose(moved.obsm["xtrimo_label_probabilities"], small.obsm["xtrimo_label_probabilities"], atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"freeze": "bogus"}, "freeze='bogus'"),
    ({"freeze": 9}, "freeze=9: the encoder has"),
    ({"freeze": True}, "freeze=True"),
    ({"pooling": "median"}, "pooling"),
    ({"classes": ["only"]}, "at least two classes"),
])
def test_classifier_refuses_settings_it_would_store_and_misuse(tiny_config, kwargs, message):
    """A bad freeze was stored, saved, and only failed later in annotate(use_rep=...)."""
    args = {"classes": ["B", "T"], **kwargs}
    with pytest.raises(ValueError, match=message):
        CellTypeClassifier(XTrimoGene(tiny_config), args.pop("classes"), **args)


def test_classifier_keeps_valid_settings(tiny_config):
    clf = CellTypeClassifier(XTrimoGene(tiny_config), ["B", "T"], freeze=np.int64(1), pooling="mean")
    assert clf.freeze == 1 and type(clf.freeze) is int and clf.pooling == "mean" and clf.head.out_features == 2


def test_batch_standardize_centres_and_scales_each_batch():
    from scxtrimo.tl._annotate import _batch_standardize

    rng = np.random.default_rng(0)
    emb = np.r_[rng.normal(5, 2, (60, 4)), rng.normal(-3, 0.5, (40, 4))]
    emb[:, 3] = 7.0  # a feature constant within each batch stays 0
    codes = np.r_[np.zeros(60, int), np.ones(40, int)]
    out = _batch_standardize(emb, codes)
    assert out.dtype == np.float32 and out.shape == emb.shape
    for b in (0, 1):
        np.testing.assert_allclose(out[codes == b, :3].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(out[codes == b, :3].std(0), 1, atol=1e-4)
    np.testing.assert_array_equal(out[:, 3], 0)


def test_batch_key_is_checked_before_anything_is_written(pbmc3k, tiny_config):
    small = pbmc3k[:150].copy()
    small.obs["run"] = np.where(np.arange(150) < 75, "r1", "r2")
    kw = {"labels_key": "cell_type", "model": XTrimoGene(tiny_config), "epochs": 1, "progress": False}
    before = small.obs.copy()
    with pytest.raises(KeyError, match="obs\\['lane'\\] not found"):
        scxtrimo.tl.annotate(small, batch_key="lane", **kw)
    with pytest.raises(ValueError, match="linear probe only"):
        scxtrimo.tl.annotate(small, batch_key="run", freeze="none", **kw)
    bad = small.copy()
    bad.obs["run"] = bad.obs["run"].astype(object)
    bad.obs.loc[bad.obs_names[:2], "run"] = None
    with pytest.raises(ValueError, match="2 cells have no batch"):
        scxtrimo.tl.annotate(bad, batch_key="run", **kw)
    bad.obs["run"] = ["r1"] * 149 + ["alone"]
    with pytest.raises(ValueError, match="single cell.*'alone'"):
        scxtrimo.tl.annotate(bad, batch_key="run", **kw)
    pd.testing.assert_frame_equal(small.obs, before)
    assert "xtrimo" not in small.uns
    # batch_key with freeze='auto' is the linear probe, on any device; batches under 50 cells warn
    small.obs["run"] = ["r1"] * 110 + ["r2"] * 40
    with pytest.warns(UserWarning, match="fewer than 50 cells.*'r2': 40"):
        clf = scxtrimo.tl.annotate(small, batch_key="run", **kw)
    rep = small.uns["xtrimo"]["annotate"]
    assert clf.freeze == "all" and clf.standardization == "batch"
    assert rep["standardization"] == "batch" and rep["batch_key"] == "run" and rep["n_batches"] == 2
    # the buffers stay the identity: the standardization happens per batch, outside the head
    assert torch.equal(clf.feature_mean, torch.zeros_like(clf.feature_mean))
    assert torch.equal(clf.feature_scale, torch.ones_like(clf.feature_scale))
    with pytest.raises(ValueError, match="mini-batch"):
        clf(None)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"standardization": "global"}, "standardization='global'"),
    ({"standardization": "batch", "freeze": "none"}, "needs the linear probe"),
])
def test_classifier_refuses_bad_standardization(tiny_config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CellTypeClassifier(XTrimoGene(tiny_config), ["B", "T"], **kwargs)


@pytest.mark.slow
def test_batch_standardization_repairs_the_cross_protocol_transfer(cellbench):
    """Drop-seq -> CEL-seq2 (cellbench, 3 cell lines in both): the bundled checkpoint's linear probe
    on the training cells' statistics transfers at macro-F1 0.30-0.46 (3 seeds), each run standardized
    on its own at 0.91-0.95 (``docs/benchmarks.md``, "Cell-type annotation"). 15 CPU minutes."""
    cb = cellbench[cellbench.obs["batch"].isin(["sc_dropseq", "sc_celseq2"])].copy()
    scxtrimo.tl.embed(cb, progress=False)
    src, dst = (cb[cb.obs["batch"] == b].copy() for b in ("sc_dropseq", "sc_celseq2"))
    f1 = {}
    for batch_key in (None, "batch"):
        train, query = src.copy(), dst.copy()
        clf = scxtrimo.tl.annotate(train, labels_key="cell_type", batch_key=batch_key, use_rep="X_xtrimo",
                                   freeze="all", progress=False)
        scxtrimo.tl.annotate(query, model=clf, labels_key="cell_type", batch_key=batch_key, use_rep="X_xtrimo",
                             progress=False)
        f1[batch_key] = query.uns["xtrimo"]["annotate"]["macro_f1"]
    assert f1["batch"] > 0.85 and f1["batch"] > f1[None] + 0.3, f1
    # without use_rep the classifier embeds the query itself (here 100 cells, standardized as one
    # batch): the predictions from the stored embedding of the same cells
    stored, own = dst[:100].copy(), dst[:100].copy()
    scxtrimo.tl.annotate(stored, model=clf, use_rep="X_xtrimo", progress=False)
    scxtrimo.tl.annotate(own, model=clf, progress=False)
    np.testing.assert_allclose(own.obsm["xtrimo_label_probabilities"], stored.obsm["xtrimo_label_probabilities"],
                               atol=1e-4)


def test_batches_that_are_cell_types_are_warned_about(pbmc3k, tiny_config):
    """Sorted populations as batches: standardizing each on its own would erase the types."""
    small = pbmc3k[:300].copy()
    small.obs["sorted_population"] = small.obs["cell_type"].astype(str)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="100% of the labelled cells are in batches .* a single cell type"):
        scxtrimo.tl.annotate(small, labels_key="cell_type", batch_key="sorted_population",
                             model=XTrimoGene(tiny_config), epochs=1, progress=False)


def test_a_per_batch_classifier_needs_more_than_one_query_cell(pbmc3k, tiny_config):
    """Without batch_key a query is one batch: one cell has no batch statistics, a few are noisy."""
    small = pbmc3k[:150].copy()
    small.obs["run"] = "r1"
    torch.manual_seed(0)
    clf = scxtrimo.tl.annotate(small, labels_key="cell_type", batch_key="run", model=XTrimoGene(tiny_config),
                               epochs=1, progress=False)
    one = pbmc3k[:1].copy()
    with pytest.raises(ValueError, match="single cell"):
        scxtrimo.tl.annotate(one, model=clf, progress=False)
    assert "xtrimo_label" not in one.obs
    few = pbmc3k[:10].copy()
    with pytest.warns(UserWarning, match="query \\(no batch_key: one batch\\) with fewer than 50 cells"):
        scxtrimo.tl.annotate(few, model=clf, progress=False)
    assert few.uns["xtrimo"]["annotate"]["n_batches"] == 1
