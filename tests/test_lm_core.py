"""Causal LMs in bkd_core: decoders cut into blocks (Llama, Qwen2, GPT-2), the token losses against hand
computations, chunked against whole, the target mask, the LM data, and stones through decoder blocks."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from bkd_core import methods  # noqa: E402
from bkd_core.data import DataSplits, tokenize_lm  # noqa: E402
from bkd_core.data.lm import LMDataset, pack_rows, pad_batch  # noqa: E402
from bkd_core.losses import jsd_loss, kd_loss, make_logit_distance, reverse_kl_loss, skew_kl_loss  # noqa: E402
from bkd_core.models.causal import check_same_lm_logits, from_hf_causal, pack_lm  # noqa: E402
from bkd_core.token_losses import IGNORE, aligned_targets, per_token, sorted_probability_l1, task_loss, uld_loss  # noqa: E402
from bkd_core.train import Supervised, TrainConfig, fit  # noqa: E402

from lm_world import corpus, decoder, make_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("lm") / "tok")


def padded_batch(vocab: int, side: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :3], mask[2, :5] = 0, 0
    else:
        mask[1, 6:], mask[2, 4:] = 0, 0
    return pack_lm(ids * mask, mask)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral", "phi3", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_cut_decoder_gives_the_models_logits_with_padding_on_either_side(tokenizer, kind, side):
    model = decoder(kind, tokenizer, 32, 4)
    batch = padded_batch(len(tokenizer), side)
    net = from_hf_causal(model, groups=2, sample=batch)  # the check inside raises on any gap
    assert net.block_ends == ["embeddings", "layer.1", "layer.3"] and net.num_blocks == 3
    with torch.no_grad():
        logits = net(batch)
        # a padded row scores its real tokens as the same text alone does (positions count the real tokens)
        mask = batch[1, 1].bool()
        alone = net(batch[1:2, :, mask])
    assert logits.shape == (3, 9, len(tokenizer))
    torch.testing.assert_close(logits[1, mask], alone[0], atol=1e-5, rtol=1e-5)


def test_exactness_check_catches_a_wrong_cut(tokenizer):
    model = decoder("llama", tokenizer, 32, 2)
    net = from_hf_causal(model, groups=1)
    net.blocks[1].layers = torch.nn.ModuleList([net.blocks[1].layers[0]])  # a layer dropped: not the model any more
    with pytest.raises(ValueError, match="logits up to"):
        check_same_lm_logits(model, net, padded_batch(len(tokenizer), "right"))


def test_save_pretrained_round_trips_what_the_blocks_trained(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = decoder("qwen2", tokenizer, 32, 2)
    net = from_hf_causal(model)
    with torch.no_grad():
        net.blocks[1].layers[0].mlp.up_proj.weight.add_(1.0)  # training the blocks trains the model itself
    model.save_pretrained(tmp_path / "m")
    again = from_hf_causal(AutoModelForCausalLM.from_pretrained(tmp_path / "m"))
    batch = padded_batch(len(tokenizer), "right")
    torch.testing.assert_close(again(batch), net(batch))


def test_a_text_encoder_is_not_cut_as_a_decoder():
    import transformers

    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="not a decoder bkd cuts"):
        from_hf_causal(bert)


# --- the token losses, against hand computations --------------------------------------------------------------

P_T = torch.tensor([[0.7, 0.2, 0.1]])
P_S = torch.tensor([[0.5, 0.3, 0.2]])


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_the_llm_distances_equal_their_formulas_by_hand():
    s, t = P_S.log(), P_T.log()  # logits whose softmax is P_S, P_T
    p, q = P_T[0].tolist(), P_S[0].tolist()
    assert kd_loss(s, t, 1.0).item() == pytest.approx(kl(p, q), rel=1e-5)
    assert reverse_kl_loss(s, t, 1.0).item() == pytest.approx(kl(q, p), rel=1e-5)
    mix = [0.1 * a + 0.9 * b for a, b in zip(p, q)]
    assert skew_kl_loss(s, t, 1.0, 0.1).item() == pytest.approx(kl(p, mix), rel=1e-5)
    m = [0.3 * a + 0.7 * b for a, b in zip(p, q)]
    assert jsd_loss(s, t, 1.0, 0.3).item() == pytest.approx(0.3 * kl(p, m) + 0.7 * kl(q, m), rel=1e-5)
    assert jsd_loss(s, t, 1.0, 0.0).item() == pytest.approx(kl(p, q), rel=1e-5)  # TRL's end points
    assert jsd_loss(s, t, 1.0, 1.0).item() == pytest.approx(kl(q, p), rel=1e-5)
    # temperature: T^2 times the divergence of the softened distributions
    t2 = F.softmax(t / 2.0, dim=1)[0].tolist()
    s2 = F.softmax(s / 2.0, dim=1)[0].tolist()
    assert reverse_kl_loss(s, t, 2.0).item() == pytest.approx(4.0 * kl(s2, t2), rel=1e-5)


def test_uld_sorts_each_distribution_and_pads_the_smaller_vocabulary():
    student = torch.tensor([[0.2, 0.5, 0.3]]).log()
    teacher = torch.tensor([[0.1, 0.6, 0.25, 0.05]]).log()
    # sorted: [0.5, 0.3, 0.2, 0] against [0.6, 0.25, 0.1, 0.05]
    expected = 0.1 + 0.05 + 0.1 + 0.05
    assert sorted_probability_l1(student, teacher).item() == pytest.approx(expected, abs=1e-6)


def test_uld_pairs_the_jth_target_of_each_tokenization_and_truncates_to_the_shorter():
    y_s = torch.tensor([[IGNORE, 5, 6, 7, IGNORE], [IGNORE, IGNORE, 3, IGNORE, IGNORE]])
    y_t = torch.tensor([[IGNORE, IGNORE, 1, 2, 3, 4], [IGNORE, 2, 2, IGNORE, IGNORE, IGNORE]])
    rows_s, rows_t = aligned_targets(y_s, y_t)
    assert rows_s.tolist() == [1, 2, 3, 5 + 2]  # example 0: 3 student targets; example 1: min(1, 2) = 1
    assert rows_t.tolist() == [2, 3, 4, 6 + 1]
    s, t = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 6, 9)
    whole = torch.stack([sorted_probability_l1(s.reshape(-1, 7)[i:i + 1], t.reshape(-1, 9)[j:j + 1])
                         for i, j in zip(rows_s.tolist(), rows_t.tolist())]).mean()
    chunked = uld_loss(s, t, y_s, y_t, chunk=3)
    torch.testing.assert_close(chunked, whole)
    chunked.backward()
    assert s.grad.abs().sum() > 0


LOSS_NAMES = ["kd", "rkl", "skl", "jsd", "dkd"]


def token_batch(b=3, length=7, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, length, vocab, generator=g) * 2
    t = torch.randn(b, length, vocab, generator=g) * 2
    y = torch.randint(0, vocab, (b, length), generator=g)
    y[:, :3] = IGNORE  # the prompt
    y[0, -2:] = IGNORE  # padding
    return s, t, y


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_chunked_token_losses_equal_whole_ones_in_value_and_gradient(name):
    s, t, y = token_batch()
    d = make_logit_distance(name)
    rows = y != IGNORE
    s_whole = s.clone().requires_grad_(True)
    whole = d(s_whole[rows], t[rows], y[rows], 2.0)  # every target token at once, by the classifier's distance
    whole.backward()
    s_chunked = s.clone().requires_grad_(True)
    chunked = per_token(d, chunk=2)(s_chunked, t, y, 2.0)
    chunked.backward()
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(s_chunked.grad, s_whole.grad)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_prompt_and_padding_positions_change_no_loss(name):
    s, t, y = token_batch()
    d = per_token(make_logit_distance(name), chunk=4)
    s2, t2 = s.clone(), t.clone()
    off = y == IGNORE
    s2[off] += torch.randn_like(s2[off]) * 5
    t2[off] -= 3.0 * torch.arange(s.shape[-1], dtype=torch.float)
    assert d(s2, t2, y, 1.0).item() == pytest.approx(d(s, t, y, 1.0).item(), rel=1e-6)
    assert task_loss(s2, y).item() == pytest.approx(task_loss(s, y).item(), rel=1e-6)
    # the same change moves the loss when every position is a target: the mask is what keeps it out
    everything = torch.randint(0, s.shape[-1], y.shape)
    assert d(s2, t2, everything, 1.0).item() != pytest.approx(d(s, t, everything, 1.0).item(), rel=1e-3)


def test_vocabularies_padded_to_different_sizes_compare_over_the_real_one():
    s, t, y = token_batch(vocab=10)
    d = per_token(make_logit_distance("kd"), vocab=10)
    padded_t = torch.cat([t, torch.full((*t.shape[:2], 6), 30.0)], -1)  # padding rows with large logits
    padded_s = torch.cat([s, torch.full((*s.shape[:2], 2), -5.0)], -1)
    assert d(padded_s, padded_t, y, 1.0).item() == pytest.approx(d(s, t, y, 1.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="vocab_size=20"):
        per_token(make_logit_distance("kd"), vocab=20)(s, t, y, 1.0)


# --- data -----------------------------------------------------------------------------------------------------

def test_prompt_tokens_are_context_and_response_tokens_are_targets(tokenizer):
    data, counts = tokenize_lm(tokenizer, prompts=["the sky is", "count one"], responses=[" blue", ""], max_length=64)
    assert counts == {"truncated": 0, "empty": 1} and len(data) == 1
    x, y = data.batch(torch.tensor([0]))
    prompt = len(tokenizer("the sky is")["input_ids"])
    response = tokenizer(" blue")["input_ids"] + [tokenizer.eos_token_id]
    assert (y[0, :prompt - 1] == IGNORE).all()
    assert y[0, prompt - 1:prompt - 1 + len(response)].tolist() == response
    assert y[0, -1] == IGNORE and x.shape == (1, 2, prompt + len(response))


def test_a_chat_template_writes_the_prompt_as_the_users_turn_and_scores_the_answer(tokenizer):
    from transformers import PreTrainedTokenizerFast

    chat = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    chat.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    data, _ = tokenize_lm(chat, prompts=["the sky is"], responses=[" blue"], chat_template=True)
    x, y = data.batch(torch.tensor([0]))
    head = chat("<|endoftext|>user: the sky is\nassistant:", add_special_tokens=False)["input_ids"]
    assert x[0, 0, :len(head)].tolist() == head  # the template's words are context, never targets
    assert (y[0, :len(head) - 1] == IGNORE).all()
    answer = chat(" blue", add_special_tokens=False)["input_ids"] + [chat.eos_token_id]
    assert y[0, len(head) - 1:len(head) - 1 + len(answer)].tolist() == answer


def test_long_texts_are_cut_and_counted(tokenizer):
    data, counts = tokenize_lm(tokenizer, texts=["count one two three four five six seven"] * 3 + ["the sky is"], max_length=5)
    assert counts["truncated"] == 3 and int(data.lengths.max()) == 5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=12), min_size=1, max_size=6), st.data())
def test_batches_pad_any_lengths_and_shift_the_targets(flags, draw):
    lengths = torch.tensor([len(f) for f in flags])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.arange(1, int(lengths.sum()) + 1, dtype=torch.int32)
    targets = torch.tensor([b for f in flags for b in f])
    data = LMDataset.of_offsets(ids, targets, offsets, 1000)
    index = torch.tensor(draw.draw(st.lists(st.integers(0, len(flags) - 1), min_size=1, max_size=5)))
    x, y = pad_batch(data.ids, data.targets, data.starts[index], data.lengths[index])
    assert x.shape[-1] == int(lengths[index].max()) and y.shape == x[:, 0].shape
    for row, i in enumerate(index.tolist()):
        n, start = len(flags[i]), int(offsets[i])
        assert x[row, 1].tolist() == [1] * n + [0] * (x.shape[-1] - n)
        assert x[row, 0, :n].tolist() == list(range(start + 1, start + n + 1))
        for pos in range(x.shape[-1]):
            want = start + pos + 2 if pos + 1 < n and flags[i][pos + 1] else IGNORE
            assert int(y[row, pos]) == want
    subset = data.take(index)
    assert subset.ids is data.ids  # selecting examples shares the token arrays
    assert subset.batch(torch.arange(len(index)))[1].tolist() == y.tolist()


# --- methods on decoders ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_splits(tokenizer):
    pairs = corpus(120)
    train, _ = tokenize_lm(tokenizer, texts=[p + r for p, r in pairs[:90]], max_length=32, name="lm/train")
    test, _ = tokenize_lm(tokenizer, prompts=[p for p, _ in pairs[90:]], responses=[r for _, r in pairs[90:]],
                          max_length=32, name="lm/test")
    return DataSplits(train, test).hold_out(0.2)


def test_stacked_stones_through_decoder_blocks_equal_stones_one_by_one(tokenizer, lm_splits):
    teacher = from_hf_causal(decoder("llama", tokenizer, 32, 4), groups=3)
    student = from_hf_causal(decoder("gpt2", tokenizer, 16, 3))
    x, y = lm_splits.train.batch(torch.arange(4))
    stacked = methods.make("blockkd", teacher, student, sample_input=x, gamma=1.0, logit_loss="jsd", temperature=1.0)
    torch.manual_seed(0)
    apart = methods.make("blockkd", teacher, student, sample_input=x, gamma=1.0, logit_loss="jsd", temperature=1.0,
                         stack_stones=False)
    apart.connectors.load_state_dict(stacked.connectors.state_dict())
    stacked.eval(), apart.eval()
    one, two = stacked(x, y), apart(x, y)
    assert set(one.stone_logits) == {1, 2, 3, 4}  # the embeddings and three groups of layers
    for cut in one.stone_logits:
        torch.testing.assert_close(one.stone_logits[cut], two.stone_logits[cut], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.loss, two.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, params", [("blockkd", {"gamma": 1.0}), ("kd", {"logit_loss": "skl"}), ("fitnet", {}),
                                          ("none", {})])
def test_methods_train_a_decoder_student_and_report_token_scores(tokenizer, lm_splits, name, params):
    teacher = from_hf_causal(decoder("qwen2", tokenizer, 32, 2))
    student = from_hf_causal(decoder("llama", tokenizer, 16, 2))
    distiller = methods.make(name, teacher, student, sample_input=lm_splits.train.sample(2), **params)
    metrics = fit(distiller, lm_splits, TrainConfig(epochs=1, batch_size=8, lr=3e-3, optimizer="adamw", channels_last=False))
    assert math.isfinite(metrics["val_loss"]) and metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert 0 <= metrics["test_token_acc"] <= 100 and metrics["test_tokens"] > 0


def test_a_decoder_learns_the_corpus(tokenizer, lm_splits):
    model = from_hf_causal(decoder("llama", tokenizer, 48, 2))
    before = fit(Supervised(model), lm_splits, TrainConfig(epochs=1, batch_size=8, lr=1e-6, optimizer="adamw", channels_last=False))
    after = fit(Supervised(model), lm_splits, TrainConfig(epochs=4, batch_size=8, lr=3e-3, optimizer="adamw", channels_last=False))
    assert after["val_loss"] < before["val_loss"] - 1.0  # from about ln(V) to well below
    assert after["test_token_acc"] > 30.0


def test_uld_distils_across_two_tokenizers(tokenizer, tmp_path):
    other = make_tokenizer(tmp_path / "other", vocab_size=290, seed=3)
    assert other.get_vocab() != tokenizer.get_vocab()
    pairs = corpus(60)
    prompts, responses = [p for p, _ in pairs] + ["the sky is"], [r for _, r in pairs] + ["  "]
    student_data, counts = tokenize_lm(tokenizer, prompts=prompts, responses=responses, max_length=32)
    student_data.partner, _ = tokenize_lm(other, prompts=prompts, responses=responses, max_length=32)
    assert counts["empty"] == 1 and len(student_data) == len(student_data.partner) == 60
    x, y = student_data.batch(torch.arange(4))
    assert x.shape[1] == 5 and (x[:, 4] != IGNORE).sum() == (student_data.partner.batch(torch.arange(4))[1] != IGNORE).sum()
    teacher = from_hf_causal(decoder("qwen2", other, 32, 2))
    student = from_hf_causal(decoder("gpt2", tokenizer, 16, 2))
    uld = methods.make("uld", teacher, student, sample_input=x)
    splits = DataSplits(student_data.take(torch.arange(48)), student_data.take(torch.arange(48, 60))).hold_out(0.2)
    metrics = fit(uld, splits, TrainConfig(epochs=1, batch_size=8, lr=3e-3, optimizer="adamw", channels_last=False))
    assert math.isfinite(metrics["val_loss"]) and metrics["test_tokens"] > 0
    with pytest.raises(ValueError, match="two tokenizations"):
        methods.make("uld", teacher, student, sample_input=x[:, :2])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 14), min_size=1, max_size=9), st.integers(14, 30))
def test_a_packed_batch_gives_every_example_its_own_logits_and_targets(tokenizer, lengths, capacity):
    g = torch.Generator().manual_seed(sum(lengths) + capacity)
    ids = torch.randint(1, len(tokenizer), (int(sum(lengths)),), generator=g, dtype=torch.int32)
    targets = torch.rand(len(ids), generator=g) > 0.3
    data = LMDataset.of_offsets(ids, targets, torch.tensor([0] + lengths).cumsum(0), len(tokenizer))
    x, y = data.batch(torch.arange(len(lengths)))
    packed_x, packed_y = pack_rows(x, y, capacity)
    assert packed_x.shape[0] <= len(lengths) and packed_x.shape[-1] <= capacity
    assert sorted(packed_y[packed_y != IGNORE].tolist()) == sorted(y[y != IGNORE].tolist())
    net = PACKING_MODEL(tokenizer)
    with torch.no_grad():
        alone = F.cross_entropy(net(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
        packed = F.cross_entropy(net(packed_x).flatten(0, 1), packed_y.flatten(), ignore_index=IGNORE, reduction="sum")
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5, abs=1e-4)


_PACKING: dict = {}


def PACKING_MODEL(tokenizer):  # noqa: N802  (one Mistral with a sliding window of 4, made once)
    if "net" not in _PACKING:
        _PACKING["net"] = from_hf_causal(decoder("mistral", tokenizer, 32, 2)).eval()
    return _PACKING["net"]
