"""Text data (bkd_core.data.text): tokenized once, each batch padded to its own longest text, val held out
stratified as for images, and a Block-KD epoch of a text pair through bkd_core's own loop."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bkd_core.data import DataSplits, TextBatchLoader, TextDataset
from bkd_core.data.text import tokenize


def dataset_of(lengths, num_classes=3, width=None):
    """Texts of the given token counts (right-padded), token i of a text = i + 1, labels cycling."""
    width = width or max(lengths)
    tokens = torch.zeros(len(lengths), 3, width, dtype=torch.int32)
    for row, n in enumerate(lengths):
        tokens[row, 0, :n] = torch.arange(1, n + 1)
        tokens[row, 1, :n] = 1
    return TextDataset(tokens, torch.arange(len(lengths)) % num_classes, num_classes)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=50), st.integers(1, 9), st.booleans(), st.integers(0, 3))
def test_every_batch_is_padded_to_its_own_longest_text_and_loses_no_token(lengths, batch, train, epoch):
    data = dataset_of(lengths, width=64)
    if train and len(lengths) < batch:
        with pytest.raises(ValueError, match="fewer than batch_size"):
            TextBatchLoader(data, batch, train=True)
        return
    loader = TextBatchLoader(data, batch, train=train, seed=3)
    loader.set_epoch(epoch)
    seen = 0
    for x, y in loader:
        assert x.dtype == torch.long and x.shape[1] == 3 and x.shape[0] == y.shape[0] <= batch
        kept = x[:, 1].sum(1)
        assert x.shape[2] == int(kept.max()), "padded beyond the batch's longest text"
        assert torch.equal(x[:, 0].ne(0).sum(1), kept)  # every token of every text is there
        seen += x.shape[0]
    assert seen == (len(lengths) // batch * batch if train else len(lengths))


def test_workers_share_an_epoch_without_overlap():
    data = dataset_of([5] * 12)
    data.tokens[:, 2, 0] = torch.arange(12, dtype=torch.int32)  # a tag per text in its segment ids
    seen = [int(x[i, 2, 0]) for rank in range(2) for x, _ in TextBatchLoader(data, 3, train=True, rank=rank, world_size=2)
            for i in range(x.shape[0])]
    assert sorted(seen) == list(range(12))


def test_val_is_held_out_stratified_and_trimmed_as_for_images():
    data = dataset_of([3, 9, 4, 7, 2, 8] * 5, num_classes=3)
    splits = DataSplits(data, data.take(torch.arange(6))).hold_out(0.2, seed=1)
    assert len(splits.train) + len(splits.val) == 30
    assert torch.bincount(splits.val.labels, minlength=3).tolist() == [2, 2, 2]
    assert splits.val.tokens.shape[2] == int(splits.val.lengths.max())
    again = DataSplits(data, data.take(torch.arange(6))).hold_out(0.2, seed=1)
    assert torch.equal(again.val.tokens, splits.val.tokens), "the same split for the same seed"


def test_tokenize_truncates_pads_right_and_keeps_pairs():
    transformers = pytest.importorskip("transformers")
    from tokenizers import BertWordPieceTokenizer

    from tests.text_world import corpus  # the corpus of the text model tests

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(corpus(100)[0], vocab_size=100, min_frequency=1)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wordpiece._tokenizer, pad_token="[PAD]", cls_token="[CLS]",
                                                sep_token="[SEP]", unk_token="[UNK]")
    texts, labels = corpus(7, seed=4)
    data = tokenize(texts, labels, tok, max_length=8, num_classes=3, batch=3)
    assert data.tokens.shape[0] == 7 and data.tokens.shape[2] <= 8 and data.lengths.max() <= 8
    assert data.labels.tolist() == labels
    pairs = tokenize(texts, labels, tok, max_length=32, num_classes=3, pairs=list(reversed(texts)))
    assert pairs.lengths.min() > data.lengths.min()
    tok.padding_side = "left"
    with pytest.raises(ValueError, match="padding_side = 'right'"):
        tokenize(texts, labels, tok, max_length=8, num_classes=3)


def test_a_text_pair_trains_through_bkd_cores_own_loop(tmp_path):
    pytest.importorskip("transformers")
    from test_text_models import batch

    from bkd_core import BlockKD
    from bkd_core.models.text import from_hf
    from bkd_core.train import TrainConfig, fit
    from tests.text_world import corpus, encoder, make_tokenizer

    tok = make_tokenizer(tmp_path)
    texts, labels = corpus(96, seed=5)
    data = tokenize(texts, labels, tok, max_length=32, num_classes=3)
    splits = DataSplits(data, tokenize(*corpus(24, seed=6), tok, max_length=32, num_classes=3)).hold_out(0.25)
    teacher, student = from_hf(encoder("bert", tok, 32, 4), groups=2), from_hf(encoder("bert", tok, 16, 2), groups=2)
    kd = BlockKD(teacher, student, sample_input=batch(tok, texts[:2]), gamma=1.0)
    seen = []
    metrics = fit(kd, splits, TrainConfig(epochs=2, batch_size=16, lr=0.05), on_epoch=lambda e, m: seen.append(m))
    assert len(seen) == 2 and {"val_acc", "test_acc", "val_acc_stone_1"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in seen)
