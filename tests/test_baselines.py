"""The field's baselines (FitNet, AT, RKD, CRD, ReviewKD, OFA, DIST, LoCa): each loss against its paper's
formula computed another way (loops, numpy) on fixed tensors, and each method trains a step on a zoo pair
and on pairs of other layouts (a user's CNN, a ViT, a Swin-style model) without touching the teacher."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bkd_core import methods, models
from bkd_core.blocknet import BlockNet
from bkd_core.losses import dist_loss, loca_kd_loss, loca_targets, make_logit_distance
from bkd_core.methods.at import at_loss
from bkd_core.methods.crd import contrastive_loss
from bkd_core.methods.ofa import ofa_loss
from bkd_core.methods.reviewkd import hcl_loss
from bkd_core.methods.rkd import angle_term, distance_term
from tests.test_forms import SwinLike, wrap

FEATURE_METHODS = ["fitnet", "at", "rkd", "crd", "reviewkd", "ofa"]


def fixed(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def test_at_loss_is_the_mse_of_normalised_channel_means_of_squares():
    s, t = fixed(3, 4, 4, 4), fixed(3, 6, 4, 4, seed=1)
    expected = 0.0
    for i in range(3):
        a = np.mean(s[i].numpy() ** 2, axis=0).ravel()
        b = np.mean(t[i].numpy() ** 2, axis=0).ravel()
        expected += np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2)
    expected /= 3 * 16
    assert at_loss(s, t, 2.0).item() == pytest.approx(expected, rel=1e-5)
    big = fixed(3, 4, 8, 8, seed=2)  # the larger grid is pooled to the smaller one
    assert at_loss(big, t).item() == pytest.approx(at_loss(F.avg_pool2d(big, 2), t).item(), rel=1e-6)


def smooth_l1(a, b):
    d = np.abs(a - b)
    return np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5))


def test_rkd_terms_follow_the_papers_distance_and_angle_potentials():
    s, t = fixed(5, 7).double(), fixed(5, 3, seed=1).double()

    def distances(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(len(e))] for i in range(len(e))])
        return d / d[d > 0].mean()

    def angles(e):
        out = []
        for i, j, k in itertools.product(range(len(e)), repeat=3):
            u, v = e[j] - e[i], e[k] - e[i]
            nu, nv = np.linalg.norm(u), np.linalg.norm(v)
            out.append(0.0 if nu == 0 or nv == 0 else u @ v / (nu * nv))
        return np.array(out)

    s_np, t_np = s.numpy(), t.numpy()
    assert distance_term(s, t).item() == pytest.approx(smooth_l1(distances(s_np), distances(t_np)), rel=1e-6)
    assert angle_term(s, t).item() == pytest.approx(smooth_l1(angles(s_np), angles(t_np)), rel=1e-6)


def test_hcl_weighs_the_map_and_its_poolings_half_per_level():
    s, t = fixed(2, 3, 8, 8), fixed(2, 3, 8, 8, seed=1)
    terms = [(1.0, s, t)] + [(0.5**(k + 1), F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
                             for k, level in enumerate((4, 2, 1))]
    expected = sum(w * ((a - b) ** 2).mean().item() for w, a, b in terms) / sum(w for w, _, _ in terms)
    assert hcl_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    small_s, small_t = s[:, :, :2, :2], t[:, :, :2, :2]  # a 2x2 map: only the 1x1 level lies below it
    expected = (((small_s - small_t) ** 2).mean() + 0.5 * ((small_s.mean((2, 3)) - small_t.mean((2, 3))) ** 2).mean()) / 1.5
    assert hcl_loss(small_s, small_t).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("eps, temperature", [(1.0, 1.0), (1.5, 1.0), (1.2, 3.0)])
def test_ofa_loss_by_hand(eps, temperature):
    s, t, y = fixed(4, 5), fixed(4, 5, seed=1), torch.tensor([0, 3, 3, 1])
    expected = 0.0
    for i in range(4):
        p_t = np.exp(t[i].numpy() / temperature) / np.exp(t[i].numpy() / temperature).sum()
        log_p_s = s[i].numpy() / temperature - math.log(np.exp(s[i].numpy() / temperature).sum())
        onehot = np.eye(5)[y[i]]
        expected -= np.sum(((p_t + onehot) ** eps - onehot) * log_p_s)
    assert ofa_loss(s, t, y, eps, temperature).item() == pytest.approx(expected / 4, rel=1e-5)
    if eps == 1.0:  # eps 1: KD's soft cross-entropy to the teacher
        soft = -(F.softmax(t / temperature, 1) * F.log_softmax(s / temperature, 1)).sum(1).mean()
        assert ofa_loss(s, t, y, eps, temperature).item() == pytest.approx(soft.item(), rel=1e-5)


def test_crd_contrastive_loss_is_the_softmax_over_positive_and_negatives():
    a, p, m = (F.normalize(fixed(3, 4, seed=k), dim=1) for k in range(3))
    tau = 0.1
    expected = 0.0
    for i in range(3):
        sims = [float(a[i] @ p[j]) for j in range(3)] + [float(a[i] @ m[j]) for j in range(3)]
        expected -= math.log(math.exp(sims[i] / tau) / sum(math.exp(v / tau) for v in sims))
    assert contrastive_loss(a, p, m, tau).item() == pytest.approx(expected / 3, rel=1e-5)


def test_dist_loss_is_one_minus_pearson_between_and_within_classes():
    s, t = fixed(6, 5), fixed(6, 5, seed=1)
    T = 2.0
    p_s, p_t = (F.softmax(z / T, 1).double().numpy() for z in (s, t))
    inter = np.mean([1 - np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(6)])
    intra = np.mean([1 - np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(5)])
    assert dist_loss(s, t, T, 2.0, 3.0).item() == pytest.approx(T**2 * (2 * inter + 3 * intra), rel=1e-4)
    assert dist_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.floats(0.05, 0.99), st.floats(0.5, 8.0), st.integers(0, 2**16))
def test_loca_puts_the_label_on_top_and_keeps_the_other_classes_ratios(classes, alpha, temperature, seed):
    t = fixed(4, classes, seed=seed) * 5
    y = torch.randint(0, classes, (4,), generator=torch.Generator().manual_seed(seed))
    q = loca_targets(t, y, temperature, alpha)
    p = F.softmax(t / temperature, 1)
    assert torch.allclose(q.sum(1), torch.ones(4), atol=1e-5)
    for i in range(4):
        others = [c for c in range(classes) if c != y[i]]
        assert q[i, y[i]] > q[i, others].max() - 1e-6  # the label is the calibrated top class
        ratio = q[i, others] / p[i, others]  # every non-target probability scaled by the same s
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
        p_y, p_max = p[i, y[i]].item(), p[i].max().item()
        assert ratio[0].item() == pytest.approx(alpha / (1 - p_y + p_max), rel=1e-4)


def test_loca_kd_is_kl_to_the_calibrated_targets_and_a_distance_stones_take():
    s, t, y = fixed(4, 6), fixed(4, 6, seed=1) * 3, torch.tensor([0, 1, 2, 5])
    q = loca_targets(t, y, 4.0, 0.9).double().numpy()
    log_p_s = F.log_softmax(s / 4.0, 1).double().numpy()
    expected = 16.0 * np.mean(np.sum(q * (np.log(q) - log_p_s), axis=1))
    assert loca_kd_loss(s, t, y, 4.0, 0.9).item() == pytest.approx(expected, rel=1e-5)
    assert make_logit_distance("loca", loca_alpha=0.9)(s, t, y, 4.0).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="0 < loca_alpha < 1"):
        make_logit_distance("loca", loca_alpha=1.5)


class UserCNN(nn.Module):
    """A user's own layout (no zoo names): ``stem``, ``body`` of two stages, ``pool``, ``classifier``."""

    def __init__(self, num_classes=10, in_channels=1, width=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()),
                                  nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU()))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.body(self.stem(x))).flatten(1))


