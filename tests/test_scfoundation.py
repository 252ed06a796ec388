"""The authors' released checkpoint (scFoundation ``models.ckpt``): reading, mapping, exact forward pass.

Checkpoints are built here in the authors' file format (``shared/specs/scfoundation-checkpoint.md``
sections 1-3) with random weights: at the released 100M shapes on the meta device (nothing
allocated) and at a reduced width and depth with the same structure. The reference forward pass
below is written from the spec (sections 4-8) independently of scxtrimo's modules: torch's
``nn.TransformerEncoderLayer`` for the encoder, the Performer formulas by hand for the decoder.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scanpy as sc
import torch
import torch.nn.functional as F
from torch import nn

import scxtrimo
from scxtrimo.cli import main
from scxtrimo.models import XTrimoGene, load
from scxtrimo.models import _scfoundation as sf

N = 19_264  # reference genes
SEQ = N + 2  # genes, T, S
BINS = 100
RELEASED = dict(enc=768, enc_layers=12, enc_heads=12, dec=512, dec_layers=6, dec_heads=8, dim_head=64)
REDUCED = dict(enc=64, enc_layers=2, enc_heads=4, dec=32, dec_layers=2, dec_heads=4, dim_head=8)
N_CELLS = 12  # cells compared with the reference pass


# ---------------------------------------------------------------------------------------------
# the authors' file format (spec sections 1-3), written out


def authors_shapes(enc, enc_layers, enc_heads, dec, dec_layers, dec_heads, dim_head) -> dict:
    """Every tensor of one sub-model, names with the file's 'model.' prefix (spec section 2)."""
    nb = int(dim_head * math.log(dim_head))
    inner = dec_heads * dim_head
    s = {
        "token_emb.mlp.weight": (BINS, 1), "token_emb.mlp.bias": (BINS,),
        "token_emb.mlp2.weight": (BINS, BINS), "token_emb.mlp2.bias": (BINS,),
        "token_emb.emb.weight": (BINS, enc), "token_emb.emb_mask.weight": (1, enc), "token_emb.emb_pad.weight": (1, enc),
        "pos_emb.weight": (SEQ + 1, enc),
    }
    for i in range(enc_layers):
        p = f"encoder.transformer_encoder.{i}."
        s.update({p + "self_attn.in_proj_weight": (3 * enc, enc), p + "self_attn.in_proj_bias": (3 * enc,),
                  p + "self_attn.out_proj.weight": (enc, enc), p + "self_attn.out_proj.bias": (enc,),
                  p + "linear1.weight": (4 * enc, enc), p + "linear1.bias": (4 * enc,),
                  p + "linear2.weight": (enc, 4 * enc), p + "linear2.bias": (enc,),
                  p + "norm1.weight": (enc,), p + "norm1.bias": (enc,), p + "norm2.weight": (enc,), p + "norm2.bias": (enc,)})
    s.update({"encoder.norm.weight": (enc,), "encoder.norm.bias": (enc,),
              "decoder_embed.weight": (dec, enc), "decoder_embed.bias": (dec,)})
    for i in range(dec_layers):
        p = f"decoder.performer.net.layers.{i}."
        s.update({p + "0.norm.weight": (dec,), p + "0.norm.bias": (dec,),
                  p + "0.fn.fast_attention.projection_matrix": (nb, dim_head)})
        for w in ("to_q", "to_k", "to_v"):
            s.update({p + f"0.fn.{w}.weight": (inner, dec), p + f"0.fn.{w}.bias": (inner,)})
        s.update({p + "0.fn.to_out.weight": (dec, inner), p + "0.fn.to_out.bias": (dec,),
                  p + "1.norm.weight": (dec,), p + "1.norm.bias": (dec,),
                  p + "1.fn.fn.w1.weight": (4 * dec, dec), p + "1.fn.fn.w1.bias": (4 * dec,),
                  p + "1.fn.fn.w2.weight": (dec, 4 * dec), p + "1.fn.fn.w2.bias": (dec,)})
    s.update({"decoder.performer.calls_since_last_redraw": (), "decoder.norm.weight": (dec,), "decoder.norm.bias": (dec,),
              "norm.weight": (dec,), "norm.bias": (dec,), "to_final.weight": (1, dec), "to_final.bias": (1,)})
    return {"model." + k: v for k, v in s.items()}


