"""Checkpoints: a folder with ``config.json``, ``model.safetensors`` and ``genes.txt``.

``genes.txt`` is the ordered gene list the gene embedding was trained on; loading refuses a
checkpoint whose list differs from the package's reference list, or whose tensors do not match
the configuration exactly (strict loading). :func:`load` also reads the authors' released
scFoundation file (``models.ckpt``, see :mod:`scxtrimo.models._scfoundation`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._bundled import BUNDLED, DEFAULT_CHECKPOINT
from .._reference import reference_genes
from . import _registry
from ._config import XTrimoGeneConfig
from ._xtrimogene import XTrimoGene

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENES_FILE = "genes.txt"
FORMAT_VERSION = 1
#: ``config.json`` entry with the sha256 of the ``model.safetensors`` saved with it (optional:
#: files written before it existed, and the bundled checkpoint, lack it).
WEIGHTS_HASH = "weights_sha256"

#: Config fields added after format 1 was first written (76546aa: the released architecture's
#: switches; e99bf98: the decoder options), with the architecture the files without them hold.
#: Every other field, and ``format_version``, must be in ``config.json``.
ADDED_FIELDS = {
    "enc_norm_first": True, "enc_activation": "gelu", "dec_dim_head": None, "out_norm": False,
    "depth_tokens": False, "key_max": "head", "feature_redraw_interval": None, "decoder_zero_mass": None,
}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_ALIAS = ".proj_updater.instance."  # performer-pytorch keeps a second reference to its layers


def canonical_state(model: XTrimoGene) -> dict:
    """``state_dict`` without the aliases performer-pytorch's projection updater creates."""
    return {k: v for k, v in model.state_dict().items() if _ALIAS not in k}


