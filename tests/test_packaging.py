"""The conda-forge recipe and pyproject.toml declare the same run dependencies."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI names
CONDA_NAME = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


def _name_and_spec(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_recipe_run_dependencies_match_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pypi = dict(_name_and_spec(r) for r in pyproject["project"]["dependencies"])
    expected = {CONDA_NAME.get(k, k): v for k, v in pypi.items()}
    text = (REPO / "recipe" / "recipe.yaml").read_text()
    run_block = text.split("  run:\n", 1)[1].split("\n\n", 1)[0]
    conda = dict(_name_and_spec(line.strip()[2:]) for line in run_block.splitlines() if line.strip().startswith("- "))
    conda.pop("python")
    assert conda == expected
    assert re.search(r'version: "(.+)"', text).group(1) == __import__("scxtrimo").__version__
    assert "noarch: python" in text and "pip_check: true" in text
