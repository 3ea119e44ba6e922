import torch
from torch import nn

from cifarlab.model.resnet import resnet18


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_counts_match_the_lab():
    assert n_params(resnet18()) == 11_173_962
    assert n_params(resnet18(norm="none")) == 11_164_362


def test_structure_is_the_cifar_variant():
    model = resnet18()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    assert sum(c.kernel_size == (3, 3) for c in convs) == 17
    assert sum(c.kernel_size == (1, 1) for c in convs) == 3
    assert all(c.bias is None for c in convs)
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.linear.in_features == 512 and model.linear.out_features == 10
    assert len([p for p in model.parameters()]) == 62
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "linear"}


def test_no_batchnorm_variant_has_no_norm_layers_or_buffers():
    model = resnet18(norm="none")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert list(model.buffers()) == []
    assert len(resnet18().state_dict()) - len(model.state_dict()) == 20 * 5  # weight, bias, mean, var, count


def test_forward_shape_and_stage_shapes():
    model = resnet18().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (3, 10)
        out = torch.relu(model.bn1(model.conv1(x)))
        shapes = []
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            out = stage(out)
            shapes.append(tuple(out.shape[1:]))
    assert shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