def save(model: XTrimoGene, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> Path:
    """Write ``model`` to the folder ``path`` (created if missing); return the folder.

    Floating-point tensors are stored as ``dtype`` (``torch.float16`` halves the size).
    ``config.json`` records ``model.metadata`` updated with ``metadata`` (its keys win) and the
    sha256 of ``model.safetensors`` (``weights_sha256``). Each file is written whole under a
    temporary name and then renamed into place, ``config.json`` last, so a failed save leaves
    no half-written file (and removes its temporary files). A process killed between the
    renames, when ``path`` held a checkpoint before, leaves new weights beside the old
    ``config.json``: :func:`load` then refuses the folder (the recorded hash differs) instead
    of loading weights under another save's configuration.

    Raises
    ------
    ValueError
        ``dtype`` is not a floating-point torch dtype; the metadata cannot be written as JSON
        (e.g. NumPy scalars: convert them with ``.item()``). Nothing is written then.
    TypeError
        ``metadata`` is not a dict.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; use torch.float32 (default), "
                         "torch.float16 or torch.bfloat16.")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}.")
    meta = {**(model.metadata or {}), **(metadata or {})}
    config = {"format_version": FORMAT_VERSION, **model.config.to_dict(), **({"metadata": meta} if meta else {})}
    try:
        json.dumps(config, sort_keys=True)
    except (TypeError, ValueError) as err:
        bad = [k for k, v in meta.items() if not _json_ok({k: v})]
        raise ValueError(f"The metadata entries {bad} cannot be written as JSON ({err}); convert NumPy values "
                         "with .item() or .tolist(). Nothing was written.") from None
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in canonical_state(model).items()
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = {name: path / f".{name}.tmp" for name in (WEIGHTS_FILE, GENES_FILE, CONFIG_FILE)}  # config.json last
    try:
        save_file(state, str(tmp[WEIGHTS_FILE]), metadata={"name": model.config.name, "format_version": str(FORMAT_VERSION)})
        config[WEIGHTS_HASH] = sha256_file(tmp[WEIGHTS_FILE])
        tmp[CONFIG_FILE].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp[GENES_FILE].write_text("\n".join(reference_genes()) + "\n", encoding="utf-8")
        for name, t in tmp.items():
            os.replace(t, path / name)
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)
    return path


def _json_ok(value) -> bool:
    try:
        json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return False
    return True


def _bundled_dir(name: str) -> Path:
    return Path(str(resources.files("scxtrimo.models").joinpath("checkpoints", name)))


def _is_name(name_or_path) -> bool:
    """A bare string naming a bundled or registered checkpoint (a path is never a name)."""
    return isinstance(name_or_path, str) and (name_or_path in BUNDLED or name_or_path in _registry.REMOTE)


def resolve(name_or_path: str | os.PathLike) -> tuple[Path, str, str | None]:
    """Return ``(folder, name, expected sha256 or None)`` for a checkpoint name or folder.

    A bare name of a bundled or registered checkpoint is that checkpoint even where the current
    folder holds a folder of that name (pass ``"./name"`` or a ``Path`` for the folder)."""
    if _is_name(name_or_path):
        name = name_or_path
        if name in BUNDLED:
            return _bundled_dir(name), name, BUNDLED[name]
        return _registry.fetch(name), name, _registry.REMOTE[name].sha256["model.safetensors"]
    p = Path(name_or_path)
    if p.is_dir():
        return p, p.name, None
    name = str(name_or_path)
    raise ValueError(
        f"No checkpoint {name!r}: it is neither a folder nor a known name. "
        f"Known names: {sorted(set(BUNDLED) | set(_registry.REMOTE))}; or pass the folder written by `model.save(path)`."
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); the checkpoint is corrupt.") from None


def read_config(path: Path) -> tuple[XTrimoGeneConfig, dict, str | None]:
    """The configuration, metadata and recorded weights hash (:data:`WEIGHTS_HASH`, ``None`` in
    older files) in the checkpoint file ``path`` (``config.json``).

    Every field must be there (those of :data:`ADDED_FIELDS` may be absent: older files), and
    ``format_version`` one this scxtrimo reads; else ``ValueError`` naming the file.
    """
    try:
        raw = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object of configuration fields; "
                         "it is not an scxtrimo checkpoint's config.")
    required = {"format_version"} | {f.name for f in dataclasses.fields(XTrimoGeneConfig)} - set(ADDED_FIELDS)
    missing = sorted(required - set(raw))
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}; it was not written by model.save() or was edited. "
                         "Restore the fields (or save the model again).")
    recorded = raw.pop(WEIGHTS_HASH, None)
    version = raw.pop("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this scxtrimo reads format_version 1 to "
                         f"{FORMAT_VERSION}. A newer format needs a newer scxtrimo.")
    metadata = raw.pop("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: metadata is a JSON {type(metadata).__name__}, not an object.")
    try:
        return XTrimoGeneConfig.from_dict({**ADDED_FIELDS, **raw}), metadata, recorded
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} holds an invalid configuration: {err}") from None


def load_state_strict(model: XTrimoGene, state: dict, *, name: str) -> None:
    """Load ``state`` into ``model``; raise ``ValueError`` naming any missing, unexpected or
    mis-shaped tensor (performer-pytorch's aliases of the decoder layers are not stored)."""
    own = canonical_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"Checkpoint {name!r} does not fit its configuration: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}."
        )
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or any(_ALIAS not in k for k in result.missing_keys):
        raise ValueError(f"Checkpoint {name!r} does not fit its configuration: {result}.")


def load(name_or_path: str | os.PathLike = DEFAULT_CHECKPOINT, *, part: str | None = None,
         device: str | torch.device = "cpu") -> XTrimoGene:
    """Load a pretrained xTrimoGene model by name, from a checkpoint folder or from the authors' file.

    A bare name of a bundled or registered checkpoint (a string without a path separator, e.g.
    ``"xtrimo-3m"``) always loads that checkpoint, hash-checked, even where the current folder
    holds a folder or file of that name; give such a folder as a path (``"./xtrimo-3m"`` or
    ``pathlib.Path("xtrimo-3m")``).

    Parameters
    ----------
    name_or_path
        The name of a checkpoint bundled with the package (no download; the default is
        :data:`scxtrimo.models.DEFAULT_CHECKPOINT`), the name of a registered
        downloadable checkpoint (fetched once with pooch into ``$SCXTRIMO_CACHE`` or the user
        cache, every file checked against its sha256, then reused offline), a folder
        written by :meth:`XTrimoGene.save` (or by ``scxtrimo convert``), or the file
        ``models.ckpt`` of the authors' scFoundation release (xTrimoGene-100M; downloaded by
        the user, see the documentation page "Use the authors' 100M model").
    part
        The authors' file only: which of its sub-models to load: ``"cell"`` (default; cell
        embeddings), ``"rde"`` (cell embeddings of the read-depth-enhancement model) or
        ``"gene"`` (gene-context embeddings and expression, :func:`scxtrimo.tl.gene_embed`).
    device
        Where to put the model. Weights are loaded as float32 whatever they were stored as.

    Returns
    -------
    XTrimoGene
        In eval mode, with ``checkpoint_name`` and ``checkpoint_sha256`` set (for the authors'
        file: ``'models.ckpt:<part>'`` and the file's sha256, which :func:`scxtrimo.tl.embed`
        records in ``uns['xtrimo']['params']``).

    Raises
    ------
    TypeError
        ``name_or_path`` is neither a string nor a path (e.g. ``None``).
    ValueError
        An empty or unknown name; missing files; a ``model.safetensors`` whose sha256 differs
        from the registry's; a gene list that differs from the 19,264-gene reference; tensors
        missing, unexpected or of the wrong shape for the configuration; a ``config.json`` that
        is not valid JSON, lacks fields or has a ``format_version`` newer than this scxtrimo
        reads; a non-UTF-8 ``genes.txt``; an unreadable ``model.safetensors`` (these name the
        file); one of a checkpoint's files given instead of its folder; ``part`` given for
        something other than the authors' file; a ``config.json`` saved with another
        ``model.safetensors`` than the folder's (an interrupted save). For the authors' file: a
        file that needs PyTorch's unrestricted unpickler (refused: it can run code), a missing
        sub-model or config entry, or any tensor missing, unexpected or of a shape other than
        the config implies (the message names them).
    FileNotFoundError
        The authors' file does not exist.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a checkpoint name or a folder path, not {name_or_path!r}.")
    if isinstance(name_or_path, str) and not name_or_path:
        raise ValueError(f"name_or_path is empty; give a checkpoint name (e.g. {DEFAULT_CHECKPOINT!r}) or a folder path.")
    if not _is_name(name_or_path) and Path(name_or_path).is_file():
        file = Path(name_or_path)
        if file.name in _registry.FILES:
            raise ValueError(f"{file} is a file inside the checkpoint folder {file.parent}; pass the folder: "
                             f"load({str(file.parent)!r}).")
        from ._scfoundation import load_scfoundation

        return load_scfoundation(name_or_path, part=part or "cell", device=device)
    if part is not None:
        raise ValueError(f"part={part!r} selects a sub-model of the authors' scFoundation file, but "
                         f"{str(name_or_path)!r} is not a file.")
    folder, name, expected = resolve(name_or_path)
    for f in (CONFIG_FILE, WEIGHTS_FILE, GENES_FILE):
        if not (folder / f).is_file():
            raise ValueError(f"Checkpoint folder {folder} lacks {f}; it is not an scxtrimo checkpoint.")
    digest = sha256_file(folder / WEIGHTS_FILE)
    if expected is not None and digest != expected:
        raise ValueError(
            f"Checkpoint {name!r}: {WEIGHTS_FILE} has sha256 {digest}, expected {expected}. The file is "
            "corrupt or was replaced; reinstall scxtrimo (or delete the cached file to download it again)."
        )
    genes = _read_text(folder / GENES_FILE).split()
    ref = reference_genes()
    if genes != list(ref):
        diff = next((i for i, (a, b) in enumerate(zip(genes, ref)) if a != b), min(len(genes), len(ref)))
        raise ValueError(
            f"Checkpoint {name!r} was trained on a different gene list ({len(genes)} genes, first "
            f"difference at position {diff}) than this scxtrimo's {len(ref)}-gene reference; it cannot be used."
        )
    config, metadata, recorded = read_config(folder / CONFIG_FILE)
    model = XTrimoGene(config)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except SafetensorError as err:
        raise ValueError(f"{folder / WEIGHTS_FILE} is not a readable safetensors file ({err}); the checkpoint "
                         "is corrupt or truncated.") from None
    if recorded is not None and recorded != digest:
        raise ValueError(f"{folder / CONFIG_FILE} was saved with a {WEIGHTS_FILE} of sha256 {recorded}, but the "
                         f"folder's has {digest}: the files are from different saves (a save() that was "
                         "interrupted, or a file copied from another checkpoint). Save the model again.")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    load_state_strict(model, state, name=name)
    model.checkpoint_name = name
    model.checkpoint_sha256 = digest
    model.metadata = metadata
    return model.to(device).eval()
