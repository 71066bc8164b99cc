"""Every shipped method that reads block outputs trains on a text pair through batches of any length: the
probe batch's length fixes nothing (a step per batch length from 1 to 64 tokens, and batches of lengths, sizes
and paddings drawn by hypothesis)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bkd_core import methods  # noqa: E402
from bkd_core.models.text import from_hf, pack  # noqa: E402
from search_spaces.space import defaults, load_space, method_arguments, names  # noqa: E402
from tests.text_world import encoder, make_tokenizer  # noqa: E402

# the feature and relation methods: every shipped space whose method reads the models' block outputs
BLOCK_READERS = sorted({load_space(n)["method"] for n in names() if methods.get(load_space(n)["method"]).reads_blocks})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tok"))
    teacher = from_hf(encoder("bert", tokenizer, 32, 4, positions=80), groups=2)
    student = from_hf(encoder("bert", tokenizer, 16, 2, positions=80), groups=2)
    return tokenizer, teacher, student


def batch_of_length(tokenizer, size: int, length: int) -> torch.Tensor:
    """``size`` token sequences padded to ``length``: [CLS], then words of the vocabulary, each row of its own
    length (at least [CLS] alone, at most ``length``)."""
    g = torch.Generator().manual_seed(length * 97 + size)
    ids = torch.randint(5, tokenizer.vocab_size, (size, length), generator=g)
    ids[:, 0] = tokenizer.cls_token_id
    lengths = torch.randint(1, length + 1, (size,), generator=g)
    lengths[0] = length  # one row fills the batch, as padding to the longest makes it
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return pack(ids, mask, torch.zeros_like(ids))


def test_the_block_readers_are_found_in_the_shipped_spaces():
    assert {"fitnet", "reviewkd", "at", "rkd", "crd", "ofa"} <= set(BLOCK_READERS)


@pytest.mark.parametrize("method", BLOCK_READERS)
def test_a_block_reading_method_trains_on_text_batches_of_every_length(method, pair):
    tokenizer, teacher, student = pair
    space = load_space(method)
    name, kwargs = method_arguments(space, defaults(space, 3))
    distiller = methods.make(name, teacher, student, sample_input=batch_of_length(tokenizer, 4, 12), **kwargs)
    optimizer = torch.optim.SGD(list(distiller.trainable_parameters()), lr=1e-3)

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(length=st.integers(1, 64), size=st.integers(2, 5))
    def step(length, size):
        x = batch_of_length(tokenizer, size, length)
        y = torch.randint(0, 3, (size,))
        out = distiller.train()(x, y)
        assert out.student_logits.shape == (size, 3) and torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    step()
    for length in range(1, 65):  # and every batch length once, 1 to 64 tokens
        x, y = batch_of_length(tokenizer, 3, length), torch.tensor([0, 1, 2])
        out = distiller.train()(x, y)
        assert torch.isfinite(out.loss), length
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
