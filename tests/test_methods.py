"""The method registry: every method behind one name, one output type, and errors that name the fix."""
import pytest
import torch

from bkd_core import methods, models
from bkd_core.methods import Distiller, DistillOutput, register
from search_spaces.space import defaults, load_space, method_arguments, method_of
from search_spaces.space import names as space_names


def pair():
    torch.manual_seed(0)
    return models.create("tiny_resnet", 10, 1), models.create("tiny_cnn", 10, 1)


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


PARAMS = {"none": {}, "kd": {"temperature": 2.0}, "dkd": {"dkd_beta": 2.0}, "kd_ls": {}, "dist": {"dist_inter": 1.0},
          "loca": {"loca_alpha": 0.8}, "blockkd": {"cuts": [1, 3], "gamma": 1.0}, "blockkd_fixed_partition": {"gamma": 1.0},
          "fitnet": {"hint_block": 2}, "at": {}, "rkd": {}, "crd": {"nce_k": 12}, "reviewkd": {}, "ofa": {"ofa_eps": 1.5}}


IMAGE_METHODS = [name for name in methods.names() if name != "uld"]  # ULD reads two tokenizations: tests/test_lm_core.py


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_every_method_trains_its_student_through_one_output_type(name):
    teacher, student = pair()
    x, y = batch()
    distiller = methods.make(name, teacher, student, sample_input=x, **PARAMS[name])
    assert isinstance(distiller, Distiller) and distiller.name == name and distiller.student is student
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller.train()
    out = distiller(x, y)
    assert isinstance(out, DistillOutput) and out.student_logits.shape == (6, 10)
    assert out.loss.ndim == 0 and out.parts and all(v.ndim == 0 and not v.requires_grad for v in out.parts.values())
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_one_vocabulary_every_space_is_the_method_of_its_name():
    """What ``search=`` and ``compare.methods`` take is what ``methods.make`` takes, and nothing else."""
    assert space_names() == methods.names()
    for space in space_names():
        assert method_of(load_space(space)).name == space
    assert methods.get("blockkd").uses_partition and not methods.get("kd").uses_partition


@pytest.mark.parametrize("space_name", IMAGE_METHODS)
def test_a_method_made_by_name_gives_the_loss_of_the_searchs_trial(space_name):
    """A user's ``methods.make(name, teacher, student, **the space's parameters)`` against the trial's own path
    (``method_arguments`` of the space's default configuration): the same loss on the same batch."""
    space = load_space(space_name)
    config = defaults(space, pair()[1].num_blocks)
    user_params = {k: v for k, v in config.items() if k not in ("lr", "cuts") and not k.startswith("w_")}
    trial_name, trial_params = method_arguments(space, config)
    x, y = batch()
    losses = []
    for name, params in ((space_name, user_params), (trial_name, trial_params)):
        teacher, student = pair()
        torch.manual_seed(3)
        distiller = methods.make(name, teacher, student, sample_input=x, **params)
        losses.append(distiller.train()(x, y).loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6), (space_name, user_params, trial_params)


def test_a_logit_method_keeps_its_own_loss():
    teacher, student = pair()
    with pytest.raises(ValueError, match="the method 'dkd' is logit loss 'dkd'; drop logit_loss='kd'"):
        methods.make("dkd", teacher, student, logit_loss="kd")
    assert methods.make("dist", teacher, student).logit_loss == "dist"


def test_unknown_method_and_bad_parameters_say_what_to_do():
    teacher, student = pair()
    with pytest.raises(ValueError, match="unknown distillation method 'fitnett'; registered: at, blockkd, blockkd_fixed_partition, crd, dist, dkd, fitnet, kd, kd_ls, "
                       "loca, none, ofa, reviewkd, rkd"):
        methods.make("fitnett", teacher, student)
    with pytest.raises(ValueError, match="none .* takes no parameters; drop \\['temperature'\\]"):
        methods.make("none", teacher, student, temperature=4.0)
    with pytest.raises(ValueError, match="already registered"):
        register("blockkd")(type("Again", (Distiller,), {}))


def test_a_method_registered_by_a_user_is_made_by_name():
    class Mimic(Distiller):
        """The student's logits pulled toward the teacher's (mean squared error)."""

        def __init__(self, teacher, student, weight=1.0):
            super().__init__()
            self.teacher, self.student, self.weight = teacher.eval().requires_grad_(False), student, weight

        def forward(self, x, y):
            logits = self.student(x)
            loss = self.weight * (logits - self.teacher(x)).pow(2).mean()
            return DistillOutput(loss, logits, parts={"loss": loss.detach()})

    register("mimic_test")(Mimic)
    try:
        teacher, student = pair()
        x, y = batch()
        distiller = methods.make("mimic_test", teacher, student, weight=0.5)
        assert distiller.weight == 0.5 and distiller(x, y).loss > 0
    finally:
        from bkd_core.methods import registry
        registry._METHODS.pop("mimic_test")
