"""Users' own models on the command line: a module in the working directory (Ray workers import
it), ``module:factory`` and Hydra ``_target_`` specs, blocks cut along the forward graph, the
student saved under its own class's names, bad specs refused with exit 2 before Ray starts."""
import subprocess
import sys
import textwrap

import pytest
import ray
import torch
from conftest import REPO, assert_console_is_bkds

from orchestrator import tune as tune_entry
from orchestrator.console.cli import entry_point

MODULE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Stage(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))


    class Net(nn.Module):
        """torchvision's ResNet names; the forward pools with a functional op and scales between blocks."""

        def __init__(self, width=8, num_classes=10, in_channels=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1)
            self.layer1, self.layer2, self.layer3 = Stage(width, width, 1), Stage(width, 2 * width, 2), Stage(2 * width, 2 * width, 2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)  # never runs: the forward max-pools
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            x = self.layer1(F.relu(self.conv1(x)))
            x = self.layer3(self.layer2(x) * 0.5)
            return self.fc(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


    def teacher(num_classes, in_channels):
        return Net(16, num_classes, in_channels)


    def not_a_model(num_classes, in_channels):
        return 3


    def vit(num_classes, in_channels):
        """timm's ViT layout (6 blocks) on digits: patch 2, a class token."""
        from bkd_core.models.vit import VisionTransformer
        return VisionTransformer(num_classes, in_channels, image_size=8, patch=2, dim=32, depth=6, heads=2)


    class Lift(nn.Module):
        def forward(self, x):
            return x.unsqueeze(1)


    class FiveD(nn.Module):
        """A block that outputs a 5-D tensor."""

        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.layer1 = nn.Conv2d(in_channels, 4, 3, 1, 1)
            self.layer2, self.layer3 = Lift(), nn.Conv3d(1, 4, 3, 1, 1)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(self.layer3(self.layer2(self.layer1(x))).mean((2, 3, 4)))


    class OddTokens(nn.Module):
        """A block that outputs 74 tokens of an 8x8 image: no prefix of up to 8 leaves a grid."""

        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.layer1 = nn.Conv2d(in_channels, 4, 3, 1, 1)
            self.layer2, self.layer3 = nn.Linear(8, 74), nn.Linear(4, 4)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            t = self.layer2(self.layer1(x).flatten(2)[:, :, :8]).transpose(1, 2)  # (B, 74, 4)
            return self.fc(self.layer3(t).mean(1))


    class Skip(nn.Module):
        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(in_channels, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 1), nn.Linear(4, num_classes)

        def forward(self, x):
            y = self.a(x)
            return self.fc((self.b(y) + y).mean((2, 3)) + x.mean())
''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's working directory holding their own models."""
    (tmp_path / "mymodels.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mymodels", None)
    return tmp_path


def common(ws):
    return [f"mlflow.tracking_uri=sqlite:///{ws}/m.db", f"ray.storage_path={ws}/ray", f"output_dir={ws}/out"]


@pytest.mark.parametrize("override, key, fragment", [
    (["pair.teacher=nosuchmodule:net"], "pair.teacher", "cannot import module 'nosuchmodule'"),
    (["pair.teacher=mymodels:missing"], "pair.teacher", "has no callable 'missing'"),
    (["pair.teacher=mymodels:not_a_model"], "pair.teacher", "returned a int, not an nn.Module"),
    (["pair.teacher=resnet_999"], "pair.teacher", "unknown model 'resnet_999'"),
    (["pair.student={_target_:mymodels.Skip}", "pair.student_blocks=[a,b]"], "pair.student_blocks", "crosses the cut"),
    (["pair.student={_target_:mymodels.Skip}"], "pair.student", "no usual block layout"),
    (["pair.student={_target_:mymodels.Net,width:4,num_classes:3}"], "pair.student", "gives 3 logits"),
    (["pair.teacher=mymodels:teacher", "pair.teacher_blocks=[layer1,layer2]"], "pair",
     "has 2 blocks (ending at layer1, layer2) and student tiny_cnn has 3"),
    (["pair.teacher={_target_:mymodels.FiveD}"], "pair", "block 2 of the teacher FiveD (ending at layer2) outputs a 5-D tensor"),
    (["pair.student={_target_:mymodels.OddTokens}"], "pair", "block 3 of the student OddTokens (ending at layer3) outputs 74 tokens"),
])
def test_bad_model_specs_exit_2_before_ray(project, override, key, fragment, capsys):
    before = ray.is_initialized()
    assert entry_point(tune_entry.run, common(project) + override) == 2
    err = capsys.readouterr().err
    assert f"configuration error in `{key}`" in err and fragment in err, err
    assert ray.is_initialized() == before


def pretrained(project, classes=5):
    """A checkpoint of the user's teacher class trained for another number of classes, in a DDP wrapper's names."""
    import mymodels

    torch.manual_seed(1)
    path = project / "pretrained.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in mymodels.teacher(classes, 1).state_dict().items()}}, path)
    return path


def test_pretrained_starts_load_what_fits_and_replace_the_classifier(project, capsys):
    from orchestrator.config.compose import compose
    from orchestrator.config.job import validate

    path = pretrained(project)
    job = validate(compose(common(project) + ["pair.teacher=mymodels:teacher", f"teacher.init={path}", "pair.student=mymodels:teacher",
                                              f"student.init={path}"]))
    out = capsys.readouterr().out
    assert f"teacher.init={path}: 20 tensors loaded, 2 (fc.weight, fc.bias) replaced" in out, out
    assert f"student.init={path}: 20 tensors loaded" in out and job.cfg.teacher.init == str(path)
    assert entry_point(tune_entry.run, common(project) + [f"teacher.init={project / 'nope.pt'}"]) == 2
    assert "configuration error in `teacher.init`" in capsys.readouterr().err
    assert entry_point(tune_entry.run, common(project) + [f"teacher.init={path}", f"teacher.checkpoint={path}"]) == 2
    assert "keep one" in capsys.readouterr().err


@pytest.mark.ray
def test_a_search_and_a_comparison_train_the_users_own_models_from_the_working_directory(project):
    """Through the command line, as a user runs it: Ray workers import mymodels themselves; the teacher
    fine-tunes from a 5-class checkpoint of its class."""
    path = pretrained(project)
    models = ["pair.teacher=mymodels:teacher", "pair.student={_target_:mymodels.Net,width:8,num_classes:10,in_channels:1}",
              f"teacher.init={path}", "ray.address=local", "ray.num_cpus=2", "train.epochs=2", "teacher.epochs=2", *common(project)]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(project)}
    argv = [sys.executable, "-m", "orchestrator.tune", *models, "tune.num_samples=1", "tune.name=own"]
    done = subprocess.run(argv, cwd=project, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 (fc.weight, fc.bias) replaced" in done.stdout
    assert_console_is_bkds(done.stdout + done.stderr)
    teacher_epochs = [line for line in done.stdout.splitlines() if "teacher epoch" in line]
    assert [line.split(":")[0] for line in teacher_epochs] == ["[bkd] teacher epoch 1/2", "[bkd] teacher epoch 2/2"], done.stdout
    argv = [sys.executable, "-m", "orchestrator.compare", *models, "compare.methods=[kd,blockkd]", "compare.seeds=1", "tune.name=own-cmp"]
    done = subprocess.run(argv, cwd=project, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "reusing teacher from MLflow run" in done.stdout
    import pyarrow.parquet as pq
    rows = pq.read_table(project / "out" / "own-cmp" / "compare.parquet").to_pylist()
    assert {r["method"] for r in rows} == {"kd", "blockkd"} and all(r["status"] == "FINISHED" for r in rows)
    import mymodels

    student = mymodels.Net(8, 10, 1)
    student.load_state_dict(torch.load(project / "out" / "own" / "student.pt", weights_only=True), strict=True)
    teacher = mymodels.teacher(10, 1)
    teacher.load_state_dict(torch.load(project / "out" / "own" / "teacher.pt", weights_only=True), strict=True)
    from bkd_core.data import BatchLoader, load

    splits = load("digits")
    x, y = next(iter(BatchLoader(splits.test, 449, train=False)))
    assert (teacher.eval()(x).argmax(1) == y).float().mean() > 0.5, "the teacher's own class, its trained weights"


def test_describe_prints_the_pair_as_blocks_before_any_training(project, capsys):
    from orchestrator import describe

    argv = common(project) + ["pair.teacher=mymodels:teacher", "pair.student={_target_:mymodels.Net,width:8}"]
    assert entry_point(describe.run, argv) == 0
    out = capsys.readouterr().out
    assert "block  teacher ends at  teacher output" in out
    assert out.count("layer2") == 2 and "32x4x4" in out and "16x4x4" in out and "Connector 576 params" in out
    assert "student Net: 4,362" in out  # its parameters, counted over the blocks and the head
    assert entry_point(describe.run, common(project) + ["pair.teacher=nosuchmodule:net"]) == 2


def test_describe_groups_a_vits_blocks_and_names_each_form_and_connector(project, capsys):
    """A user's ViT (6 transformer blocks) as teacher of a 3-stage CNN, then as its student."""
    from orchestrator import describe

    assert entry_point(describe.run, common(project) + ["pair.teacher=mymodels:vit", "pair.student=mymodels:teacher"]) == 0
    out = capsys.readouterr().out
    assert "the teacher's 6 blocks (ending at blocks.0, blocks.1, blocks.2, blocks.3, blocks.4, blocks.5) are grouped into 3" in out
    assert "17x32 (tokens 1+4x4 of 32)" in out and out.count("FormConnector map->tokens") == 3, out
    assert entry_point(describe.run, common(project) + ["pair.teacher=mymodels:teacher", "pair.student=mymodels:vit",
                                                       "pair.student_blocks=[blocks.0,blocks.2,blocks.5]"]) == 0
    out = capsys.readouterr().out
    assert "grouped" not in out and out.count("FormConnector tokens->map") == 3 and "blocks.2" in out, out