def make_pair(kind: str, x: torch.Tensor) -> tuple[BlockNet, BlockNet]:
    torch.manual_seed(0)
    if kind == "zoo":
        return models.create("tiny_resnet", 10, 1), models.create("tiny_cnn", 10, 1)
    if kind == "user":
        return (wrap(UserCNN(width=8), x, ["stem", "body.0", "body.1"]), wrap(UserCNN(width=4), x, ["stem", "body.0", "body.1"]))
    if kind == "vit_to_cnn":
        return models.create("vit_tiny_p2_8", 10, 1), models.create("tiny_cnn", 10, 1)
    return wrap(SwinLike(), x, ["features.1", "features.3", "features.5"]), models.create("vit_tiny_p2_8", 10, 1)


@pytest.mark.parametrize("kind", ["zoo", "user", "vit_to_cnn", "swin_to_vit"])
@pytest.mark.parametrize("name", FEATURE_METHODS + ["dist", "loca"])
def test_every_baseline_trains_the_student_and_leaves_the_teacher_as_it_was(name, kind):
    x, y = fixed(6, 1, 8, 8), torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(0))
    teacher, student = make_pair(kind, x)
    distiller = methods.make(name, teacher, student, sample_input=x)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05)
    distiller.train()
    for _ in range(2):  # twice: CRD's memory is read on the second step
        optimizer.zero_grad()
        out = distiller(x, y)
        assert torch.isfinite(out.loss) and out.parts["loss_distill"] > 0, out.parts
        out.loss.backward()
        optimizer.step()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items()), "the teacher changed"
    changed = [k for k, v in student.state_dict().items() if v.is_floating_point() and not torch.equal(v, student_before[k])]
    assert len(changed) >= len([k for k, v in student.named_parameters()]) // 2
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for p in distiller.trainable_parameters())
    assert distiller.logits(x)[0].shape == (6, 10)


