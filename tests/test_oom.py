"""CUDA out-of-memory recovery (issue 3: "a CUDA out-of-memory error halves the batch and retries").

No test machine has a GPU, so the error is raised on purpose (``torch.cuda.OutOfMemoryError``
is the class CUDA raises) by a model that "holds" only a few cells at a time; the recovered
result must equal the one computed without the error. Training-step recovery is tested in
``test_annotate.py`` (fine-tuning) and ``test_distributed.py`` (pretraining).
"""

import numpy as np
import pytest
import torch

import scxtrimo
import scxtrimo._inference
from scxtrimo._oom import halve_rows_on_oom, retry_on_oom
from scxtrimo.models import XTrimoGene


def oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


def never_fits(*_):
    raise oom()


def test_rows_are_halved_until_they_fit_and_keep_their_order():
    calls = []

    def run(rows):
        calls.append(len(rows))
        if len(rows) > 3:
            raise oom()
        return rows * 10

    out = halve_rows_on_oom(run, np.arange(13))
    np.testing.assert_array_equal(out, np.arange(13) * 10)
    assert max(n for n in calls if n <= 3) == 3 and calls[0] == 13
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one row that does not fit: nothing left to split
        halve_rows_on_oom(never_fits, np.arange(4))


def test_a_step_is_retried_after_shrinking_and_gives_up_when_it_cannot():
    size = {"n": 16}

    def step():
        if size["n"] > 4:
            raise oom()
        return size["n"]

    def shrink():
        if size["n"] == 1:
            return False
        size["n"] //= 2
        return True

    with pytest.warns(RuntimeWarning, match="out of memory"):
        assert retry_on_oom(step, shrink, what="test") == 4
    with pytest.raises(torch.cuda.OutOfMemoryError):
        retry_on_oom(never_fits, lambda: False, what="test")


@pytest.mark.parametrize("pending", [1, 5])
def test_embed_recovers_from_out_of_memory_with_the_same_embedding(pbmc3k, tiny_config, monkeypatch, pending):
    """``pending``: batches whose (device) results wait before one copy to the host, as on CUDA;
    the halves of a failed batch are joined on the device (``torch.cat``)."""
    monkeypatch.setitem(scxtrimo._inference.PENDING_BATCHES, "cpu", pending)
    torch.manual_seed(0)
    model = XTrimoGene(tiny_config).eval()
    small = pbmc3k[:40].copy()
    reference = scxtrimo.tl.embed(small, model=model, batch_size=16, progress=False, copy=True).obsm["X_xtrimo"]
    sizes = []
    embed_cells = XTrimoGene.embed_cells

    def small_device(self, batch, pooling="max"):
        if batch.valid.shape[0] > 3:  # a GPU that holds 3 cells at a time
            raise oom()
        sizes.append(batch.valid.shape[0])
        return embed_cells(self, batch, pooling)

    monkeypatch.setattr(XTrimoGene, "embed_cells", small_device)
    scxtrimo.tl.embed(small, model=model, batch_size=16, progress=False)
    assert sum(sizes) == small.n_obs and max(sizes) == 3  # every cell once, in halves of the failed batches
    np.testing.assert_allclose(small.obsm["X_xtrimo"], reference, atol=1e-5)
