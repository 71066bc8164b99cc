"""Hugging Face image transformers as blocks (bkd_core.models.hf_vision): tiny ViT and DeiT classifiers made
from configs (nothing from the hub) reproduce their logits as blocks, pair with a CNN student through the
token connectors, and reach describe through a user's factory."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from bkd_core import BlockKD, models  # noqa: E402
from bkd_core.forms import infer_form  # noqa: E402
from bkd_core.models.hf_vision import from_hf_image  # noqa: E402


def hf_model(kind: str, num_classes: int = 10, in_channels: int = 1):
    torch.manual_seed(0)
    common = dict(image_size=8, patch_size=2, num_channels=in_channels, hidden_size=32, num_hidden_layers=6,
                  num_attention_heads=2, intermediate_size=64, num_labels=num_classes)
    if kind == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(**common))
    return transformers.DeiTForImageClassification(transformers.DeiTConfig(**common))


def hf_vit(num_classes: int = 10, in_channels: int = 1):
    """A user's factory: an HF ViT as a BlockNet (``pair.teacher=test_hf_vision:hf_vit``)."""
    return from_hf_image(hf_model("vit", num_classes, in_channels), groups=3, sample=torch.randn(2, in_channels, 8, 8))


@pytest.mark.parametrize("kind, prefix", [("vit", 1), ("deit", 2)])
def test_an_hf_image_transformer_as_blocks_gives_its_own_logits_and_token_forms(kind, prefix):
    model = hf_model(kind)
    x = torch.randn(3, 1, 8, 8)
    net = from_hf_image(model, groups=3, sample=x)  # raises unless the blocks reproduce the model's logits
    assert net.num_blocks == 3 and set(net.source_state_dict()) <= set(model.state_dict())
    with torch.no_grad():
        forms = [infer_form(f.shape[1:], (8, 8)) for f in net.features(x)]
    assert all(f.kind == "tokens" and f.prefix == prefix and f.grid == (4, 4) for f in forms), forms


def test_an_hf_vit_teacher_distils_into_a_cnn_and_stays_frozen():
    teacher, student = hf_vit(), models.create("tiny_cnn", 10, 1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    kd = BlockKD(teacher, student, cuts=[1, 2, 3], gamma=1.0, sample_input=x)
    kd.train()
    optimizer = torch.optim.SGD(kd.trainable_parameters(), lr=0.1)
    kd(x, y).loss.backward()
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_a_users_factory_returning_an_hf_vit_reaches_describe(capsys):
    from orchestrator import describe
    from orchestrator.console.cli import entry_point

    assert entry_point(describe.run, ["pair.teacher=test_hf_vision:hf_vit", "pair.student=tiny_cnn"]) == 0
    out = capsys.readouterr().out
    assert "tokens 1+4x4 of 32" in out and "FormConnector map->tokens" in out, out


def test_a_model_without_that_layout_is_refused():
    with pytest.raises(ValueError, match="not an image transformer bkd cuts by hand"):
        from_hf_image(transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)))
