"""Tab completion (``dir``) on scxtrimo and its submodules lists their public API and no helpers."""

import importlib
import types

import pytest

import scxtrimo


@pytest.mark.parametrize("name", ["scxtrimo", *(f"scxtrimo.{m}" for m in ("pp", "tl", "pl", "models", "data", "datasets"))])
def test_public_names_are_the_modules_all(name):
    module = importlib.import_module(name)
    public = {n for n in dir(module) if not n.startswith("_")}
    # a submodule imported elsewhere (scxtrimo.cli, by the command line) is an attribute of its package
    public -= {n for n in public if isinstance(getattr(module, n), types.ModuleType)
               and getattr(module, n).__name__ == f"{name}.{n}" and n not in module.__all__}
    assert public == set(module.__all__) - {"__version__"}
    for n in module.__all__:
        assert getattr(module, n) is not None


def test_submodules_load_on_first_use():
    assert scxtrimo.tl.embed.__module__ == "scxtrimo.tl._embed"
