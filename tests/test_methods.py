"""The method registry: every method behind one name, one output type, and errors that name the fix."""
import pytest
import torch

from bkd_core import methods, models
from bkd_core.methods import Distiller, DistillOutput, register
from search_spaces.space import load_space, method_of
from search_spaces.space import names as space_names


def pair():
    torch.manual_seed(0)
    return models.create("tiny_resnet", 10, 1), models.create("tiny_cnn", 10, 1)


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


PARAMS = {"none": {}, "logit": {"logit_loss": "dkd", "temperature": 2.0}, "blockkd": {"cuts": [1, 3], "gamma": 1.0},
          "fitnet": {"hint_block": 2}, "at": {}, "rkd": {}, "crd": {"nce_k": 12}, "reviewkd": {}, "ofa": {"ofa_eps": 1.5}}


@pytest.mark.parametrize("name", methods.names())
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


def test_the_registry_knows_the_shipped_methods_and_every_space_names_one():
    assert methods.names() == ["at", "blockkd", "crd", "fitnet", "logit", "none", "ofa", "reviewkd", "rkd"]
    for space in space_names():
        assert method_of(load_space(space)).name in methods.names(), space
    assert methods.get("blockkd").uses_partition and not methods.get("logit").uses_partition


def test_unknown_method_and_bad_parameters_say_what_to_do():
    teacher, student = pair()
    with pytest.raises(ValueError, match="unknown distillation method 'fitnett'; registered: at, blockkd, crd, fitnet, logit, none, ofa, reviewkd, rkd"):
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
