"""Every model family is built on the CPU whatever the default device: its seeded CPU generators
draw the weights, so one seed gives one set of weights (a ``torch.device`` context or
``torch.set_default_device`` used to send the layers elsewhere while the CPU generator filled
them). The "meta" device stands in for a GPU here."""
from __future__ import annotations

import pytest
import torch

import resgeom_fast as rg

BUILDERS = {
    "fc": lambda: rg.models.FCResNet(8, 6, 2, 3, seed=0),
    "conv": lambda: rg.models.ConvResNet(3, 4, 2, 10, seed=0),
    "staged": lambda: rg.models.resnet18(num_classes=10, seed=0),
    "leaky": lambda: rg.models.LeakyResNet(3, 5, 4, 2, leak=0.5, seed=0),
}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_a_model_is_built_on_the_cpu_under_another_default_device(family):
    ref = BUILDERS[family]().state_dict()
    with torch.device("meta"):
        model = BUILDERS[family]()
    sd = model.state_dict()
    assert list(sd) == list(ref)
    for name, t in sd.items():
        assert t.device.type == "cpu", name
        assert torch.equal(t, ref[name]), name
