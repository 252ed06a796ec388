"""The authors' released checkpoint (scFoundation ``models.ckpt``): read, check, map.

The file is one PyTorch pickle holding three sub-models of the same architecture: ``cell``
(cell embeddings), ``rde`` (read-depth enhancement) and ``gene`` (gene-context embeddings and
expression). Each is ``{'config': ..., 'state_dict': ...}``; the architecture is read from the
config entries (``docs/scfoundation.md``, "Load or convert"), every tensor is checked
against the shapes those entries imply (section 2) and renamed to scxtrimo's modules.

The weights are under the non-commercial "scFoundation License": scxtrimo never ships them
or converted copies; users download the file themselves.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .._reference import N_GENES
from ._config import XTrimoGeneConfig
from ._xtrimogene import XTrimoGene

PARTS = ("cell", "rde", "gene")
#: What each sub-model is for (the authors' ``get_embedding.py`` keys).
PART_USES = {"cell": "cell embeddings", "rde": "cell embeddings, read-depth-enhancement model",
             "gene": "gene-context embeddings and expression prediction"}
PREFIX = "model."
#: The authors' builder sets every feed-forward width to 4 x the model width (not stored).
FF_MULT = 4
#: Counter of performer calls since the last redraw of the random features (a buffer).
REDRAW_COUNTER = "decoder.performer.calls_since_last_redraw"


class CheckpointError(ValueError):
    """The file is not an scFoundation checkpoint scxtrimo can use (the message says why)."""


# --------------------------------------------------------------------------------------------
# reading


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Unpickle the authors' file with PyTorch's restricted (weights-only) unpickler, on CPU.

    Zip-format files are memory-mapped, so only the tensors of the sub-model used are read
    from disk.

    Raises
    ------
    CheckpointError
        The file needs the unrestricted unpickler (it stores Python objects other than tensors
        and plain containers; unpickling those can run code from the file), is no PyTorch
        file, or is not a dict of sub-models.
    FileNotFoundError
        No such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file {path}.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only" not in text.lower() and "weights_only" not in text.lower():
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({text.splitlines()[0]}).") from None
        found = re.search(r"(?:Unsupported global|GLOBAL)[:\s]+(?:GLOBAL\s+)?([\w.]+)", text)
        what = f" (it needs {found.group(1)})" if found else ""
        msg = (
            f"{path} cannot be read with PyTorch's restricted unpickler (torch.load(weights_only=True)): "
            f"it stores Python objects other than tensors and plain containers{what}. scxtrimo never "
            "unpickles checkpoints with the unrestricted unpickler, because unpickling such objects can run "
            "code from the file. If the file came from anywhere but the authors' download link, re-download it; "
            "if you trust it, re-save it as plain dicts and tensors as the documentation page \"Use the authors' "
            "100M model\" shows, then load that copy."
        )
        raise CheckpointError(msg) from None
    except (OSError, MemoryError):
        raise
    except Exception as err:  # torch raises RuntimeError, KeyError, EOFError, ... for non-checkpoint bytes
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}).") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not the dict of sub-models {PARTS} "
                              "of scFoundation's models.ckpt.")
    return ckpt


def sub_model(ckpt: dict, part: str, *, where: str = "the checkpoint") -> tuple[dict, dict]:
    """``(flat config, state dict)`` of one sub-model.

    The config is the authors' flattening: the ``model_config[<model>]`` section, then the
    ``dataset_config['rnaseq']`` section on top. The state dict keeps the file's names (which
    start with ``'model.'``).
    """
    if part not in PARTS:
        raise ValueError(f"part={part!r}; choose one of {PARTS} ({', '.join(f'{p}: {u}' for p, u in PART_USES.items())}).")
    if part not in ckpt:
        raise CheckpointError(f"{where} has no sub-model {part!r}; its top-level keys are {sorted(map(str, ckpt))}. "
                              f"scFoundation's models.ckpt holds {PARTS}.")
    sub = ckpt[part]
    if not isinstance(sub, dict) or "config" not in sub or "state_dict" not in sub:
        keys = sorted(map(str, sub)) if isinstance(sub, dict) else type(sub).__name__
        raise CheckpointError(f"{where}: sub-model {part!r} should be a dict with 'config' and 'state_dict'; found {keys}.")
    config = sub["config"]
    try:
        model_type = config["model"]
        flat = {**config["model_config"][model_type], **config["dataset_config"]["rnaseq"]}
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{where}: the config of sub-model {part!r} lacks {err} (expected config['model'], "
                              "config['model_config'][model], config['dataset_config']['rnaseq']).") from None
    flat["model"] = model_type
    state = sub["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: the state_dict of sub-model {part!r} is a {type(state).__name__}, not a dict.")
    return flat, dict(state)


# --------------------------------------------------------------------------------------------
# configuration


def _entry(flat: dict, key: str, where: str):
    value = flat
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise CheckpointError(f"{where}: config entry {key!r} is missing; it fixes the architecture.")
        value = value[part]
    return value


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _int_entry(flat: dict, key: str, where: str, *, minimum: int = 1) -> int:
    value = _entry(flat, key, where)
    if not (_is_number(value) and float(value).is_integer() and value >= minimum):
        raise CheckpointError(f"{where}: config entry {key!r} = {value!r} should be an integer >= {minimum}.")
    return int(value)


def config_from_entries(flat: dict, *, name: str = "scfoundation", where: str = "the checkpoint") -> XTrimoGeneConfig:
    """The :class:`XTrimoGeneConfig` the authors' builder makes from a flat config (spec 3.1).

    Read: ``seq_len``, ``encoder.{hidden_dim, depth, heads, module_type}``,
    ``decoder.{hidden_dim, depth, heads, dim_head, module_type}``, ``bin_num``, ``bin_alpha``.
    Derived as the authors' code does: encoder head width ``hidden_dim / heads``; feed-forward
    width ``4 x hidden_dim`` in encoder and decoder; ``int(dim_head * ln dim_head)`` random
    features; post-norm ReLU encoder; depth tokens T and S (``seq_len = genes + 2``, gene
    embedding ``seq_len + 1`` rows); a LayerNorm before the ``d -> 1`` head. The Performer's key
    maximum is taken per cell (``key_max='cell'``), the authors' value for one cell per pass.

    Raises
    ------
    CheckpointError
        A missing or malformed entry, another model or module type, or a gene count other than
        the 19,264 reference genes.
    """
    model_type = flat.get("model")
    if model_type != "mae_autobin":
        raise CheckpointError(f"{where}: config['model'] is {model_type!r}; scxtrimo reads the 'mae_autobin' "
                              "(xTrimoGene) models of scFoundation only.")
    for side, kind in (("encoder", "transformer"), ("decoder", "performer")):
        found = _entry(flat, f"{side}.module_type", where)
        if found != kind:
            raise CheckpointError(f"{where}: {side}.module_type is {found!r}; the released xTrimoGene uses {kind!r}, "
                                  "the only kind scxtrimo maps.")
    seq_len = _int_entry(flat, "seq_len", where, minimum=3)
    if seq_len - 2 != N_GENES:
        raise CheckpointError(f"{where}: seq_len = {seq_len} means {seq_len - 2} genes plus T and S; scxtrimo's "
                              f"reference list (the authors' OS_scRNA_gene_index.19264.tsv) has {N_GENES}.")
    enc_dim, enc_heads = _int_entry(flat, "encoder.hidden_dim", where), _int_entry(flat, "encoder.heads", where)
    if enc_dim % enc_heads:
        raise CheckpointError(f"{where}: encoder.hidden_dim = {enc_dim} is not divisible by encoder.heads = {enc_heads}.")
    dim_head = _int_entry(flat, "decoder.dim_head", where, minimum=2)
    dec_dim, dec_heads = _int_entry(flat, "decoder.hidden_dim", where), _int_entry(flat, "decoder.heads", where)
    if dec_dim % dec_heads:
        raise CheckpointError(f"{where}: decoder.hidden_dim = {dec_dim} is not divisible by decoder.heads = {dec_heads}.")
    alpha = _entry(flat, "bin_alpha", where)
    if not _is_number(alpha):
        raise CheckpointError(f"{where}: config entry 'bin_alpha' = {alpha!r} should be a number.")
    return XTrimoGeneConfig(
        name=name, n_genes=seq_len - 2,
        enc_depth=_int_entry(flat, "encoder.depth", where), enc_heads=enc_heads, enc_dim=enc_dim, enc_ff_mult=FF_MULT,
        dec_depth=_int_entry(flat, "decoder.depth", where), dec_heads=dec_heads, dec_dim=dec_dim, dec_ff_mult=FF_MULT,
        n_bins=_int_entry(flat, "bin_num", where), autobin_alpha=float(alpha),
        nb_features=int(dim_head * math.log(dim_head)), dropout=0.0,
        enc_norm_first=False, enc_activation="relu", dec_dim_head=dim_head, out_norm=True, depth_tokens=True,
        key_max="cell",
    )


# --------------------------------------------------------------------------------------------
# tensors


@dataclass(frozen=True)
class Tensor:
    """One tensor of the authors' file: its name (prefix removed), scxtrimo's name, the shape
    the config implies and how the value is turned into scxtrimo's (``None``: as it is)."""

    theirs: str
    ours: str
    shape: tuple[int, ...]
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _row0(t: torch.Tensor) -> torch.Tensor:
    return t[0].clone()