def test_crd_memory_is_a_queue_of_the_latest_embeddings():
    x, y = fixed(6, 1, 8, 8), torch.zeros(6, dtype=torch.long)
    teacher, student = make_pair("zoo", x)
    crd = methods.make("crd", teacher, student, sample_input=x, nce_k=8, feat_dim=4)
    assert crd.memory_bytes == 2 * 8 * 4 * 4
    crd.train()
    for _ in range(3):
        crd(x, y)
    crd(x, y)  # writes the third step's embeddings: 18 written, the last 6 in rows 12..17 mod 8
    assert int(crd.stored) == 18
    s, t = crd.embeddings(student.features(x)[-1], teacher.features(x)[-1])
    assert torch.allclose(crd.memory_student[[4, 5, 6, 7, 0, 1]], s.detach(), atol=1e-6)


def test_method_parameters_out_of_range_name_their_key():
    x = fixed(2, 1, 8, 8)
    teacher, student = make_pair("zoo", x)
    for name, params, key in [("fitnet", {"hint_block": 4}, "hint_block"), ("at", {"at_p": 0}, "at_p"),
                              ("crd", {"nce_t": 0}, "nce_t"), ("ofa", {"ofa_eps": -1}, "ofa_eps"),
                              ("rkd", {"angle_weight": -1}, "angle_weight"), ("reviewkd", {"max_mid_channels": 0}, "max_mid_channels")]:
        with pytest.raises(methods.MethodParamError) as info:
            methods.make(name, teacher, student, sample_input=x, **params)
        assert info.value.key == key
    with pytest.raises(ValueError, match="takes alpha, beta, warmup_epochs, hint_block, regressor; drop \\['cuts'\\]"):
        methods.make("fitnet", teacher, student, sample_input=x, cuts=[1])


def test_fitnet_and_reviewkd_follow_mdistillers_modules_on_a_cifar_resnet_pair():
    """resnet32x4 -> resnet8x4 (CIFAR-100), the pair mdistiller's tables use. FitNet's regressor is conv + BN + ReLU
    with the conv chosen by the grids (ConvReg); ReviewKD matches the teacher's stage outputs before their ReLU and
    one more level, the pooled feature, and brings each fused map to the teacher's grid before its 3x3 conv."""
    torch.manual_seed(0)
    teacher, student = models.create("resnet32x4", 100, 3).eval(), models.create("resnet8x4", 100, 3)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))

    fitnet = methods.make("fitnet", teacher, student, sample_input=x)
    kinds = [type(m) for m in fitnet.regressor]
    assert kinds == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU], fitnet.regressor
    hint = student.features(x)[fitnet.hint - 1]
    assert fitnet.regressor(hint).shape == teacher.features(x)[fitnet.hint - 1].shape
    assert (fitnet.regressor(hint) >= 0).all()  # as the teacher's rectified hint
    from bkd_core.forms import Form
    from bkd_core.methods.fitnet import hint_conv
    strided, transposed, valid = (hint_conv(Form("map", 16, s), Form("map", 32, t)) for s, t in
                                  (((8, 8), (4, 4)), ((4, 4), (8, 8)), ((8, 8), (6, 6))))
    assert (strided.kernel_size, strided.stride) == ((3, 3), (2, 2)) and isinstance(strided, torch.nn.Conv2d)
    assert isinstance(transposed, torch.nn.ConvTranspose2d) and (transposed.kernel_size, transposed.stride) == ((4, 4), (2, 2))
    assert valid.kernel_size == (3, 3) and valid(torch.zeros(1, 16, 8, 8)).shape == (1, 32, 6, 6)

    review = methods.make("reviewkd", teacher, student, sample_input=x)
    n = teacher.num_blocks
    assert len(review.fusions) == n + 1 and review.fusions[n].attend is None  # the pooled level, deepest, unfused
    with torch.no_grad():
        targets, last = review.teacher_features(x)
        after = teacher.features(x)
    assert len(targets) == n + 1
    for i in range(n):  # every stage end before its ReLU: negative values, and the ReLU of it is the block output
        assert (targets[i] < 0).any() and torch.allclose(torch.relu(targets[i]), after[i], atol=1e-6)
    assert torch.allclose(targets[n][:, :, 0, 0], after[-1].mean((2, 3)), atol=1e-6) and torch.equal(last, after[-1])
    out = review.train()(x, y)
    assert torch.isfinite(out.loss) and out.student_logits.shape == (4, 100)
    assert torch.allclose(out.teacher_logits, teacher(x), atol=1e-5)  # the head still reads the rectified output