def authors_config(enc, enc_layers, enc_heads, dec, dec_layers, dec_heads, dim_head) -> dict:
    """The nested config; seq_len sits in the rnaseq section, which the authors lay over the model section."""
    model = {
        "encoder": {"hidden_dim": enc, "depth": enc_layers, "heads": enc_heads, "dim_head": 64, "module_type": "transformer"},
        "decoder": {"hidden_dim": dec, "depth": dec_layers, "heads": dec_heads, "dim_head": dim_head,
                    "module_type": "performer"},
        "n_class": 104, "pad_token_id": 103, "mask_token_id": 102, "bin_num": BINS, "bin_alpha": 1.0,
        "seq_len": 16_907, "mask_gene_name": False, "decoder_add_zero": True, "norm_first": False,
    }
    rnaseq = {"seq_len": SEQ, "bin_type": "auto_bin", "rawcount": True, "mask_prob": 0.3, "mask_ignore_token_ids": [0]}
    return {"model": "mae_autobin", "model_config": {"mae_autobin": model}, "dataset_config": {"rnaseq": rnaseq}}


def random_tensor(name: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    if name.endswith("calls_since_last_redraw"):
        return torch.tensor(17)
    if ".norm" in name or "norm1" in name or "norm2" in name or name.startswith("model.norm"):
        base = 1.0 if name.endswith("weight") else 0.0
        return base + 0.1 * torch.randn(shape, generator=g)
    if "emb" in name and "decoder_embed" not in name or "projection_matrix" in name:
        return torch.randn(shape, generator=g)
    fan_in = shape[-1] if len(shape) == 2 else shape[0]
    return torch.randn(shape, generator=g) * fan_in**-0.5


def authors_file(dims: dict, *, seed: int = 0, device: str = "cpu") -> dict:
    """``{'cell', 'rde', 'gene'}`` sub-models with different random weights (plain dicts and tensors)."""
    shapes = authors_shapes(**dims)
    out = {}
    for k, part in enumerate(sf.PARTS):
        g = torch.Generator().manual_seed(seed + k)
        if device == "meta":
            state = {n: torch.empty(s, device="meta", dtype=torch.int64 if s == () else torch.float32)
                     for n, s in shapes.items()}
        else:
            state = {n: random_tensor(n, s, g) for n, s in shapes.items()}
        out[part] = {"config": authors_config(**dims), "state_dict": state, "epoch": 3}
    return out


class Opaque:
    """A custom class in a checkpoint: only the unrestricted unpickler could rebuild it."""

    def __reduce__(self):
        return (Opaque, ())


@pytest.fixture(scope="module")
def ckpt_dict():
    return authors_file(REDUCED)


@pytest.fixture(scope="module")
def ckpt_path(ckpt_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("scf") / "models.ckpt"
    torch.save(ckpt_dict, path)
    return path


@pytest.fixture(scope="module")
def cell_model(ckpt_path):
    return load(ckpt_path, part="cell")


@pytest.fixture(scope="module")
def gene_model(ckpt_path):
    return load(ckpt_path, part="gene")


# ---------------------------------------------------------------------------------------------
# the reference forward pass (spec sections 4-8), independent of scxtrimo's modules


class Reference:
    """One sub-model's forward pass from its state dict, one cell at a time."""

    def __init__(self, state: dict, dims: dict):
        self.sd = {k.removeprefix("model."): v.float() for k, v in state.items()}
        self.dims = dims
        e, h = dims["enc"], dims["enc_heads"]
        self.layers = []
        for i in range(dims["enc_layers"]):
            layer = nn.TransformerEncoderLayer(e, h, dim_feedforward=4 * e, dropout=0.0, activation="relu",
                                               batch_first=True, norm_first=False, layer_norm_eps=1e-5)
            p = f"encoder.transformer_encoder.{i}."
            layer.load_state_dict({k[len(p):]: v for k, v in self.sd.items() if k.startswith(p)})
            self.layers.append(layer.eval())

    def ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.sd[name + ".weight"], self.sd[name + ".bias"], eps=1e-5)

    def value_embedding(self, v):  # (n,) -> (n, e), section 7
        sd = self.sd
        h = F.leaky_relu(v[:, None] * sd["token_emb.mlp.weight"][:, 0] + sd["token_emb.mlp.bias"], 0.1)
        z = 1.0 * h + (h @ sd["token_emb.mlp2.weight"].T + sd["token_emb.mlp2.bias"])
        return torch.softmax(z, -1) @ sd["token_emb.emb.weight"]

    def encode(self, vec):  # section 5 steps 1-3
        idx = torch.nonzero(vec > 0).ravel()
        x = (self.value_embedding(vec[idx]) + self.sd["pos_emb.weight"][idx])[None]
        with torch.no_grad():
            for layer in self.layers:
                x = layer(x)
        return self.ln(x[0], "encoder.norm"), idx

    def cell(self, vec, pooling):  # section 5 step 4
        h, idx = self.encode(vec)
        if pooling == "max":
            return h.max(0).values
        if pooling == "mean":
            return h.mean(0)
        genes = h[idx < N]
        return torch.cat([h[idx == N + 1][0], h[idx == N][0], genes.max(0).values, genes.mean(0)])

    def performer_attention(self, y, p):  # section 8, one cell: M over the whole key tensor
        sd, heads, dh = self.sd, self.dims["dec_heads"], self.dims["dim_head"]
        proj = sd[p + "fast_attention.projection_matrix"]
        c, r = dh**-0.25, proj.shape[0] ** -0.5
        q, k, v = ((y @ sd[p + f"{w}.weight"].T + sd[p + f"{w}.bias"]).view(-1, heads, dh).transpose(0, 1)
                   for w in ("to_q", "to_k", "to_v"))  # (h, n, dh)
        uq, uk = (c * q) @ proj.T, (c * k) @ proj.T  # (h, n, m)
        sq, sk = c * c * (q * q).sum(-1, keepdim=True) / 2, c * c * (k * k).sum(-1, keepdim=True) / 2
        qf = r * (torch.exp(uq - sq - uq.max(-1, keepdim=True).values) + 1e-4)
        kf = r * (torch.exp(uk - sk - uk.max()) + 1e-4)
        out = (qf @ (kf.transpose(1, 2) @ v)) / (qf @ kf.sum(1)[..., None])  # (h, n, dh)
        return out.transpose(0, 1).reshape(y.shape[0], -1) @ sd[p + "to_out.weight"].T + sd[p + "to_out.bias"]

    def gene(self, vec):  # section 6: (N, d) context embeddings, (N,) predictions
        sd = self.sd
        h, idx = self.encode(vec)
        x = self.value_embedding(vec)
        x[idx] = h
        x = x + sd["pos_emb.weight"][:SEQ]
        x = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
        for i in range(self.dims["dec_layers"]):
            p = f"decoder.performer.net.layers.{i}."
            x = x + self.performer_attention(self.ln(x, p + "0.norm"), p + "0.fn.")
            f = F.gelu(self.ln(x, p + "1.norm") @ sd[p + "1.fn.fn.w1.weight"].T + sd[p + "1.fn.fn.w1.bias"])
            x = x + f @ sd[p + "1.fn.fn.w2.weight"].T + sd[p + "1.fn.fn.w2.bias"]
        x = self.ln(self.ln(x, "decoder.norm"), "norm")[:N]
        return x, (x @ sd["to_final.weight"].T + sd["to_final.bias"])[:, 0]


@pytest.fixture(scope="module")
def cells(pbmc3k_session):
    """The first cells of pbmc3k (raw counts) and their model input by spec section 4 (T = 4)."""
    adata = pbmc3k_session[:N_CELLS].copy()
    counts = (pd.DataFrame(adata.X.toarray(), columns=adata.var_names)
              .reindex(columns=scxtrimo.reference_genes(), fill_value=0).to_numpy(np.float64))
    total = counts.sum(1)
    x = np.log1p(1e4 * counts / total[:, None])
    vec = np.concatenate([x, np.full((N_CELLS, 1), 4.0), np.log10(total)[:, None]], axis=1)
    return adata, torch.from_numpy(vec.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# format and mapping


def test_released_shapes_map_exactly_on_meta(monkeypatch):
    ckpt = authors_file(RELEASED, device="meta")
    state = ckpt["cell"]["state_dict"]
    params = sum(math.prod(s.shape) for k, s in state.items() if "projection_matrix" not in k and "calls_since" not in k)
    assert len(state) == 265 and params == 119_252_285  # spec section 2 totals
    flat, _ = sf.sub_model(ckpt, "cell")
    cfg = sf.config_from_entries(flat)
    assert (cfg.enc_depth, cfg.enc_heads, cfg.enc_dim, cfg.enc_ff_mult) == (12, 12, 768, 4)
    assert (cfg.dec_depth, cfg.dec_heads, cfg.dec_dim, cfg.dec_dim_head, cfg.dec_ff_mult) == (6, 8, 512, 64, 4)
    assert (cfg.nb_features, cfg.n_positions, cfg.n_embeddings) == (266, 19_266, 19_267)
    assert not cfg.enc_norm_first and cfg.enc_activation == "relu" and cfg.out_norm and cfg.key_max == "cell"
    # performer-pytorch draws its random features with a CPU QR; on meta there is nothing to draw
    import performer_pytorch.performer_pytorch as pp

    monkeypatch.setattr(pp, "gaussian_orthogonal_random_matrix",
                        lambda nb_rows, nb_columns, scaling=0, device=None: torch.empty(nb_rows, nb_columns, device=device))
    with torch.device("meta"):
        model = XTrimoGene(cfg)
    assert model.gene_embedding.weight.is_meta
    sf.model_from_checkpoint(ckpt, "cell", model=model)  # every key maps, every shape fits, strictly
    assert model.n_parameters() == params
    mapped = sf.convert_state(state, cfg)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {
        k: tuple(v.shape) for k, v in scxtrimo.models._io.canonical_state(model).items()}


def test_reduced_file_loads_with_its_config_and_sha256(ckpt_path, cell_model, gene_model):
    cfg = cell_model.config
    assert (cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, cfg.dec_dim_head,
            cfg.nb_features) == (64, 2, 4, 32, 2, 4, 8, 16)
    digest = hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    assert cell_model.checkpoint_sha256 == gene_model.checkpoint_sha256 == digest
    assert cell_model.checkpoint_name == "models.ckpt:cell" and gene_model.metadata["source_part"] == "gene"
    assert not cell_model.training
    ours = cell_model.value_embedding.table.weight
    assert not torch.equal(ours, gene_model.value_embedding.table.weight)  # the parts differ
    theirs = torch.load(ckpt_path, weights_only=True)["cell"]["state_dict"]
    torch.testing.assert_close(ours, theirs["model.token_emb.emb.weight"].T, rtol=0, atol=0)
    torch.testing.assert_close(cell_model.mask_token, theirs["model.token_emb.emb_mask.weight"][0], rtol=0, atol=0)


def test_tampered_files_are_refused_and_leave_adata_untouched(ckpt_dict, tmp_path, pbmc3k):
    def saved(obj, name):
        path = tmp_path / name
        torch.save(obj, path)
        return path

    def variant(edit):
        ckpt = {p: {"config": v["config"], "state_dict": dict(v["state_dict"])} for p, v in ckpt_dict.items()}
        edit(ckpt["cell"]["state_dict"])
        return ckpt

    cases = {
        "removed": (variant(lambda s: s.pop("model.encoder.transformer_encoder.1.linear2.bias")),
                    r"missing \(1\): \['model.encoder.transformer_encoder.1.linear2.bias'\]"),
        "shape": (variant(lambda s: s.update({"model.pos_emb.weight": torch.zeros(19_266, 64)})),
                  r"model.pos_emb.weight \(19266, 64\), expected \(19267, 64\)"),
        "extra": (variant(lambda s: s.update({"model.encoder.lm_head.weight": torch.zeros(3)})),
                  r"unexpected \(1\): \['model.encoder.lm_head.weight'\]"),
        "code": ({"cell": Opaque()}, r"restricted unpickler.*test_scfoundation.Opaque"),
    }
    small = pbmc3k[:5].copy()
    before = small.copy()
    for name, (obj, message) in cases.items():
        path = saved(obj, f"{name}.ckpt")
        with pytest.raises(ValueError, match=message):
            load(path)
        with pytest.raises(ValueError, match=message):
            scxtrimo.tl.embed(small, model=path, progress=False)
    config = variant(lambda s: None)
    del config["gene"]["config"]["model_config"]["mae_autobin"]["decoder"]["dim_head"]
    with pytest.raises(ValueError, match="'decoder.dim_head' is missing"):
        load(saved(config, "config.ckpt"), part="gene")
    with pytest.raises(ValueError, match="no sub-model 'rde'"):
        load(saved({"cell": ckpt_dict["cell"]}, "one.ckpt"), part="rde")
    with pytest.raises(ValueError, match="choose one of"):
        load(tmp_path / "removed.ckpt", part="genes")
    assert set(small.obsm) == set(before.obsm) and dict(small.uns) == dict(before.uns)
    assert (small.X != before.X).nnz == 0


# ---------------------------------------------------------------------------------------------
# the forward pass


@pytest.mark.parametrize("pooling", ["all", "max", "mean"])
def test_cell_embeddings_match_the_reference(ckpt_dict, cell_model, cells, pooling):
    adata, vec = cells
    ref = Reference(ckpt_dict["cell"]["state_dict"], REDUCED)
    expected = torch.stack([ref.cell(v, pooling) for v in vec]).numpy()
    one = adata.copy()
    scxtrimo.tl.embed(one, model=cell_model, pooling=pooling, batch_size=1, progress=False)
    np.testing.assert_allclose(one.obsm["X_xtrimo"], expected, rtol=0, atol=1e-5)
    batched = adata.copy()
    scxtrimo.tl.embed(batched, model=cell_model, pooling=pooling, batch_size=N_CELLS, max_tokens=10**6, progress=False)
    np.testing.assert_allclose(batched.obsm["X_xtrimo"], one.obsm["X_xtrimo"], rtol=0, atol=1e-5)
    params = one.uns["xtrimo"]["params"]
    assert params["sha256"] == cell_model.checkpoint_sha256 and params["target_depth"] == 4.0


def test_gene_context_matches_the_reference_one_cell_or_batched(ckpt_dict, ckpt_path, gene_model, cells):
    adata, vec = cells
    ref = Reference(ckpt_dict["gene"]["state_dict"], REDUCED)
    genes = ["CD3E", "MS4A1", "LYZ", "A1BG", "NKG7"]  # A1BG: not expressed in these cells
    sel = scxtrimo.reference_genes().get_indexer(genes)
    out = adata.copy()
    scxtrimo.tl.gene_embed(out, model=gene_model, genes=genes, progress=False)
    assert out.obsm["X_xtrimo_gene"].shape == (N_CELLS, 5, 32) and out.obsm["X_xtrimo_gene"].dtype == np.float32
    for i in range(4):
        states, pred = ref.gene(vec[i])
        np.testing.assert_allclose(out.obsm["X_xtrimo_gene"][i], states[sel].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(out.obsm["X_xtrimo_gene_expression"][i], pred[sel].numpy(), rtol=0, atol=1e-4)
    batched = scxtrimo.tl.gene_embed(adata, model=gene_model, genes=genes, batch_size=5, progress=False, copy=True)
    np.testing.assert_allclose(batched.obsm["X_xtrimo_gene"], out.obsm["X_xtrimo_gene"], rtol=0, atol=1e-5)
    assert list(out.uns["X_xtrimo_gene"]["genes"]) == genes
    assert out.uns["xtrimo"]["gene_embed"]["sha256"] == gene_model.checkpoint_sha256
    assert "X_xtrimo_gene" not in adata.obsm  # copy=True left the input alone

    from_file = scxtrimo.tl.gene_embed(adata[:2], model=ckpt_path, genes=genes, progress=False,
                                       copy=True)  # a file path: its gene sub-model
    np.testing.assert_array_equal(from_file.obsm["X_xtrimo_gene"], out.obsm["X_xtrimo_gene"][:2])

    grouped = adata.copy()
    grouped.obs["half"] = pd.Categorical(["a"] * 7 + ["b"] * (N_CELLS - 8) + [None])
    scxtrimo.tl.gene_embed(grouped, model=gene_model, genes=genes, groupby="half", progress=False)
    entry = grouped.uns["X_xtrimo_gene"]
    assert list(entry["groups"]) == ["a", "b"] and list(entry["n_cells"]) == [7, N_CELLS - 8]
    np.testing.assert_allclose(entry["embedding"][1], out.obsm["X_xtrimo_gene"][7:-1].mean(0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(entry["expression"][0], out.obsm["X_xtrimo_gene_expression"][:7].mean(0), atol=1e-5)


def test_padding_never_changes_a_real_tokens_output(gene_model, cells):
    _, vec = cells
    lengths = (vec > 0).sum(1)
    assert len(set(lengths.tolist())) > 3  # cells of different lengths share the batches below
    from scxtrimo.data._batching import select_tokens

    with torch.inference_mode():
        batch, _ = select_tokens(vec[:6] > 0, vec[:6])
        together = gene_model.encode(batch)
        states, pred = gene_model.gene_context(vec[:6])
        for i in range(6):
            alone, _ = select_tokens(vec[i : i + 1] > 0, vec[i : i + 1])
            n = int(lengths[i])
            torch.testing.assert_close(together[i, :n], gene_model.encode(alone)[0], rtol=0, atol=1e-5)
            s1, p1 = gene_model.gene_context(vec[i : i + 1])
            torch.testing.assert_close(states[i], s1[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(pred[i], p1[0], rtol=0, atol=1e-5)


def test_gene_embed_argument_errors_leave_adata_untouched(gene_model, cells):
    adata, _ = cells
    small = adata[:3].copy()
    with pytest.raises(ValueError, match="choose genes="):
        scxtrimo.tl.gene_embed(small, model=gene_model, progress=False)
    with pytest.raises(KeyError, match="not in the 19,264-gene reference"):
        scxtrimo.tl.gene_embed(small, model=gene_model, genes=["CD3E", "NOT_A_GENE"], progress=False)
    with pytest.raises(KeyError, match="not a column"):
        scxtrimo.tl.gene_embed(small, model=gene_model, groupby="nope", progress=False)
    assert not small.obsm and "X_xtrimo_gene" not in small.uns


def test_gene_embed_never_leaves_results_labelled_with_other_genes(gene_model, cells):
    adata, _ = cells
    small = adata[:4].copy()
    small.uns["xtrimo"] = {"params": {"pooling": "mean"}}
    scxtrimo.tl.gene_embed(small, model=gene_model, genes=["CD3E", "MS4A1"], progress=False)
    small.obs["g"] = "x"
    scxtrimo.tl.gene_embed(small, model=gene_model, genes=["LYZ"], groupby="g", progress=False)
    # the per-cell results of CD3E and MS4A1 are gone, not left beside a gene list that says LYZ
    assert "X_xtrimo_gene" not in small.obsm and "X_xtrimo_gene_expression" not in small.obsm
    assert list(small.uns["X_xtrimo_gene"]["genes"]) == ["LYZ"]
    scxtrimo.tl.gene_embed(small, model=gene_model, genes=["NKG7"], progress=False)
    assert small.obsm["X_xtrimo_gene"].shape[1] == 1 and "embedding" not in small.uns["X_xtrimo_gene"]
    assert small.uns["xtrimo"]["params"] == {"pooling": "mean"}  # embed's record is kept
    before = (sorted(small.obsm), sorted(small.uns))
    with pytest.raises(ValueError, match="key_added='xtrimo'"):
        scxtrimo.tl.gene_embed(small, model=gene_model, genes=["NKG7"], key_added="xtrimo", progress=False)
    with pytest.raises(TypeError, match="genes"):
        scxtrimo.tl.gene_embed(small, model=gene_model, genes=5, progress=False)
    with pytest.raises(TypeError, match="groupby"):
        scxtrimo.tl.gene_embed(small, model=gene_model, genes=["NKG7"], groupby=["g"], progress=False)
    assert (sorted(small.obsm), sorted(small.uns)) == before


# ---------------------------------------------------------------------------------------------
# conversion and bulk input


def test_convert_writes_a_checkpoint_folder_with_the_same_outputs(ckpt_path, gene_model, cells, tmp_path, capsys):
    out = tmp_path / "scf-gene"
    assert main(["convert", str(ckpt_path), str(out), "--part", "gene"]) == 0
    assert "non-commercial" in capsys.readouterr().out
    folder = load(out)
    assert folder.config == gene_model.config and folder.metadata["source_sha256"] == gene_model.checkpoint_sha256
    _, vec = cells
    with torch.inference_mode():
        for a, b in zip(folder.gene_context(vec[:2]), gene_model.gene_context(vec[:2])):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    adata = cells[0][:3].copy()
    scxtrimo.tl.embed(adata, model=out, pooling="all", progress=False)
    assert adata.uns["xtrimo"]["params"]["source_sha256"] == gene_model.checkpoint_sha256


def test_bulk_input_follows_the_authors_conventions(ckpt_dict, cell_model, cells):
    adata, _ = cells
    ref = Reference(ckpt_dict["cell"]["state_dict"], REDUCED)
    counts = (pd.DataFrame(adata.X.toarray(), columns=adata.var_names)
              .reindex(columns=scxtrimo.reference_genes(), fill_value=0).to_numpy(np.float64))
    total = counts.sum(1)
    logged = np.log1p(counts / total[:, None] * np.median(total))
    # the authors' raw-bulk normalization is scanpy's normalize_total(target_sum=None) + log1p
    scanpy = sc.AnnData(counts.astype(np.float32))
    sc.pp.normalize_total(scanpy)
    sc.pp.log1p(scanpy)
    np.testing.assert_allclose(scanpy.X, logged, rtol=1e-5, atol=1e-5)
    for bulk, values, depth in (("counts", logged, np.log10(logged.sum(1))),
                                ("normalized", np.log1p(counts), np.log1p(counts).sum(1))):
        vec = torch.from_numpy(np.concatenate([values, depth[:, None], depth[:, None]], 1).astype(np.float32))
        expected = torch.stack([ref.cell(v, "all") for v in vec]).numpy()
        data = adata.copy()
        if bulk == "normalized":
            data.X = data.X.log1p()
        # single cells fed as bulk: the conventions still hold, with a warning that they are cells
        with pytest.warns(UserWarning, match="reference genes, as single cells do"):
            scxtrimo.tl.embed(data, model=cell_model, pooling="all", bulk=bulk, progress=False)
        np.testing.assert_allclose(data.obsm["X_xtrimo"], expected, rtol=0, atol=1e-5)
        params = data.uns["xtrimo"]["params"]
        assert params["input"] == f"bulk-{bulk}" and "target_depth" not in params
        assert params.get("bulk_target_sum", np.median(total)) == pytest.approx(np.median(total))
    normalized = scxtrimo.pp.align_genes(adata, copy=True)
    scxtrimo.pp.normalize(normalized, target_sum=None)
    np.testing.assert_allclose(normalized.X.toarray(), logged, rtol=1e-6, atol=1e-6)
    assert normalized.uns["xtrimo"]["normalize"]["target_sum_rule"] == "median"
    with pytest.raises(ValueError, match="bulk='rna'; choose"):
        scxtrimo.tl.embed(adata.copy(), model=cell_model, bulk="rna", progress=False)


def test_bulk_warns_for_single_cells_only(cell_model, gene_model, pbmc3k_session):
    """Pseudo-bulk samples of pbmc3k (the counts of 600 cells summed) express most reference
    genes and embed without a warning; single cells passed as bulk are warned about."""
    groups = np.arange(pbmc3k_session.n_obs) // 600
    summing = sp.csr_matrix((np.ones(len(groups)), (groups, np.arange(len(groups)))))
    pseudo = ad.AnnData(sp.csr_matrix(summing @ pbmc3k_session.X), var=pbmc3k_session.var[[]])
    assert np.median(np.diff(scxtrimo.pp.align_genes(pseudo).X.indptr)) > 10_000  # as bulk libraries do
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scxtrimo.tl.embed(pseudo, model=cell_model, bulk="counts", progress=False)
    assert pseudo.obsm["X_xtrimo"].shape[0] == pseudo.n_obs and np.isfinite(pseudo.obsm["X_xtrimo"]).all()
    cells = pbmc3k_session[:50].copy()
    with pytest.warns(UserWarning, match=r"median of \d+ reference genes, as single cells do.*drop bulk="):
        scxtrimo.tl.gene_embed(cells, model=gene_model, genes=["LYZ"], bulk="counts", progress=False)