def tensor_table(cfg: XTrimoGeneConfig) -> list[Tensor]:
    """Every tensor of a sub-model built from ``cfg``, in the authors' order (spec section 2).

    ``theirs`` lacks the file's ``'model.'`` prefix (:data:`PREFIX`).
    """
    e, d, b = cfg.enc_dim, cfg.dec_dim, cfg.n_bins
    inner = cfg.dec_heads * cfg.dec_dim_head
    fe, fd = cfg.enc_ff_mult * e, cfg.dec_ff_mult * d
    rows = [
        Tensor("token_emb.mlp.weight", "value_embedding.w1.weight", (b, 1)),
        Tensor("token_emb.mlp.bias", "value_embedding.w1.bias", (b,)),
        Tensor("token_emb.mlp2.weight", "value_embedding.w2.weight", (b, b)),
        Tensor("token_emb.mlp2.bias", "value_embedding.w2.bias", (b,)),
        Tensor("token_emb.emb.weight", "value_embedding.table.weight", (b, e), _transpose),
        Tensor("token_emb.emb_mask.weight", "mask_token", (1, e), _row0),
        Tensor("token_emb.emb_pad.weight", "pad_token", (1, e), _row0),
        Tensor("pos_emb.weight", "gene_embedding.weight", (cfg.n_embeddings, e)),
    ]
    for i in range(cfg.enc_depth):
        a, o = f"encoder.transformer_encoder.{i}.", f"encoder.blocks.{i}."
        rows += [
            Tensor(a + "self_attn.in_proj_weight", o + "qkv.weight", (3 * e, e)),
            Tensor(a + "self_attn.in_proj_bias", o + "qkv.bias", (3 * e,)),
            Tensor(a + "self_attn.out_proj.weight", o + "out.weight", (e, e)),
            Tensor(a + "self_attn.out_proj.bias", o + "out.bias", (e,)),
            Tensor(a + "linear1.weight", o + "ff.0.weight", (fe, e)),
            Tensor(a + "linear1.bias", o + "ff.0.bias", (fe,)),
            Tensor(a + "linear2.weight", o + "ff.3.weight", (e, fe)),
            Tensor(a + "linear2.bias", o + "ff.3.bias", (e,)),
        ] + [Tensor(a + f"{n}.{w}", o + f"{n}.{w}", (e,)) for n in ("norm1", "norm2") for w in ("weight", "bias")]
    rows += [Tensor(f"encoder.norm.{w}", f"encoder.norm.{w}", (e,)) for w in ("weight", "bias")]
    rows += [Tensor("decoder_embed.weight", "decoder_proj.weight", (d, e)),
             Tensor("decoder_embed.bias", "decoder_proj.bias", (d,))]
    for i in range(cfg.dec_depth):
        p = f"decoder.performer.net.layers.{i}."
        same = [
            ("0.norm.weight", (d,)), ("0.norm.bias", (d,)),
            ("0.fn.fast_attention.projection_matrix", (cfg.nb_features, cfg.dec_dim_head)),
            ("0.fn.to_q.weight", (inner, d)), ("0.fn.to_q.bias", (inner,)),
            ("0.fn.to_k.weight", (inner, d)), ("0.fn.to_k.bias", (inner,)),
            ("0.fn.to_v.weight", (inner, d)), ("0.fn.to_v.bias", (inner,)),
            ("0.fn.to_out.weight", (d, inner)), ("0.fn.to_out.bias", (d,)),
            ("1.norm.weight", (d,)), ("1.norm.bias", (d,)),
            ("1.fn.fn.w1.weight", (fd, d)), ("1.fn.fn.w1.bias", (fd,)),
            ("1.fn.fn.w2.weight", (d, fd)), ("1.fn.fn.w2.bias", (d,)),
        ]
        rows += [Tensor(p + n, p + n, s) for n, s in same]
    rows += [
        Tensor(REDRAW_COUNTER, "decoder.performer.proj_updater.calls_since_last_redraw", ()),
        Tensor("decoder.norm.weight", "decoder.norm.weight", (d,)),
        Tensor("decoder.norm.bias", "decoder.norm.bias", (d,)),
        Tensor("norm.weight", "out_norm.weight", (d,)),
        Tensor("norm.bias", "out_norm.bias", (d,)),
        Tensor("to_final.weight", "head.weight", (1, d)),
        Tensor("to_final.bias", "head.bias", (1,)),
    ]
    return rows


