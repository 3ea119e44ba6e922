"""cifarlab: train ResNet-18 on CIFAR-10 and measure, correctly, where the training time goes."""

__version__ = "0.1.0"
