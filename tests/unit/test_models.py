"""The model registry: the paper's pre-activation ResNets (plain nn.Modules) and torchvision's ResNets."""
import pytest
import torch

from resist_mpi.blocks.find import find_blocks
from resist_mpi.models import PreActBlock, PreActResNet, create_model, list_models


def test_registry_and_paper_size():
    assert {"preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152",
            "preact_resnet200", "preact_resnet50_imagenet", "preact_resnet101_imagenet",
            "preact_resnet152_imagenet", "torchvision.resnet50", "torchvision.wide_resnet50_2",
            "torchvision.resnext50_32x4d"} <= set(list_models())
    with torch.device("meta"):
        m = create_model("preact_resnet101", 100)
    assert sum(p.numel() for p in m.parameters()) == 41_397_924  # ~41.4 M as in the paper
    assert len(find_blocks(m)) == 22  # stage 3's non-strided blocks
    with torch.device("meta"):
        assert len(find_blocks(create_model("preact_resnet152", 10))) == 35
        assert len(find_blocks(create_model("preact_resnet200", 10))) == 49
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet9000")


def test_torchvision_models_by_name():
    with torch.device("meta"):
        m = create_model("torchvision.resnet50", 100)
    import torchvision
    assert isinstance(m, torchvision.models.ResNet) and m.fc.out_features == 100
    assert sum(p.numel() for p in m.parameters()) == 23_712_932  # torchvision's ResNet-50, 100 classes


def test_imagenet_variant_runs_small_input():
    m = create_model("preact_resnet50_imagenet", 5, width=4)
    assert len(find_blocks(m)) == 5
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_plain_module_state_dict_keys():
    """No ResIST attributes or buffers in the model: its state_dict is a plain ResNet's."""
    m = PreActResNet(PreActBlock, [1, 1, 2, 1], 10, 4)
    keys = list(m.state_dict())
    assert keys[0] == "stem.weight" and keys[-1] == "linear.bias"
    assert all(k.split(".")[0] in ("stem", "stages", "bn", "linear") for k in keys)