def _describe(cfg: XTrimoGeneConfig) -> str:
    return (f"encoder {cfg.enc_depth} layers x {cfg.enc_dim} wide, {cfg.enc_heads} heads; decoder {cfg.dec_depth} layers x "
            f"{cfg.dec_dim} wide, {cfg.dec_heads} heads of {cfg.dec_dim_head}, {cfg.nb_features} random features; "
            f"{cfg.n_bins} bins")


def check_tensors(state: dict, cfg: XTrimoGeneConfig, *, where: str = "the checkpoint") -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected, mis-shaped or non-tensor entry.

    ``state`` has the file's names (``'model.'`` + the names of :func:`tensor_table`).
    """
    table = {PREFIX + t.theirs: t for t in tensor_table(cfg)}
    missing = [k for k in table if k not in state]
    unexpected = sorted(str(k) for k in state if k not in table)
    wrong, kind = [], []
    for k, v in state.items():
        if k not in table:
            continue
        if not isinstance(v, torch.Tensor):
            kind.append(f"{k} is a {type(v).__name__}")
        elif tuple(v.shape) != table[k].shape:
            wrong.append(f"{k} {tuple(v.shape)}, expected {table[k].shape}")
        elif (k == PREFIX + REDRAW_COUNTER) == v.is_floating_point():
            kind.append(f"{k} has dtype {v.dtype}")
    if missing or unexpected or wrong or kind:
        parts = [f"{label} ({len(items)}): {items[:8]}{' ...' if len(items) > 8 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                                      ("wrong type", kind)) if items]
        msg = (f"{where} does not match the architecture its config describes ({_describe(cfg)}): "
               + "; ".join(parts) + ". The file is damaged or not the released xTrimoGene; re-download it.")
        raise CheckpointError(msg)


def convert_state(state: dict, cfg: XTrimoGeneConfig) -> dict:
    """scxtrimo's state dict (float32 floating tensors) from a checked authors' state dict."""
    out = {}
    for t in tensor_table(cfg):
        v = state[PREFIX + t.theirs]
        v = t.convert(v) if t.convert is not None else v
        out[t.ours] = v.float() if v.is_floating_point() else v
    return out


def model_from_checkpoint(ckpt: dict, part: str, *, where: str = "the checkpoint",
                          model: XTrimoGene | None = None) -> XTrimoGene:
    """Build the scxtrimo model of one sub-model of the authors' checkpoint dict.

    ``model``: an already built :class:`XTrimoGene` to fill (its configuration, the name aside,
    must be the one the file describes), e.g. one made on the ``meta`` device.

    Raises
    ------
    CheckpointError
        See :func:`sub_model`, :func:`config_from_entries` and :func:`check_tensors`.
    ValueError
        ``part`` is not ``'cell'``, ``'rde'`` or ``'gene'``.
    """
    from ._io import load_state_strict

    where = f"{where} [{part}]"
    flat, state = sub_model(ckpt, part, where=where)
    cfg = config_from_entries(flat, name=f"scfoundation-{part}", where=where)
    check_tensors(state, cfg, where=where)
    if model is None:
        model = XTrimoGene(cfg)
    elif dataclasses.replace(model.config, name=cfg.name) != cfg:
        raise ValueError(f"The model given has configuration {model.config}, but {where} describes {cfg}.")
    load_state_strict(model, convert_state(state, cfg), name=where)
    return model


def load_scfoundation(path: str | os.PathLike, *, part: str = "cell", device: str | torch.device = "cpu") -> XTrimoGene:
    """One sub-model of the authors' ``models.ckpt`` as an :class:`XTrimoGene` in eval mode.

    ``checkpoint_name`` is ``'<file name>:<part>'``, ``checkpoint_sha256`` the file's sha256;
    ``metadata`` records the source (file name, part, sha256, licence).
    """
    from ._io import sha256_file

    path = Path(path)
    if part not in PARTS:
        raise ValueError(f"part={part!r}; choose one of {PARTS} ({', '.join(f'{p}: {u}' for p, u in PART_USES.items())}).")
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, part, where=str(path))
    del ckpt
    digest = sha256_file(path)
    model.checkpoint_name = f"{path.name}:{part}"
    model.checkpoint_sha256 = digest
    model.metadata = {
        "source": "scFoundation models.ckpt (biomap-research/scFoundation)",
        "source_file": path.name,
        "source_part": part,
        "source_sha256": digest,
        "licence": "The scFoundation License: non-commercial research use only; do not redistribute the weights "
                   "or converted copies.",
    }
    return model.to(device).eval()
