"""Block outputs of every usual form (conv maps, channels-last maps, tokens with prefix tokens, pooled
vectors), the connectors between every pair of forms, and transformer pairs in Block-KD: the teacher frozen
(LayerNorm, attention), gradients through its attention blocks. The layouts are written here with timm's
and torchvision's module names (neither imports with this CPU torch)."""
import itertools
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bkd_core import BlockKD, models
from bkd_core.connectors import Connector, FormConnector, build_connector
from bkd_core.forms import Form, FormError, infer_form
from bkd_core.graph_split import wrap
from bkd_core.models.vit import VisionTransformer


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 512), st.integers(1, 64), st.sampled_from([1, 2, 4, 8, 16, 32]), st.sampled_from([(1, 1), (4, 3), (3, 4), (2, 1)]),
       st.sampled_from(["map", "channels_last"]))
def test_a_map_is_told_from_a_channels_last_map_by_the_images_aspect_ratio(channels, scale, stride, aspect, kind):
    """A grid is the image divided by one stride; its channels follow no ratio unless they equal the grid's."""
    image = (aspect[0] * scale * stride, aspect[1] * scale * stride)
    grid = (image[0] // stride, image[1] // stride)
    form = Form(kind, channels, grid)
    found = infer_form(form.shape, image)
    ambiguous = kind == "channels_last" and (channels, grid[0]) in {(grid[0], grid[1]), (grid[1], channels)}
    ambiguous |= infer_form((grid[0], grid[1], channels), image).kind == infer_form((channels, *grid), image).kind
    if not ambiguous:
        assert found == form


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 24), st.sampled_from([(1, 1), (4, 3)]), st.integers(0, 2), st.integers(8, 96))
def test_tokens_are_a_grid_after_their_prefix_tokens(side, aspect, prefix, dim):
    grid = (side * aspect[0], side * aspect[1])
    image = (grid[0] * 16, grid[1] * 16)
    assert infer_form((prefix + grid[0] * grid[1], dim), image) == Form("tokens", dim, grid, prefix)


def test_outputs_bkd_cannot_bridge_are_named_with_the_forms_it_can():
    with pytest.raises(FormError, match="5-D tensor of shape .*bkd bridges conv maps"):
        infer_form((2, 8, 4, 4), (32, 32), "block 2 of the teacher")
    with pytest.raises(FormError, match="141 tokens of 192, and no count of up to 8 prefix tokens"):
        infer_form((141, 192), (32, 32))


FORMS = {
    "map": Form("map", 24, (8, 8)),
    "channels_last": Form("channels_last", 40, (4, 4)),
    "tokens": Form("tokens", 32, (4, 4), 1),
    "tokens without prefix": Form("tokens", 48, (2, 2), 0),
    "vector": Form("vector", 64),
}


@pytest.mark.parametrize("source, target", list(itertools.permutations(FORMS, 2)) + [("tokens", "tokens")])
def test_every_pair_of_forms_is_bridged_both_ways_with_gradients(source, target):
    s, t = FORMS[source], FORMS[target]
    if source == target == "tokens":
        s = Form("tokens", 16, (2, 2), 1)  # another width, grid and the same prefix: the student's class token is mapped
    connector = build_connector("conv1x1", s.shape, t.shape, image=(16, 16))
    x = torch.randn(3, *s.shape, requires_grad=True)
    out = connector(x)
    assert tuple(out.shape) == (3, *t.shape), (source, target)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if source == target == "tokens":
        assert connector.own_prefix and x.grad[:, :1].abs().sum() > 0, "the student's prefix token reaches the teacher's"


def test_two_conv_maps_keep_the_conv_connector():
    assert isinstance(build_connector("conv1x1", (8, 8, 8), (16, 4, 4), image=(8, 8)), Connector)
    assert isinstance(build_connector("conv1x1", (8, 8, 8), (17, 32), image=(8, 8)), FormConnector)


class SwinLike(nn.Module):
    """torchvision's Swin layout in small: ``features`` of patch embedding then stages writing (B, H, W, C)."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, 16, 2, 2), Permute(0, 2, 3, 1), nn.LayerNorm(16)),  # 4x4x16
            Stage(16), Merge(16), Stage(32), Merge(32), Stage(64))
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.features(x)).mean((1, 2)))


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class Stage(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Merge(nn.Module):
    """Patch merging: 2x2 neighbours concatenated, then a linear layer to twice the channels."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(x)


