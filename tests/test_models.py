"""Model zoo: published parameter counts, standard pairs, from_module."""
import pytest
import torch
from torch import nn

from bkd_core import BlockKD, BlockNet, models

# CIFAR-100 parameter counts in millions, as published (Tian et al., CRD, 2020 and its zoo).
PUBLISHED = {
    "resnet8": 0.08, "resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.73, "resnet8x4": 1.23,
    "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26, "vgg8": 3.96,
    "vgg13": 9.46, "ResNet50": 23.71, "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.36,
}
# ImageNet (1000 classes) parameter counts in millions, as torchvision publishes them.
IMAGENET = {"ResNet18": 11.69, "ResNet34": 21.80, "ResNet50_imagenet": 25.56, "MobileNetV2_imagenet": 3.50}
PAIRS = [
    ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("resnet32x4", "resnet8"), ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"), ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"),
    ("ResNet50_imagenet", "MobileNetV2_imagenet"),
]


@pytest.mark.parametrize("name, millions", PUBLISHED.items())
def test_parameter_counts(name, millions):
    count = sum(p.numel() for p in models.create(name, 100).parameters()) / 1e6
    assert count == pytest.approx(millions, abs=0.01)  # published figures are rounded


TRANSFORMERS = {"deit_tiny_patch16_224": 5_717_416, "vit_small_patch16_224": 22_050_664,  # timm's counts, 1000 classes
                "swin_tiny_patch4_window7_224": 28_288_354, "convnext_tiny": 28_589_128}
TIMM_KEYS = {  # names timm's checkpoints of these models hold (a sample of each kind of layer)
    "swin_tiny_patch4_window7_224": ["patch_embed.proj.weight", "patch_embed.norm.bias", "layers.0.blocks.1.attn.relative_position_bias_table",
                                     "layers.1.downsample.norm.weight", "layers.1.downsample.reduction.weight",
                                     "layers.2.blocks.5.mlp.fc2.bias", "norm.weight", "head.fc.weight"],
    "convnext_tiny": ["stem.0.weight", "stem.1.bias", "stages.0.blocks.2.conv_dw.weight", "stages.1.downsample.0.weight",
                      "stages.1.downsample.1.weight", "stages.2.blocks.8.gamma", "stages.3.blocks.2.mlp.fc1.weight",
                      "head.norm.weight", "head.fc.bias"],
}


def test_names_complete():
    small = {"tiny_cnn", "small_cnn", "tiny_resnet", "vit_tiny_p2_8", "vit_tiny_p4_32", "vit_small_p4_32"}
    assert set(PUBLISHED) | set(IMAGENET) | set(TRANSFORMERS) | small == set(models.names())


@pytest.mark.parametrize("name, count", TRANSFORMERS.items())
def test_vision_transformers_have_timms_parameter_counts(name, count):
    net = models.create(name, 1000, 3)
    assert sum(p.numel() for p in net.parameters()) == count and net.num_blocks == 4
    names = net.source_state_dict()
    assert all(key in names for key in TIMM_KEYS.get(name, [])), [k for k in TIMM_KEYS[name] if k not in names]
    if name.startswith("swin"):  # stages write channels-last maps, halving the 56x56 grid of 4x4 patches
        with torch.no_grad():
            shapes = [tuple(f.shape[1:]) for f in net.features(torch.zeros(1, 3, 224, 224))]
        assert shapes == [(56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768)]


@pytest.mark.parametrize("teacher, student", PAIRS)
def test_standard_pair_stepping_stones_forward_backward(teacher, student):
    torch.manual_seed(0)
    t, s = models.create(teacher, 100), models.create(student, 100)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    kd = BlockKD(t, s, gamma=1.0, sample_input=x)
    out = kd(x, y)
    assert set(out.stone_logits) == set(range(1, t.num_blocks + 1))
    assert all(v.shape == (2, 100) for v in out.stone_logits.values())
    out.loss.backward()
    assert all(p.grad is not None for p in kd.trainable_parameters())
    assert all(p.grad is None for p in kd.teacher.parameters())


class TorchvisionStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.layer1, self.layer2 = nn.Conv2d(8, 16, 3, 2), nn.Conv2d(16, 32, 3, 2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_from_module_shares_weights_and_matches_forward():
    model = TorchvisionStyle().eval()
    x = torch.randn(2, 3, 16, 16)
    net = BlockNet.from_module(model, stem=["conv1", "bn1", "relu"], blocks=["layer1", "layer2"], head=["avgpool", "fc"],
                               sample_input=x).eval()
    assert torch.allclose(net(x), model(x))
    assert net.blocks[1] is model.layer2
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters())
    assert [f.shape[1] for f in net.features(x)] == [16, 32]
    with pytest.raises(ValueError, match="layer9"):
        BlockNet.from_module(model, blocks=["layer9"], head=["fc"], sample_input=x)


def test_imagenet_resnet18_is_four_blocks():
    net = models.create("ResNet18", 10)
    assert net.num_blocks == 4
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("name, millions", IMAGENET.items())
def test_imagenet_resnets_take_a_checkpoint_in_torchvisions_layout(name, millions, tmp_path):
    """A state_dict of the plain model (torchvision's key names, e.g. resnet34-b627a593.pth) loads into
    the zoo's BlockNet with the same outputs; a checkpoint of another class count is refused by name."""
    from bkd_core.models.mobilenetv2_imagenet import MobileNetV2ImageNet
    from bkd_core.models.resnet_imagenet import ARCHITECTURES, ImageNetResNet
    from bkd_core.train import load_state_checked

    torch.manual_seed(0)
    mobile = name == "MobileNetV2_imagenet"
    plain = (MobileNetV2ImageNet(1000) if mobile else ImageNetResNet(*ARCHITECTURES[name], num_classes=1000)).eval()
    state = plain.state_dict()
    assert sum(p.numel() for p in plain.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)
    if mobile:  # a few of the keys of torchvision's mobilenet_v2 state_dict
        assert state["features.0.0.weight"].shape == (32, 3, 3, 3) and state["classifier.1.weight"].shape == (1000, 1280)
        assert "features.1.conv.2.running_mean" in state and "features.17.conv.3.weight" in state and "features.18.1.bias" in state
    else:
        wide = 2048 if name == "ResNet50_imagenet" else 512
        assert state["conv1.weight"].shape == (64, 3, 7, 7) and state["fc.weight"].shape == (1000, wide)
        assert "layer2.0.downsample.1.running_var" in state and "layer4.1.bn2.num_batches_tracked" in state
    torch.save(state, tmp_path / "tv.pth")
    net = models.create(name, 1000).eval()
    load_state_checked(net, tmp_path / "tv.pth")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(net(x), plain(x))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_state_checked(models.create(name, 10), tmp_path / "tv.pth")
