"""The documentation builds without warnings, and the first tutorial runs end to end."""

import os
import subprocess
import sys
from pathlib import Path

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
    import importlib

    import scxtrimo

    page = (REPO / "docs" / "api" / "index.md").read_text()
    listed = {line.strip() for line in page.splitlines()}
    names = [n for n in scxtrimo.__all__ if n not in {"pp", "tl", "pl", "models", "data", "datasets", "__version__"}]
    for sub in ("pp", "tl", "pl", "models", "data", "datasets"):
        names += [f"{sub}.{n}" for n in importlib.import_module(f"scxtrimo.{sub}").__all__]
    missing = [n for n in names if n not in listed]
    assert not missing, f"public names missing from docs/api/index.md: {missing}"


def test_first_tutorial_executes(tmp_path):
    import nbclient
    import nbformat

    path = REPO / "docs" / "notebooks" / "01_embed_cluster_pbmc3k.ipynb"
    nb = nbformat.read(path, as_version=4)
    env_backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures become PNG outputs
    try:
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_backend is None:
            os.environ.pop("MPLBACKEND")
        else:
            os.environ["MPLBACKEND"] = env_backend
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    table = next(o for o in outputs if "text/html" in o.get("data", {}) and "ari" in o["data"]["text/html"])
    assert "xTrimoGene" in table["data"]["text/html"] and "PCA" in table["data"]["text/html"]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_tutorials_are_committed_executed():
    """Every tutorial is committed with its outputs (run on CPU), in order, and without errors."""
    import nbformat

    paths = sorted((REPO / "docs" / "notebooks").glob("*.ipynb"))
    assert len(paths) == 4
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        counts = [c.get("execution_count") for c in code]
        assert counts == list(range(1, len(code) + 1)), (path.name, counts)
        outputs = [o for c in code for o in c.get("outputs", [])]
        assert outputs and not [o for o in outputs if o.get("output_type") == "error"], path.name
        assert any("image/png" in o.get("data", {}) for o in outputs), path.name
