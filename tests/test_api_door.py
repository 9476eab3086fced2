"""The public door of the fused loss: the frozen call inputs, the one option list, the one metric formula."""

from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref.preference import PreferenceConfig
from tests.helpers import make_labels


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    labels = make_labels(4, 6, 13, generator=g)
    return hidden, weight, labels, torch.randn(4, 6, 8, generator=g)


def _same(a: fastpref.PreferenceOutput, b: fastpref.PreferenceOutput) -> None:
    assert torch.equal(a.loss, b.loss) and torch.equal(a.chosen_rewards, b.chosen_rewards)
    assert a.metrics.keys() == b.metrics.keys()
    assert all(torch.equal(a.metrics[k], b.metrics[k]) for k in a.metrics)


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_frozen_inputs_equal_the_flat_keywords(mode):
    hidden, weight, labels, ref_hidden = _batch()
    loss_fn = fastpref.DPOLoss(beta=0.3, backend="torch", mode=mode)
    flat = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
    _same(loss_fn(hidden, weight, labels, fastpref.ReferenceInputs(hidden=ref_hidden)), flat)
    sums = loss_fn.score(ref_hidden, weight, labels)
    _same(loss_fn(hidden, weight, labels, sums), loss_fn(hidden, weight, labels, ref_logps=sums))
    _same(loss_fn(hidden, weight, labels, fastpref.ReferenceInputs(logps=sums)), loss_fn(hidden, weight, labels, sums))


def test_frozen_refinement_equals_the_tensor():
    hidden, weight, labels, _ = _batch(1)
    loss_fn = fastpref.SrDPOLoss(backend="torch", reference_free=True)
    delta = torch.tensor([0.5, -1.0])
    _same(loss_fn(hidden, weight, labels, refinement=fastpref.RefinementInputs(refinement=delta)),
          loss_fn(hidden, weight, labels, refinement=delta))


def test_inputs_given_twice_or_unknown_raise_naming_them():
    hidden, weight, labels, ref_hidden = _batch()
    loss_fn = fastpref.DPOLoss(backend="torch")
    with pytest.raises(ValueError, match=r"\['ref_hidden'\]: already given in the ReferenceInputs"):
        loss_fn(hidden, weight, labels, fastpref.ReferenceInputs(hidden=ref_hidden), ref_hidden=ref_hidden)
    with pytest.raises(TypeError, match="ref_logps: given twice"):
        loss_fn(hidden, weight, labels, torch.zeros(4), ref_logps=torch.zeros(4))
    with pytest.raises(TypeError, match="ref_hiden: unexpected keyword argument"):
        loss_fn(hidden, weight, labels, ref_hiden=ref_hidden)


def test_one_option_list():
    options = dict(beta=0.2, label_smoothing=0.1, mode="lean", softcap=30.0, token_metrics=True, gemm="cublas")
    assert fastpref.PreferenceLoss("sigmoid", **options).config == PreferenceConfig.create("sigmoid", **options)
    with pytest.raises(TypeError, match="unexpected hyper-parameter"):
        fastpref.PreferenceLoss("sigmoid", bta=0.2)


def test_gathered_metrics_are_the_outputs_formulas():
    """One rank: trainer_common.gather_metrics gives build_output's metrics (the same formulas), to fp32."""
    from fastpref.integrations.trainer_common import gather_metrics

    class OneRank:
        def gather(self, t):
            return t

        gather_for_metrics = gather

    hidden, weight, labels, ref_hidden = _batch(2)
    out = fastpref.DPOLoss(backend="torch", token_metrics=True)(hidden, weight, labels, ref_hidden=ref_hidden)
    values, n_tokens = gather_metrics(OneRank(), out, torch.tensor(24))
    assert n_tokens == 24.0 and values.keys() == out.metrics.keys()
    for name, value in values.items():
        assert value == pytest.approx(float(out.metrics[name]), rel=1e-6, abs=1e-7), name
