"""Models by name: the paper's pre-activation ResNets and torchvision's ResNets,
create_model("preact_resnet101", 100) or create_model("torchvision.resnet50", 100)."""
from .preact_resnet import PreActBlock, PreActBottleneck, PreActResNet
from .registry import create_model, is_torchvision, list_models, register_model


def _family(name, block, num_blocks, stem="cifar"):
    def build(num_classes=10, width=64, **kwargs):
        return PreActResNet(block, num_blocks, num_classes, width, stem=stem, **kwargs)
    build.__name__ = name
    build.__doc__ = f"Pre-activation {block.__name__} ResNet, stages {num_blocks}, {stem} stem."
    return register_model(build)


# CIFAR-style (32x32 inputs, 3x3 stem). 101/152/200 use basic blocks as in the paper.
preact_resnet18 = _family("preact_resnet18", PreActBlock, [2, 2, 2, 2])
preact_resnet34 = _family("preact_resnet34", PreActBlock, [3, 4, 6, 3])
preact_resnet50 = _family("preact_resnet50", PreActBottleneck, [3, 4, 6, 3])
preact_resnet101 = _family("preact_resnet101", PreActBlock, [3, 4, 23, 3])
preact_resnet152 = _family("preact_resnet152", PreActBlock, [3, 4, 36, 3])
preact_resnet200 = _family("preact_resnet200", PreActBlock, [3, 4, 50, 3])
# ImageNet-style (224x224 inputs, 7x7/2 stem + max-pool), bottleneck blocks.
preact_resnet50_imagenet = _family("preact_resnet50_imagenet", PreActBottleneck, [3, 4, 6, 3], "imagenet")
preact_resnet101_imagenet = _family("preact_resnet101_imagenet", PreActBottleneck, [3, 4, 23, 3], "imagenet")
preact_resnet152_imagenet = _family("preact_resnet152_imagenet", PreActBottleneck, [3, 4, 36, 3], "imagenet")

__all__ = ["create_model", "is_torchvision", "list_models", "register_model", "PreActResNet", "PreActBlock",
           "PreActBottleneck"]
