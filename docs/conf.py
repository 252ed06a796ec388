"""Sphinx configuration for the scxtrimo documentation."""

import scxtrimo

project = "scxtrimo"
author = "scxtrimo developers"
copyright = "2026, scxtrimo developers"
version = release = scxtrimo.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
nb_execution_mode = "off"  # notebooks are committed executed; tests/test_docs.py re-runs them (-m slow)
myst_enable_extensions = ["colon_fence", "dollarmath"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "api/generated/*.md"]
html_theme = "furo"
html_title = f"scxtrimo {version}"
nitpicky = False
suppress_warnings = ["mystnb.unknown_mime_type"]
