"""The pair as blocks: each block's output shape, parameters and multiply-adds, and the connectors (``describe``)."""
from __future__ import annotations

import torch
from torch import nn

from bkd_core import BlockNet
from bkd_core.connectors import FormConnector, build_connector
from bkd_core.forms import infer_form
from bkd_core.graph_split import ATOL, RTOL
from bkd_core.methods import FeatureDistiller
from orchestrator.config.job import Job
from orchestrator.config.models import block_names, build_model, spec_name
from orchestrator.data.datasets import example_batch, image_of
from search_spaces.space import defaults, method_arguments, method_of


def multiply_adds(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(module(x), multiply-adds per image of its convolutions and linear layers; attention's own products of
    tokens are not counted)."""
    total = [0]

    def count(layer: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if isinstance(layer, nn.Conv2d):
            total[0] += out[0].numel() * (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.Linear):  # once per position: every token of a sequence, once for a vector
            total[0] += out[0].numel() // layer.out_features * layer.in_features * layer.out_features

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        out = module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return out, total[0]


def count_text(value: float) -> str:
    """Multiply-adds in M (G above 10,000 M, k below 0.01 M)."""
    if value >= 1e10:
        return f"{value / 1e9:.1f}G"
    return f"{value / 1e6:.2f}M" if value >= 1e4 or value == 0 else f"{value / 1e3:.2f}k"


def block_rows(net: BlockNet, sample: torch.Tensor) -> list[tuple[tuple[int, ...], int, int]]:
    """(output shape, parameters, multiply-adds per image) of every block and, last, the head."""
    rows, x = [], sample
    for part in [*net.blocks, net.head]:
        x, macs = multiply_adds(part, x)
        rows.append((tuple(x.shape[1:]), sum(p.numel() for p in part.parameters()), macs))
    return rows


def output_form(shape: tuple[int, ...], image: tuple[int, ...] | None) -> str:
    """A block output's shape, and its form where it is not a conv map (``bkd_core.forms``)."""
    text = "x".join(map(str, shape))
    form = infer_form(shape, image)
    return text if form.kind == "map" else f"{text} ({form})"


def table(job: Job) -> str:
    """The pair's per-block table (what ``describe`` prints and a search logs as ``describe.txt``)."""
    shape = job.dataset.shape
    image = image_of(shape)
    text = image is None
    sample = example_batch(shape, 1) if text else torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    per = sample.shape[-1] if text else 1  # text: multiply-adds per token of the sample text
    nets = {role: build_model(job.cfg, role, job.num_classes, job.in_channels, shape).eval() for role in ("teacher", "student")}
    pair = job.cfg.pair
    ends = {role: block_names(getattr(pair, role), net, getattr(pair, f"{role}_blocks")) for role, net in nets.items()}
    with torch.no_grad():
        rows = {role: block_rows(net, sample) for role, net in nets.items()}
    macs_name = "MACs/token" if text else "MACs"
    head = ["block", "teacher ends at", "teacher output", "params", macs_name, "student ends at", "student output", "params",
            macs_name, "connector"]
    lines = [head]
    count = max(len(rows["teacher"]), len(rows["student"]))
    for i in range(count):
        cells = ["head" if i == count - 1 else str(i + 1)]
        for role in ("teacher", "student"):
            if i < len(rows[role]):
                out, params, macs = rows[role][i]
                last = i == len(rows[role]) - 1
                name = "head" if last else ends[role][i]
                cells += [name, "x".join(map(str, out)) if last else output_form(out, image), f"{params:,}", count_text(macs / per)]
            else:
                cells += ["-"] * 4
        connector = "-"
        if i < count - 1 and i < len(rows["teacher"]) - 1 and i < len(rows["student"]) - 1:
            c = build_connector(job.cfg.train.connector, rows["student"][i][0], rows["teacher"][i][0], image)
            kinds = f" {c.source.kind}->{c.target.kind}" if isinstance(c, FormConnector) else ""
            connector = f"{type(c).__name__}{kinds} {sum(p.numel() for p in c.parameters()):,} params"
        lines.append(cells + [connector])
    widths = [max(len(line[k]) for line in lines) for k in range(len(head))]
    lines_out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    lines_out.insert(1, "  ".join("-" * w for w in widths))
    inputs = f"texts of up to {shape[-1]} tokens" if text else "x".join(map(str, shape))
    totals = {role: (sum(r[1] for r in rows[role]), sum(r[2] for r in rows[role])) for role in rows}
    return "\n".join([
        f"teacher {spec_name(job.teacher_model)}: {totals['teacher'][0]:,} parameters, {count_text(totals['teacher'][1] / per)} "
        f"multiply-adds per {'token' if text else 'image'}; student {spec_name(job.student_model)}: {totals['student'][0]:,}, "
        f"{count_text(totals['student'][1] / per)} (input {inputs})", *lines_out,
        f"exactness: each model as blocks reproduces its own logits on a sample batch in eval mode (within {ATOL:g} + "
        f"{RTOL:g} x max|logit|; zoo models are built as blocks)", *method_line(job, nets, sample)])


def method_line(job: Job, nets: dict[str, BlockNet], sample: torch.Tensor) -> list[str]:
    """What a feature or relation method trains beside the student (its regressors, branches, embeddings)."""
    method = method_of(job.cfg.search)
    if not issubclass(method, FeatureDistiller):
        return []
    _, kwargs = method_arguments(job.cfg.search, defaults(job.cfg.search, nets["student"].num_blocks, job.cfg.fixed))
    built = method.build(nets["teacher"], nets["student"], sample_input=sample.expand(2, *sample.shape[1:]), **kwargs)
    extra = sum(p.numel() for p in built.trainable_parameters()) - sum(p.numel() for p in nets["student"].parameters())
    memory = f", and a {built.memory_bytes / 2**20:.1f} MiB memory" if hasattr(built, "memory_bytes") else ""
    return [f"method: {job.cfg.search.get('name')} ({method.summary}) trains {extra:,} parameters of its own beside the "
            f"student{memory}; the connector column is Block-KD's"]
