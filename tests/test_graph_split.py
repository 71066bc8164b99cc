"""Cutting users' own models into blocks along their forward graph (torch.fx): torchvision-,
features- and timm-style layouts written here (torchvision and timm do not import with the CPU
torch), forwards with functional ops between modules, and the checks that refuse a changed model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bkd_core import BlockKD, BlockNet
from bkd_core.graph_split import SplitError, check_same_output, find_cuts, split_model, wrap


class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride > 1 or cin != cout else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet attribute names; ``max_pool=True``: a forward that pools with
    F.adaptive_max_pool2d although the model has an ``avgpool`` module (it never runs)."""

    def __init__(self, width=8, classes=10, max_pool=False):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(Basic(width, width, 1))
        self.layer2 = nn.Sequential(Basic(width, 2 * width, 2))
        self.layer3 = nn.Sequential(Basic(2 * width, 4 * width, 2))
        self.avgpool, self.fc, self.max_pool = nn.AdaptiveAvgPool2d(1), nn.Linear(4 * width, classes), max_pool

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))))
        x = F.adaptive_max_pool2d(x, 1) if self.max_pool else self.avgpool(x)
        return self.fc(torch.flatten(x, 1) * 0.5)  # a functional scale between modules


class FeaturesNet(nn.Module):
    """VGG/MobileNet style: a ``features`` Sequential that downsamples now and then, then a classifier."""

    def __init__(self, classes=10):
        super().__init__()
        layers, cin = [], 3
        for cout, stride in ((8, 1), (8, 1), (16, 2), (16, 1), (32, 2), (32, 1)):
            layers += [nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU6())]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class TimmStyle(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.stages = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), nn.GELU()) for c in (8, 16, 32)])
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class SkipAcross(nn.Module):
    """A skip connection from before layer1 to after layer2: no single tensor flows across cut layer1."""

    def __init__(self):
        super().__init__()
        self.layer1, self.layer2, self.fc = nn.Conv2d(3, 3, 3, 1, 1), nn.Conv2d(3, 3, 3, 1, 1), nn.Linear(3, 4)

    def forward(self, x):
        return self.fc((self.layer2(self.layer1(x)) + x).mean((2, 3)))


X = torch.randn(4, 3, 32, 32)


def _named():
    model = nn.Module()
    model.conv, model.fc = nn.Conv2d(3, 3, 1), nn.Linear(3, 2)
    return model


def trained_bn(model):
    """Running statistics that are not the defaults, so that eval mode matters."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("make, cuts", [
    (TorchvisionResNet, ["layer1", "layer2", "layer3"]),
    (lambda: TorchvisionResNet(max_pool=True), ["layer1", "layer2", "layer3"]),
    (FeaturesNet, ["features.1", "features.3", "features.5"]),
    (TimmStyle, ["stages.0", "stages.1", "stages.2"]),
])
def test_blocks_are_found_and_compute_exactly_what_the_model_computes(make, cuts):
    model = trained_bn(make())
    assert find_cuts(model, X) == cuts
    net = wrap(model, X)
    assert net.num_blocks == 3 and torch.equal(net.eval()(X), model(X))
    features = net.features(X)
    assert [f.dim() for f in features] == [4, 4, 4] and net.forward_from(2, features[1]).shape == (4, 10)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters()), "shared, not copied"
    ours = net.source_state_dict()
    assert ours.keys() == model.state_dict().keys() and all(torch.equal(ours[k], v) for k, v in model.state_dict().items())


def test_the_attribute_wrapper_refuses_a_forward_it_would_change():
    """The forward pools with F.adaptive_max_pool2d beside an unused avgpool: listing modules computes another network."""
    model = trained_bn(TorchvisionResNet(max_pool=True))
    with pytest.raises(SplitError, match="computes something else: the largest logit difference"):
        BlockNet.from_module(model, stem=["conv1", "bn1", "relu", "maxpool"], blocks=["layer1", "layer2", "layer3"],
                             head=["avgpool", "fc"], sample_input=X)
    assert torch.equal(split_model(model, ["layer1", "layer2", "layer3"], X)(X), model(X)), "the graph split keeps it"


def test_a_value_crossing_a_cut_and_bad_names_are_refused():
    with pytest.raises(SplitError, match="crosses the cut"):
        split_model(SkipAcross(), ["layer1", "layer2"], X)
    with pytest.raises(SplitError, match="no module 'layer9' runs"):
        split_model(TorchvisionResNet(), ["layer1", "layer9"], X)
    with pytest.raises(SplitError, match="not in forward order"):
        split_model(TorchvisionResNet(), ["layer2", "layer1"], X)
    with pytest.raises(SplitError, match="no usual block layout found .*its children are conv, fc"):
        find_cuts(_named(), X)


def test_gradients_reach_a_wrapped_student_through_a_wrapped_teacher():
    teacher, student = wrap(trained_bn(TorchvisionResNet(width=16)), X), wrap(TorchvisionResNet(width=8), X)
    kd = BlockKD(teacher, student, cuts=[1, 2], sample_input=X)
    kd.train()
    out = kd(X, torch.randint(0, 10, (4,)))
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


def test_check_same_output_restores_training_mode():
    model = TorchvisionResNet().train()
    net = split_model(model, ["layer1", "layer2", "layer3"])
    check_same_output(model, net, X)
    assert model.training and model.layer1[0].bn1.training