def test_a_swin_style_model_is_cut_where_its_resolution_changes_into_channels_last_maps():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    net = wrap(SwinLike(), x, ["features.1", "features.3", "features.5"])
    forms = [infer_form(f.shape[1:], (8, 8)) for f in net.features(x)]
    assert [f.kind for f in forms] == ["channels_last"] * 3 and [f.grid for f in forms] == [(4, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize("teacher_name, student_name", [("vit_tiny_p2_8", "tiny_cnn"), ("tiny_resnet", "vit_tiny_p2_8"),
                                                        ("swin", "tiny_cnn")])
def test_mixed_pairs_train_through_the_frozen_teacher(teacher_name, student_name):
    """ViT -> CNN, CNN -> ViT, Swin-style -> CNN: stones in both ways, stacked and one by one give the same
    loss, gradients reach the student through the teacher's (attention) blocks, and after a step the teacher,
    LayerNorms included, is unchanged and in eval mode."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    make = lambda name: wrap(SwinLike(), x, ["features.1", "features.3", "features.5"]) if name == "swin" else models.create(name, 10, 1)  # noqa: E731
    teacher, student = make(teacher_name), make(student_name)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = BlockKD(teacher, student, cuts=[1, 2, 3], gamma=1.0, sample_input=x)
    kd.eval()  # no BatchNorm batch statistics: stacked and one-by-one stones compare exactly
    stacked = kd(x, y).loss
    kd.stack_stones = False
    assert torch.allclose(stacked, kd(x, y).loss, atol=1e-5)
    kd.stack_stones = True
    kd.train()
    stone = kd.logits(x)[1][1]  # stone 1: student block 1 -> connector -> teacher blocks 2, 3 and head
    grads = torch.autograd.grad(nn.functional.cross_entropy(stone, y), list(kd.student.blocks[0].parameters()))
    assert all(g.abs().sum() > 0 for g in grads), "no gradient through the teacher's blocks"
    optimizer = torch.optim.SGD(kd.trainable_parameters(), lr=0.1)
    kd(x, y).loss.backward()
    optimizer.step()
    assert not kd.teacher.training
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items()), "the teacher changed"


def test_a_vit_in_timms_names_loads_a_timm_state_dict_and_keeps_its_names():
    torch.manual_seed(0)
    source = VisionTransformer(10, 1, image_size=8, patch=2, dim=32, depth=6, heads=2)
    state = source.state_dict()
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.5.attn.qkv.weight", "norm.weight", "head.weight"} <= set(state)
    net = models.create("vit_tiny_p2_8", 10, 1)
    net.load_state_dict(net.from_source_names(state))
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(net.eval()(x), source.eval()(x), atol=1e-5)
    assert set(net.source_state_dict()) == set(state)


class TorchvisionViT(nn.Module):
    """torchvision's ViT layout in small: conv_proj, class_token, encoder.{pos_embedding, layers.encoder_layer_N, ln}, heads."""

    def __init__(self, num_classes=10, in_channels=1, dim=16, depth=4):
        super().__init__()
        self.conv_proj = nn.Conv2d(in_channels, dim, 2, 2)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.encoder.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)) for i in range(depth)))
        self.encoder.ln = nn.LayerNorm(dim)
        self.heads = nn.Sequential(nn.Linear(dim, num_classes))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.encoder.pos_embedding
        x = self.encoder.ln(self.encoder.layers(x))
        return self.heads(x[:, 0])


@pytest.mark.parametrize("make, ends", [
    (lambda: VisionTransformer(10, 1, image_size=8, patch=2, dim=32, depth=3, heads=2), ["blocks.0", "blocks.1", "blocks.2"]),
    (TorchvisionViT, [f"encoder.layers.encoder_layer_{i}" for i in range(4)]),
])
def test_transformer_layouts_are_found_and_cut_exactly(make, ends):
    """timm's ``blocks.N`` and torchvision's ``encoder.layers.encoder_layer_N``: found, and as blocks the
    model computes its own logits (the exactness check in ``wrap``)."""
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(3, 1, 8, 8)
    net = wrap(model, x)
    assert net.block_ends == ends
    assert torch.allclose(net.eval()(x), model(x), atol=1e-5)
    assert all(infer_form(f.shape[1:], (8, 8)) == Form("tokens", f.shape[-1], (4, 4), 1) for f in net.features(x))


def test_a_compiled_step_runs_with_a_vision_transformer_teacher():
    """torch.compile (the trainer's default on CUDA) through a frozen ViT teacher: its class token's ``expand``
    of a parameter must not meet inference tensors (traced here with the aot_eager backend: no C++ build)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    kd = BlockKD(models.create("vit_tiny_p2_8", 10, 1), models.create("tiny_cnn", 10, 1), cuts=[1, 3], sample_input=x)
    out = torch.compile(kd, backend="aot_eager")(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in kd.student.parameters())
