import pytest
import torch

from cifarlab.model.optim import OPTIMIZERS, build_optimizer


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_builds_with_lab_hyperparameters_and_steps(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(name, model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["weight_decay"] == 5e-4
    if OPTIMIZERS[name].uses_momentum:
        assert group["momentum"] == 0.9
    assert group.get("nesterov", False) == (name == "sgd-nesterov")
    before = model.weight.detach().clone()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_the_five_lab_optimizers_are_registered():
    assert set(OPTIMIZERS) == {"sgd", "sgd-nesterov", "adagrad", "adadelta", "adam"}


def test_unknown_optimizer_is_refused_not_defaulted():
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer("adamw", torch.nn.Linear(2, 2).parameters(), 0.1, 0.9, 5e-4)
