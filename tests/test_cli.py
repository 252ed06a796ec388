import anndata as ad
import numpy as np
import pytest

import scxtrimo
from scxtrimo.cli import main


def test_cli_embed_round_trip(pbmc3k, tmp_path, capsys):
    src, dst = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    pbmc3k[:100].copy().write_h5ad(src)
    assert main(["embed", str(src), str(dst)]) == 0
    out = ad.read_h5ad(dst)
    assert out.obsm["X_xtrimo"].shape == (100, 128)
    assert out.uns["xtrimo"]["params"]["model"] == "xtrimo-3m"
    direct = pbmc3k[:100].copy()
    scxtrimo.tl.embed(direct, progress=False)
    np.testing.assert_array_equal(out.obsm["X_xtrimo"], direct.obsm["X_xtrimo"])
    assert "embedded 100 cells" in capsys.readouterr().out


def test_cli_reports_bad_input(pbmc3k, tmp_path, capsys):
    src = tmp_path / "mouse.h5ad"
    mouse = pbmc3k[:20].copy()
    mouse.var_names = [g.capitalize() for g in mouse.var_names]
    mouse.write_h5ad(src)
    assert main(["embed", str(src), str(tmp_path / "o.h5ad")]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_names_a_file_that_is_not_h5ad(tmp_path, capsys):
    src = tmp_path / "counts.csv"
    src.write_text("gene,cell1\nCD3E,4\n")
    assert main(["embed", str(src), str(tmp_path / "o.h5ad")]) == 2
    err = capsys.readouterr().err
    assert f"could not read {str(src)!r} as an .h5ad file" in err and "Traceback" not in err
    assert main(["embed", str(tmp_path / "missing.h5ad"), str(tmp_path / "o.h5ad")]) == 2
    assert "missing.h5ad' does not exist" in capsys.readouterr().err


def test_cli_refuses_an_output_folder_that_does_not_exist_before_embedding(pbmc3k, tmp_path, capsys):
    src = tmp_path / "in.h5ad"
    pbmc3k[:5].copy().write_h5ad(src)
    dst = tmp_path / "no" / "such" / "out.h5ad"
    assert main(["embed", str(src), str(dst)]) == 2
    captured = capsys.readouterr()
    assert "the folder of the output" in captured.err and "embedded" not in captured.out
    assert not dst.parent.exists()


@pytest.mark.slow
def test_cli_demo(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "PCA baseline" in text and "xTrimoGene" in text
    assert (tmp_path / "pbmc3k_xtrimo_umap.png").stat().st_size > 10_000
