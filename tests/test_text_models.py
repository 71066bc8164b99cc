"""Text encoders as blocks (bkd_core.models.text): tiny BERT, RoBERTa and DistilBERT classifiers made from
configs with transformers and a WordPiece vocabulary built from a generated corpus, saved to local folders
(nothing from the hub). Exactness, the attention mask in every block and stone, Block-KD through the frozen
teacher's layers, and the student saved and reloaded as a Hugging Face folder."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from bkd_core import BlockKD, methods  # noqa: E402
from bkd_core.models.text import from_hf, group_layers, pack  # noqa: E402
from tests.text_world import corpus, encoder, make_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def batch(tokenizer, texts, pad_to=None):
    enc = tokenizer(texts, padding="max_length" if pad_to else True, max_length=pad_to, return_tensors="pt")
    return pack(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "electra", "deberta"])
def test_an_encoder_as_blocks_gives_its_own_logits_and_keeps_its_names(kind, tokenizer, tmp_path):
    model = encoder(kind, tokenizer, 16, 4, tmp_path / kind)
    x = batch(tokenizer, corpus(5)[0])
    net = from_hf(model, groups=2, sample=x)  # raises unless the blocks reproduce the model's logits
    assert net.num_blocks == 3 and net(x).shape == (5, 3)
    assert set(net.source_state_dict()) <= set(model.state_dict())
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters())  # each module once
    text = corpus(1, seed=3)[0]
    with torch.no_grad():  # padding changes nothing (DeBERTa's relative positions included)
        assert torch.allclose(net.eval()(batch(tokenizer, text)), net(batch(tokenizer, text, pad_to=32)), atol=1e-5)


def test_layers_group_into_runs_of_about_equal_length():
    assert [list(r) for r in group_layers(12, 4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert [len(r) for r in group_layers(5, 2)] == [2, 3] or [len(r) for r in group_layers(5, 2)] == [3, 2]
    with pytest.raises(ValueError, match="cannot cut 4 encoder layers into 5 groups"):
        group_layers(4, 5)


def test_the_attention_mask_reaches_every_block_and_every_stone(tokenizer):
    """A sentence alone and the same sentence padded to 32 tokens: the same logits from the student and from
    every stepping stone (which runs the teacher's layers on the connector's output)."""
    teacher = from_hf(encoder("bert", tokenizer, 32, 4), groups=2)
    student = from_hf(encoder("bert", tokenizer, 16, 2), groups=2)
    text = corpus(1, seed=3)[0]
    tight, padded = batch(tokenizer, text), batch(tokenizer, text, pad_to=32)
    assert padded.shape[-1] > tight.shape[-1] + 10
    kd = BlockKD(teacher, student, cuts=[1, 2, 3], sample_input=tight).eval()
    with torch.no_grad():
        (s_tight, stones_tight), (s_padded, stones_padded) = kd.logits(tight), kd.logits(padded)
    assert torch.allclose(s_tight, s_padded, atol=1e-5)
    for cut in (1, 2, 3):
        assert torch.allclose(stones_tight[cut], stones_padded[cut], atol=1e-5), cut
    kd.stack_stones = False  # one by one: the same
    with torch.no_grad():
        assert torch.allclose(kd.logits(padded)[1][1], stones_padded[1], atol=1e-5)


def test_block_kd_trains_a_text_student_through_the_frozen_teacher_and_saves_it_as_a_hf_folder(tokenizer, tmp_path):
    teacher_model, student_model = encoder("bert", tokenizer, 32, 4), encoder("distilbert", tokenizer, 16, 2)
    teacher, student = from_hf(teacher_model, groups=2), from_hf(student_model, groups=2)
    texts, labels = corpus(16, seed=1)
    x, y = batch(tokenizer, texts), torch.tensor(labels)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = BlockKD(teacher, student, cuts=[1, 2, 3], gamma=1.0, sample_input=x)
    kd.train()
    stone = kd.logits(x)[1][1]  # the student's embeddings -> connector -> the teacher's 4 layers and head
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(stone, y), list(student.blocks[0].parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient through the teacher's layers"
    optimizer = torch.optim.AdamW(kd.trainable_parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        kd(x, y).loss.backward()
        optimizer.step()
    assert not teacher_model.training and all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    student.eval()
    student_model.save_pretrained(tmp_path / "student")  # the HF model holds the trained weights: its modules trained
    tokenizer.save_pretrained(tmp_path / "student")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    ids, mask, _ = x.unbind(1)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids, attention_mask=mask).logits, student(x), atol=1e-5)


@pytest.mark.parametrize("name", ["fitnet", "rkd", "ofa"])
def test_feature_baselines_take_text_pairs(name, tokenizer):
    teacher, student = from_hf(encoder("bert", tokenizer, 32, 4), groups=2), from_hf(encoder("bert", tokenizer, 16, 2), groups=2)
    texts, labels = corpus(8, seed=2)
    x, y = batch(tokenizer, texts), torch.tensor(labels)
    distiller = methods.make(name, teacher, student, sample_input=x)
    distiller.train()
    out = distiller(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.parts["loss_distill"] > 0


def test_a_model_that_is_not_an_encoder_classifier_is_refused(tokenizer):
    gpt = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, num_labels=3))
    with pytest.raises(ValueError, match="not an encoder bkd cuts into blocks"):
        from_hf(gpt)
