"""The embedding-quality benchmark keeps every checkpoint's rows apart (benchmarks/embedding_quality.py)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "embedding_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("embedding_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_folders_that_share_a_name_get_distinct_labels(bench, tmp_path):
    a, b, c = tmp_path / "fw4" / "ckpt", tmp_path / "s12" / "ckpt", tmp_path / "soup"
    for d in (a, b, c):
        d.mkdir(parents=True)
    labels = bench.model_labels(["xtrimo-3m", str(a), str(b), str(c)])
    # a registry name and a folder with a unique name keep their short labels
    assert labels[0] == "xtrimo-3m" and labels[3] == "soup"
    # two folders both called "ckpt" must not collapse into one row label
    assert labels[1] == str(a) and labels[2] == str(b)
    assert len(set(labels)) == 4


def test_naming_one_checkpoint_twice_is_refused(bench):
    with pytest.raises(SystemExit, match="more than once"):
        bench.model_labels(["xtrimo-3m", "xtrimo-3m"])
