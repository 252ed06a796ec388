"""The documentation builds without warnings; the tutorials call the API as it is, are committed
executed, and (slow) run end to end."""

import ast
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_sphinx_builds_without_warnings(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
         "-d", str(tmp_path / "doctrees"), str(REPO / "docs"), str(tmp_path / "html")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    api = (tmp_path / "html" / "api" / "generated" / "scxtrimo.tl.embed.html").read_text()
    assert "obsm" in api and "ValueError" in api  # docstrings render outputs and errors
    assert (tmp_path / "html" / "notebooks" / "01_embed_cluster_pbmc3k.html").exists()


def test_every_public_name_is_in_the_api_reference():
    import scxtrimo

    page = (REPO / "docs" / "api" / "index.md").read_text()
    listed = {line.strip() for line in page.splitlines()}
    names = [n for n in scxtrimo.__all__ if n not in {"pp", "tl", "pl", "models", "data", "datasets", "__version__"}]
    for sub in ("pp", "tl", "pl", "models", "data", "datasets"):
        names += [f"{sub}.{n}" for n in importlib.import_module(f"scxtrimo.{sub}").__all__]
    missing = [n for n in names if n not in listed]
    assert not missing, f"public names missing from docs/api/index.md: {missing}"


NOTEBOOKS = sorted((REPO / "docs" / "notebooks").glob("*.ipynb"))


def _scxtrimo_calls(source: str) -> list[tuple[str, int, list[str], int]]:
    """Each call of a scxtrimo name in ``source``: (dotted name, number of positional arguments,
    keyword names, line). Names bound by ``import scxtrimo [as x]`` and ``from scxtrimo... import
    y [as z]`` are followed; ``*args`` and ``**kwargs`` at a call site are not counted."""
    tree = ast.parse(source)
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update({a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] == "scxtrimo"})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "scxtrimo":
            bound.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts, f = [], node.func
        while isinstance(f, ast.Attribute):
            parts.append(f.attr)
            f = f.value
        if isinstance(f, ast.Name) and f.id in bound:
            name = ".".join([bound[f.id], *reversed(parts)])
            positional = sum(not isinstance(a, ast.Starred) for a in node.args)
            calls.append((name, positional, [k.arg for k in node.keywords if k.arg is not None], node.lineno))
    return calls


def test_tutorials_call_the_api_as_it_is():
    """Every scxtrimo function the four tutorials call exists and takes the arguments they pass
    (names and number), so a renamed function or keyword fails the default run; running them
    is the slow ``test_tutorial_executes``."""
    import nbformat

    assert len(NOTEBOOKS) == 4
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
        calls = _scxtrimo_calls(source)
        assert len(calls) >= 3, (path.name, calls)
        for name, positional, keywords, line in calls:
            try:
                signature = inspect.signature(pkgutil.resolve_name(name))
                signature.bind_partial(*([None] * positional), **dict.fromkeys(keywords))
            except TypeError as err:
                raise AssertionError(f"{path.name}, line {line}: {name}: {err}") from None


def test_the_call_check_sees_a_wrong_keyword():
    calls = _scxtrimo_calls("import scxtrimo as sx\nfrom scxtrimo.tl import embed as e\n"
                            "sx.tl.embed(a, poolin='mean')\ne(a, b, **kw)\nlen(a)")
    assert calls == [("scxtrimo.tl.embed", 1, ["poolin"], 3), ("scxtrimo.tl.embed", 2, [], 4)]
    with pytest.raises(TypeError, match="poolin"):
        inspect.signature(pkgutil.resolve_name(calls[0][0])).bind_partial(None, poolin=None)
    with pytest.raises(TypeError):  # adata is the only positional argument
        inspect.signature(pkgutil.resolve_name(calls[1][0])).bind_partial(None, None)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_executes(path):
    """Runs a tutorial in a fresh kernel. On two cores: 100, 95, 156 and 663 s (17 minutes in
    all); tutorials 2-4 read ../shared/data."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env_backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures become PNG outputs
    try:
        nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_backend is None:
            os.environ.pop("MPLBACKEND")
        else:
            os.environ["MPLBACKEND"] = env_backend
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    if path.stem.startswith("01"):
        table = next(o for o in outputs if "text/html" in o.get("data", {}) and "ari" in o["data"]["text/html"])
        assert "xTrimoGene" in table["data"]["text/html"] and "PCA" in table["data"]["text/html"]


def test_tutorials_are_committed_executed():
    """Every tutorial is committed with its outputs (run on CPU), in order, and without errors."""
    import nbformat

    assert len(NOTEBOOKS) == 4
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        counts = [c.get("execution_count") for c in code]
        assert counts == list(range(1, len(code) + 1)), (path.name, counts)
        outputs = [o for c in code for o in c.get("outputs", [])]
        assert outputs and not [o for o in outputs if o.get("output_type") == "error"], path.name
        assert any("image/png" in o.get("data", {}) for o in outputs), path.name
