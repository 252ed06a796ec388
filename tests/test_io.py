import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import scxtrimo
from scxtrimo.models import XTrimoGene, load
from scxtrimo.models import _io

from conftest import DEFAULT, REPO


@pytest.fixture(scope="module")
def random_3m():
    torch.manual_seed(0)
    return XTrimoGene("xtrimo-3m").eval()


def test_round_trip_gives_identical_embeddings(random_3m, pbmc3k, tmp_path):
    small = pbmc3k[:150].copy()
    scxtrimo.tl.embed(small, model=random_3m, progress=False)
    random_3m.save(tmp_path / "ck")
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {"config.json", "model.safetensors", "genes.txt"}
    loaded = load(tmp_path / "ck")
    again = pbmc3k[:150].copy()
    scxtrimo.tl.embed(again, model=loaded, progress=False)
    np.testing.assert_array_equal(small.obsm["X_xtrimo"], again.obsm["X_xtrimo"])
    assert loaded.checkpoint_sha256 == _io.sha256_file(tmp_path / "ck" / "model.safetensors")


def test_fp16_checkpoint_is_small_and_close(random_3m, pbmc3k, tmp_path):
    random_3m.save(tmp_path / "half", dtype=torch.float16)
    size = (tmp_path / "half" / "model.safetensors").stat().st_size
    assert size < 10 * 2**20
    loaded = load(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    a, b = pbmc3k[:50].copy(), pbmc3k[:50].copy()
    scxtrimo.tl.embed(a, model=random_3m, progress=False)
    scxtrimo.tl.embed(b, model=loaded, progress=False)
    assert np.abs(a.obsm["X_xtrimo"] - b.obsm["X_xtrimo"]).max() < 0.05


def test_gene_list_mismatch_is_refused(random_3m, tmp_path):
    folder = random_3m.save(tmp_path / "ck")
    genes = (folder / "genes.txt").read_text().split()
    genes[10], genes[11] = genes[11], genes[10]
    (folder / "genes.txt").write_text("\n".join(genes))
    with pytest.raises(ValueError, match="different gene list"):
        load(folder)


def test_shape_mismatch_is_refused(random_3m, tmp_path):
    folder = random_3m.save(tmp_path / "ck")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["enc_ff_mult"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit its configuration"):
        load(folder)


def test_hash_mismatch_and_unknown_name_are_refused(random_3m, tmp_path, monkeypatch):
    folder = random_3m.save(tmp_path / "xtrimo-test")
    monkeypatch.setitem(_io.BUNDLED, "xtrimo-test", "0" * 64)
    monkeypatch.setattr(_io, "_bundled_dir", lambda name: folder)
    with pytest.raises(ValueError, match="sha256"):
        load("xtrimo-test")
    with pytest.raises(ValueError, match="Known names"):
        load("xtrimo-1b")
    with pytest.raises(ValueError, match="lacks"):
        load(tmp_path)


def test_bundled_checkpoint_loads_and_matches_registry():
    model = load(DEFAULT)
    assert model.checkpoint_name == DEFAULT
    assert model.checkpoint_sha256 == _io.BUNDLED[DEFAULT]
    assert model.config.name == DEFAULT and model.n_parameters() > 2.5e6
    meta = model.metadata
    assert meta["cells_seen"] > 39000 and meta["gene_init"] == "coexpression" and meta["pooling"] == "mean"
    last = meta["this_run"]["args"]  # how it was trained: cell and factor-score terms, the gene embedding frozen
    assert last["cell_weight"] == 1.0 and last["cell_readout"] == "dot" and last["gene_lr_scale"] == 0.0
    assert last["factor_weight"] == 2.0 and last["decoder_zeros"] == 1024
    # decoding all genes, its unexpressed genes weigh as the 1,024 sampled ones it was trained with
    assert model.config.decoder_zero_mass == 1024 and model.config.feature_redraw_interval is None


def test_bundled_model_card_matches_the_checkpoint():
    """The card's training curve has one segment per training run in the metadata and ends at the
    checkpoint's cells seen and minutes (``scripts/publish_default.py --continue-card`` carries
    earlier segments over from the card, so a broken carry-over shows here)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from publish_default import card_curve
    finally:
        sys.path.remove(str(REPO / "scripts"))
    meta = load(DEFAULT).metadata
    card = _io._bundled_dir(DEFAULT) / "MODEL_CARD.md"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in card_curve(card)]
    segments = [int(r[0]) for r in rows]
    assert segments == sorted(segments) and set(segments) == set(range(1, len(meta["history_before"]) + 2))
    cells = [int(r[2].replace(",", "")) for r in rows]
    assert cells == sorted(cells) and cells[-1] == meta["cells_seen"]
    assert abs(int(rows[-1][3]) - meta["minutes"]) <= 1
    text = card.read_text()
    assert f"{meta['cells_seen']:,}" in text and _io.BUNDLED[DEFAULT] in text
    # the capture augmentation is named in the objective exactly when the last segment used it
    capture = [bool(r.get("args", {}).get("capture_sd")) for r in meta["history_before"] + [meta["this_run"]]]
    assert ("`ThinningConfig.capture_sd`" in text) == capture[-1]
    # the depth thinning of the inputs is named when any segment thinned (a record without p_thin: the
    # trainer's default, 0.5), with the last segment's share of thinned cells
    shares = [float(r["args"].get("p_thin", 0.5)) for r in meta["history_before"] + [meta["this_run"]]]
    assert ("depth-thinned inputs" in text) == any(shares)
    assert not any(shares) or f"{shares[-1]:.0%}" in text.split("depth-thinned inputs")[1].split("|")[0]


def test_card_names_the_depth_thinning_per_segment():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from publish_default import thinning_words
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert thinning_words([{"args": {"p_thin": 0.0}}], depth_tokens=False) == ""
    same = thinning_words([{"args": {}}, {"args": {"p_thin": 0.5}}], depth_tokens=False)  # no p_thin: 0.5
    assert "50% of the cells" in same and "no depth tokens" in same and "by segment" not in same
    mixed = thinning_words([{"args": {"p_thin": 0.5}}, {"args": {"p_thin": 0.8}}], depth_tokens=True)
    assert "by segment 50% / 80%" in mixed and "T = log10 of the real total" in mixed


def test_publishing_another_architecture_makes_it_the_only_bundled_default():
    """scripts/publish_default.py --name rewrites scxtrimo/_bundled.py: the new name is the default
    and the only bundled checkpoint; republishing the default under its own name changes only
    its hash; a GPU segment must be named for the card."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from publish_default import BUNDLED_PY, architecture_words, hardware_words, make_default
    finally:
        sys.path.remove(str(REPO / "scripts"))
    text = BUNDLED_PY.read_text()
    new = {}
    exec(make_default(text, "xtrimo-10m", "ab" * 32), new)
    assert new["DEFAULT_CHECKPOINT"] == "xtrimo-10m" and new["BUNDLED"] == {"xtrimo-10m": "ab" * 32}
    assert make_default(text, DEFAULT, _io.BUNDLED[DEFAULT]) == text
    with pytest.raises(ValueError, match="edit it by hand"):
        make_default("BUNDLED = {}\n", "xtrimo-10m", "ab" * 32)
    words = architecture_words(scxtrimo.models.CONFIGS["xtrimo-10m"])
    assert words.startswith("xTrimoGene-10M (appendix Table 2): encoder 4 layers / 8 heads / 256 wide")
    assert "4x width in the encoder, 2x in the decoder" in words
    with pytest.raises(SystemExit, match="--hardware"):
        hardware_words([{"device": "cpu"}, {"device": "cuda"}], None)
    assert hardware_words([{"device": "cuda"}], "one NVIDIA H200, bf16") == "one NVIDIA H200, bf16"
    assert hardware_words([{}, {"device": "cpu"}], None).startswith("CPU only")


def test_save_keeps_the_models_metadata(pbmc3k, tmp_path):
    bundled = load(DEFAULT)
    loaded = load(bundled.save(tmp_path / "ck"))
    assert loaded.metadata == bundled.metadata and loaded.default_pooling == "mean"
    a, b = pbmc3k[:40].copy(), pbmc3k[:40].copy()
    scxtrimo.tl.embed(a, model=bundled, progress=False)
    scxtrimo.tl.embed(b, model=loaded, progress=False)
    np.testing.assert_array_equal(a.obsm["X_xtrimo"], b.obsm["X_xtrimo"])
    # passed keys win over the model's own
    again = load(bundled.save(tmp_path / "ck2", metadata={"pooling": "max", "note": "x"}))
    assert again.metadata == {**bundled.metadata, "pooling": "max", "note": "x"} and again.default_pooling == "max"


def test_bare_name_is_the_bundled_checkpoint_not_a_local_folder(random_3m, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = random_3m.save(DEFAULT)
    own = _io.sha256_file(folder / "model.safetensors")
    named = load(DEFAULT)
    assert named.checkpoint_sha256 == _io.BUNDLED[DEFAULT] and named.default_pooling == "mean"
    for as_path in (f"./{DEFAULT}", folder, tmp_path / DEFAULT):
        assert load(as_path).checkpoint_sha256 == own
    shutil.rmtree(folder)
    (tmp_path / DEFAULT).write_bytes(b"not a checkpoint")  # nor a file of that name
    assert load(DEFAULT).checkpoint_sha256 == _io.BUNDLED[DEFAULT]


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_config_with_missing_fields_or_newer_format_is_refused(random_3m, tmp_path):
    folder = random_3m.save(tmp_path / "ck")
    _edit_config(folder, lambda c: [c.pop("enc_dim"), c.pop("n_bins")])
    with pytest.raises(ValueError, match=r"config\.json.*lacks.*\['enc_dim', 'n_bins'\]"):
        load(folder)
    folder = random_3m.save(tmp_path / "ck")
    _edit_config(folder, lambda c: c.pop("format_version"))
    with pytest.raises(ValueError, match=r"config\.json.*lacks.*format_version"):
        load(folder)
    for version in (_io.FORMAT_VERSION + 1, "1", True, 0):
        _edit_config(folder, lambda c: c.update(format_version=version))
        with pytest.raises(ValueError, match=rf"config\.json.*format_version {version!r}"):
            load(folder)


def test_config_before_the_architecture_switches_still_loads(random_3m, tmp_path):
    """Files written before the released-architecture switches (76546aa) and the decoder options
    (e99bf98) lack those fields; they load as the architecture they were trained with."""
    folder = random_3m.save(tmp_path / "ck")
    _edit_config(folder, lambda c: [c.pop(k) for k in _io.ADDED_FIELDS])
    assert set(_io.ADDED_FIELDS) == {"enc_norm_first", "enc_activation", "dec_dim_head", "out_norm", "depth_tokens",
                                     "key_max", "feature_redraw_interval", "decoder_zero_mass"}
    assert load(folder).config == random_3m.config


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64, "float16"])
def test_save_refuses_non_floating_dtype(random_3m, tmp_path, dtype):
    with pytest.raises(ValueError, match="floating-point torch dtype"):
        random_3m.save(tmp_path / "ck", dtype=dtype)
    assert not (tmp_path / "ck").exists()


def test_save_refuses_metadata_json_cannot_hold(random_3m, tmp_path):
    with pytest.raises(ValueError, match=r"\['n'\].*JSON.*int64"):
        random_3m.save(tmp_path / "ck", metadata={"n": np.int64(3)})
    assert not (tmp_path / "ck").exists()
    with pytest.raises(TypeError, match="metadata must be a dict"):
        random_3m.save(tmp_path / "ck", metadata=[("pooling", "mean")])
    model = XTrimoGene("xtrimo-3m")
    model.metadata = {"val_mse": np.float32(0.3)}  # the model's own metadata is checked too
    with pytest.raises(ValueError, match="JSON"):
        model.save(tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_failed_save_leaves_no_temporary_files_and_the_old_checkpoint(random_3m, tmp_path, monkeypatch):
    folder = random_3m.save(tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def fail():
        raise OSError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(_io, "reference_genes", fail)  # fails after the weights and config are written
        with pytest.raises(OSError, match="disk full"):
            XTrimoGene("xtrimo-3m").save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_interrupted_save_is_refused_not_mixed(random_3m, tmp_path):
    """A save killed between its renames leaves new weights beside the old config.json: the hash
    that config.json records tells them apart."""
    folder = random_3m.save(tmp_path / "ck")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["weights_sha256"] == _io.sha256_file(folder / "model.safetensors")
    torch.manual_seed(1)
    other = XTrimoGene("xtrimo-3m").save(tmp_path / "other")
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")  # the weights renamed, config not yet
    with pytest.raises(ValueError, match=r"config\.json was saved with a model\.safetensors of sha256.*different saves"):
        load(folder)
    shutil.copy(other / "config.json", folder / "config.json")  # the save completed
    assert load(folder).checkpoint_sha256 == cfg_hash(other)
    _edit_config(folder, lambda c: c.pop("weights_sha256"))  # files from before the hash was recorded
    assert load(folder).checkpoint_sha256 == cfg_hash(other)


def cfg_hash(folder):
    return json.loads((folder / "config.json").read_text())["weights_sha256"]


def test_unreadable_checkpoint_files_are_named(random_3m, tmp_path):
    good = random_3m.save(tmp_path / "good")
    wide = json.dumps({**json.loads((good / "config.json").read_text()), "enc_dim": "wide"}).encode()
    cases = [
        ("config.json", b"{not json"), ("config.json", b"[1, 2]"), ("config.json", wide),
        ("genes.txt", b"\xff\xfe" + (good / "genes.txt").read_bytes()),
        ("model.safetensors", (good / "model.safetensors").read_bytes()[:100_000]),
        ("model.safetensors", b"garbage" * 10),
    ]
    for name, content in cases:
        folder = tmp_path / "bad"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(good, folder)
        (folder / name).write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(folder / name))):
            load(folder)


def test_load_refuses_no_name_and_files_inside_a_checkpoint(random_3m, tmp_path):
    with pytest.raises(TypeError, match="None"):
        load(None)
    with pytest.raises(ValueError, match="empty"):
        load("")
    folder = random_3m.save(tmp_path / "ck")
    for name in ("model.safetensors", "config.json", "genes.txt"):
        with pytest.raises(ValueError, match=rf"inside the checkpoint folder.*{re.escape(str(folder))}"):
            load(folder / name)
