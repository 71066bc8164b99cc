"""BlockKD: gradient flow, frozen teacher, loss composition, bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F

from bkd_core import BlockKD, LogitKD, kd_loss, models


def pair(teacher="tiny_resnet", student="tiny_cnn", classes=10, channels=1):
    torch.manual_seed(0)
    return models.create(teacher, classes, channels), models.create(student, classes, channels)


def batch(n=8, channels=1, size=8, classes=10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_gradients_reach_student_and_connectors_not_teacher():
    t, s = pair()
    x, y = batch()
    kd = BlockKD(t, s, cuts=[1, 2], gamma=1.0, sample_input=x)
    kd.train()
    kd(x, y).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in kd.student.parameters())
    assert all(p.grad is not None for p in kd.connectors.parameters())
    assert all(p.grad is None for p in kd.teacher.parameters())
    assert not kd.teacher.training


def test_student_block1_gets_gradient_only_through_teacher_when_cut_is_1():
    """With alpha on stones only, student block 1 learns through the frozen teacher blocks 2..n."""
    t, s = pair()
    x, y = batch()
    kd = BlockKD(t, s, cuts=[1], sample_input=x)
    out = kd(x, y)
    stone_loss = F.cross_entropy(out.stone_logits[1], y)
    grads = torch.autograd.grad(stone_loss, list(kd.student.blocks[0].parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_teacher_weights_and_bn_stats_unchanged_after_steps():
    t, s = pair()
    x, y = batch(32)
    kd = BlockKD(t, s, sample_input=x)
    before = copy.deepcopy(kd.teacher.state_dict())
    student_before = copy.deepcopy(kd.student.state_dict())
    opt = torch.optim.SGD(kd.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    kd.train()
    for _ in range(3):
        opt.zero_grad()
        kd(x, y).loss.backward()
        opt.step()
    after = kd.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    student_after = kd.student.state_dict()
    assert all(not torch.equal(student_before[k], student_after[k]) for k in student_before if k.endswith("running_mean"))
    assert any(not torch.equal(student_before[k], student_after[k]) for k in student_before if k.endswith("weight"))


def test_loss_is_sum_of_documented_terms():
    t, s = pair()
    x, y = batch()
    alpha, beta, gamma, T = 0.7, 1.3, 0.5, 3.0
    kd = BlockKD(t, s, cuts=[1, 3], alpha=alpha, beta=beta, gamma=gamma, temperature=T, stone_weights=[0.25, 1.0], sample_input=x)
    kd.eval()
    out = kd(x, y)
    S, Tl, N = out.student_logits, out.teacher_logits, out.stone_logits
    w = {1: 0.25, 3: 1.0}
    task = F.cross_entropy(S, y) + sum(w[c] * F.cross_entropy(N[c], y) for c in (1, 3))
    distill = kd_loss(S, Tl, T) + sum(w[c] * kd_loss(N[c], Tl, T) for c in (1, 3))
    ens = (N[1] + N[3]) / 2
    cross = kd_loss(S, ens, T) + kd_loss(N[1], ens, T) + kd_loss(N[3], ens, T)
    assert out.loss.item() == pytest.approx((alpha * task + beta * distill + gamma * cross).item(), rel=1e-5)
    assert out.parts["loss_cross"].item() == pytest.approx(cross.item(), rel=1e-5)
    assert torch.allclose(Tl, kd.teacher(x))


def test_default_stone_weights_and_stone_temperature():
    t, s = pair()
    kd = BlockKD(t, s, sample_input=batch()[0], stone_temperature={1: 2.0, 2: 3.0, 3: 4.0})
    assert kd.stone_weights == {1: 0.25, 2: 0.5, 3: 1.0}
    assert kd.stone_temperatures == {1: 2.0, 2: 3.0, 3: 4.0}


def test_connectors_bridge_channels_and_space():
    t, s = models.create("resnet32x4", 100), models.create("ShuffleV1", 100)
    x = torch.randn(2, 3, 32, 32)
    kd = BlockKD(t, s, sample_input=x)
    feats = s.features(x)
    t_feats = t.features(x)
    for cut in kd.cuts:
        assert kd.connectors[str(cut)](feats[cut - 1]).shape == t_feats[cut - 1].shape


def test_auto_connector_is_identity_when_shapes_match():
    t, s = pair("tiny_resnet", "tiny_resnet")
    kd = BlockKD(t, s, connector="auto", sample_input=batch()[0])
    assert all(isinstance(c, torch.nn.Identity) for c in kd.connectors.values())
    kd = BlockKD(t, s, connector="conv1x1", sample_input=batch()[0])
    assert not any(isinstance(c, torch.nn.Identity) for c in kd.connectors.values())


def test_lazy_connectors_and_trainable_parameters_before_build():
    t, s = pair()
    kd = BlockKD(t, s)
    with pytest.raises(RuntimeError, match="sample_input"):
        list(kd.trainable_parameters())
    kd(*batch())
    assert len(kd.connectors) == 3


def test_logit_kd_baseline_has_no_stones():
    t, s = pair()
    x, y = batch()
    out = LogitKD(t, s, logit_loss="dkd", dkd_beta=2.0)(x, y)
    assert out.stone_logits == {} and torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cuts": [0, 2]}, "outside 1..3"),
        ({"cuts": [4]}, "outside 1..3"),
        ({"cuts": []}, "empty"),
        ({"cuts": [1, 2], "stone_weights": [1.0]}, "one weight per cut"),
        ({"logit_loss": "mse"}, "kd, dkd, kd_ls"),
        ({"connector": "mlp"}, "conv1x1, auto"),
    ],
)
def test_bad_input(kwargs, message):
    t, s = pair()
    with pytest.raises(ValueError, match=message):
        BlockKD(t, s, sample_input=batch()[0], **kwargs)


def test_block_count_mismatch():
    t, s = models.create("vgg13", 100), models.create("resnet20", 100)
    with pytest.raises(ValueError, match="4 blocks .* 3"):
        BlockKD(t, s)


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="resnet8x4"):
        models.create("resnet9000", 10)


def test_teacher_forward_builds_no_autograd_graph_and_losses_still_train_the_student():
    t, s = pair()
    x, y = batch()
    for loss in ("kd", "dkd", "kd_ls"):
        kd = BlockKD(t, s, sample_input=x, logit_loss=loss, gamma=1.0)
        out = kd(x, y)
        assert out.teacher_logits.grad_fn is None and not out.teacher_logits.requires_grad
        assert out.student_logits.grad_fn is not None
        out.loss.backward()
        assert all(p.grad is not None for p in kd.student.parameters())
        s.zero_grad(set_to_none=True)


@pytest.mark.parametrize("cuts", [[1, 2, 3], [1, 3], [2], [3]])
def test_stacked_stones_give_the_logits_and_gradients_of_stones_run_one_by_one(cuts):
    """``stack_stones`` runs the stones through each teacher block as one batch: N_i must not change."""
    t, s = pair()
    x, y = batch()
    kd = BlockKD(t, s, cuts=cuts, gamma=1.0, sample_input=x)
    kd.train()
    results = {}
    for stacked in (True, False):
        kd.stack_stones = stacked
        out = kd(x, y)
        grads = torch.autograd.grad(out.loss, list(kd.trainable_parameters()))
        results[stacked] = (out, grads)
    (fast, fast_grads), (plain, plain_grads) = results[True], results[False]
    assert list(fast.stone_logits) == list(plain.stone_logits) == cuts
    for cut in cuts:
        assert fast.stone_logits[cut].shape == (x.shape[0], 10)
        torch.testing.assert_close(fast.stone_logits[cut], plain.stone_logits[cut])
    torch.testing.assert_close(fast.loss, plain.loss)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b)
