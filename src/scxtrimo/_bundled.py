"""The checkpoints shipped inside the package, and the one loaded wherever no model is named.

``scripts/publish_default.py`` rewrites the two assignments below when it publishes a new
default. The module imports nothing, so the command line reads the default without loading torch.
"""

#: The default checkpoint's name: what :func:`scxtrimo.tl.embed`, :func:`scxtrimo.tl.annotate`,
#: :func:`scxtrimo.tl.gene_embed`, :mod:`scxtrimo.pl`'s model plots, :func:`scxtrimo.models.load`
#: and the command line use when no model is given. It is bundled (no download).
DEFAULT_CHECKPOINT = "xtrimo-3m"

#: Pretrained checkpoints shipped inside the package, in ``scxtrimo/models/checkpoints/<name>/``:
#: name -> sha256 of their ``model.safetensors``.
BUNDLED = {
    "xtrimo-3m": "cb5e12207996576d61ea9a7f721036546a45a3845bc8940fea2dd6defd437fd1",
}
