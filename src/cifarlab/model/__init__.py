"""The lab's model and what is known about it: ResNet-18 for CIFAR (resnet), the five optimizers of lab C6
(optim) and facts computed from live modules for lab Q1-Q4 and `cifarlab inspect` (facts)."""

from cifarlab.model.facts import explain, inspect_model
from cifarlab.model.optim import OPTIMIZERS, build_optimizer
from cifarlab.model.resnet import resnet18

__all__ = ["OPTIMIZERS", "build_optimizer", "explain", "inspect_model", "resnet18"]
