"""Each curriculum stage's objective on a tiny model: formulas, schedules, and losses that go down."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator

import pytest
import torch

from rxruntime.models import RxTModel, RxTokenizer
from rxruntime.models.config import non_default_fields
from rxruntime.training.batches import (
    IGNORE,
    TokenBatch,
    dialogue_batches,
    interaction_batch,
    recall_turns,
    text_batch,
)
from rxruntime.training.data.dialogues import DialogueGenerator, Turn
from rxruntime.training.data.people import PeopleGenerator
from rxruntime.training.joint import JointLoss, joint_loss
from rxruntime.training.memory_aware import memory_aware_loss, set_trainable, trainable_groups
from rxruntime.training.memory_pretrain import label_weight, memory_pretrain_loss, pool_encoded, pseudo_label
from rxruntime.training.mlm import MLMHead, mask_tokens
from rxruntime.training.optim import lr_at, make_optimizer, step_seed
from rxruntime.training.recipe import (
    JointStage,
    MemoryAwareStage,
    MemoryPretrainStage,
    Optim,
    RecipeError,
    load_recipe,
    recipe_from_dict,
)

from .conftest import tiny_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest, and it avoids oversubscribing a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> RxTokenizer:
    return RxTokenizer.train(DialogueGenerator(0).corpus(200), vocab_size=300)


def _model() -> RxTModel:
    torch.manual_seed(0)
    return RxTModel(tiny_config(vocab_size=320, max_seq_len=64)).train()


def test_answer_only_targets_start_after_the_answer_tag(tokenizer: RxTokenizer) -> None:
    batch = interaction_batch(tokenizer, [Turn("What is 2 plus 2?", "2 plus 2 is 4.")], 64, answer_only=True)
    ids, targets = batch.ids[0].tolist(), batch.targets[0].tolist()
    a = ids.index(tokenizer.special.answer_id)
    # position j predicts token j+1: the first target is the first answer token, the last one [EOS]
    assert all(t == IGNORE for t in targets[:a])
    assert targets[a:] == ids[a + 1 :]
    assert targets[-1] == tokenizer.special.eos_id


def test_mask_tokens_only_touches_regular_real_tokens() -> None:
    ids = torch.tensor([[2, 4, 10, 11, 12, 5, 13, 3, 0, 0]] * 50)
    mask = (ids != 0).long()
    corrupted, labels = mask_tokens(ids, mask, 0.5, 1, 7, 30, torch.Generator().manual_seed(0))
    chosen = labels != IGNORE
    assert chosen.any()
    assert not chosen[ids < 7].any()  # special tokens and padding are never masked
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    assert (corrupted[chosen] == 1).float().mean() > 0.6  # mostly [UNK] as the mask token


def _steps(loss_fn: Callable[[], torch.Tensor], params: list[torch.nn.Parameter], n: int = 8, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(params, lr=lr)
    for _ in range(n):
        loss = loss_fn()
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()


def test_joint_stage_losses_decrease_and_the_encoder_gets_no_decoder_gradient(tokenizer: RxTokenizer) -> None:
    model = _model()
    head = MLMHead(model.config)
    texts = [DialogueGenerator(1).text(2) for _ in range(8)]
    turns = [DialogueGenerator(2).interaction() for _ in range(8)]
    for batch in (text_batch(tokenizer, texts, 64), interaction_batch(tokenizer, turns, 64)):
        model.zero_grad(set_to_none=True)
        stage = JointStage(mlm_weight=0.0)  # AR only: the encoder must then receive no gradient at all
        out = joint_loss(model, head, batch, stage, tokenizer.vocab_size, torch.Generator().manual_seed(0))
        torch.autograd.backward(out.total)
        assert all(p.grad is None or not p.grad.any() for p in model.encoder.parameters())
        model.zero_grad(set_to_none=True)
        stage = JointStage(memory_noise=0.0)

        def loss(batch: TokenBatch = batch, stage: JointStage = stage) -> JointLoss:
            return joint_loss(model, head, batch, stage, tokenizer.vocab_size, torch.Generator().manual_seed(0))

        first = loss()
        _steps(lambda: loss().total, [*model.parameters(), *head.parameters()])
        last = loss()
        assert last.ar < first.ar and last.mlm < first.mlm


def test_retrieval_pairs_decode_one_turn_against_the_encoding_of_another(tokenizer: RxTokenizer) -> None:
    model = _model()
    head = MLMHead(model.config)
    gen = PeopleGenerator(11)
    dialogues = [gen.dialogue(2) for _ in range(6)]
    questions = interaction_batch(tokenizer, [d.turns[1] for d in dialogues], 64)
    facts = interaction_batch(tokenizer, [d.turns[0] for d in dialogues], 64)
    stage = JointStage(memory_noise=0.0)

    def run(encoder_batch: TokenBatch | None) -> JointLoss:
        g = torch.Generator().manual_seed(0)
        return joint_loss(model, head, questions, stage, tokenizer.vocab_size, g, encoder_batch)

    own, paired = run(None), run(facts)
    assert own.ar != paired.ar  # the decoder read the facts' states, not its own turn's
    assert paired.ar == run(facts).ar
    with pytest.raises(ValueError, match="rows"):
        run(interaction_batch(tokenizer, [d.turns[0] for d in dialogues[:3]], 64))
    first = run(facts)
    _steps(lambda: run(facts).total, [*model.parameters(), *head.parameters()])
    assert run(facts).ar < first.ar


def test_retrieval_share_is_a_stage2_fraction() -> None:
    spec = load_recipe("ci").to_dict()
    spec["joint_sft"]["retrieval_share"] = 1.5
    with pytest.raises(RecipeError, match="retrieval_share"):
        recipe_from_dict(spec)
    spec["joint_sft"]["retrieval_share"] = 0.0
    spec["joint_pretrain"]["retrieval_share"] = 0.5
    with pytest.raises(RecipeError, match="stage 2 option"):
        recipe_from_dict(spec)


def test_compound_facts_is_a_people_share() -> None:
    spec = load_recipe("ci").to_dict()
    spec["data"]["compound_facts"] = 0.3
    with pytest.raises(RecipeError, match="people generator"):
        recipe_from_dict(spec)
    spec["data"]["source"] = "people"
    spec["data"]["compound_facts"] = 1.5
    with pytest.raises(RecipeError, match="compound_facts"):
        recipe_from_dict(spec)


def test_a_recipe_fingerprint_hashes_only_fields_away_from_their_defaults() -> None:
    """So a release that adds a recipe field with a neutral default leaves the fingerprints of runs
    started before it as they were, and they still resume; a field set differently changes it."""
    recipe = load_recipe("nano")
    spec = recipe.to_dict()
    assert spec["data"]["compound_facts"] == 0.0  # a field nano.json does not name
    spec["data"]["compound_facts"] = 0.2
    assert recipe_from_dict(spec).fingerprint() != recipe.fingerprint()
    digest = hashlib.sha256(json.dumps(non_default_fields(recipe), sort_keys=True).encode()).hexdigest()
    assert recipe.fingerprint() == digest and "compound_facts" not in json.dumps(non_default_fields(recipe))


def test_stage3_label_weights_follow_the_schedule() -> None:
    stage = MemoryPretrainStage(weight_jitter=0.0)
    assert label_weight(0, stage) == pytest.approx(0.9)
    assert [label_weight(t, stage) for t in (1, 2, 5)] == pytest.approx([0.45, 0.4, 0.25])
    assert label_weight(20, stage) == pytest.approx(stage.weight_min)
    jittered = [label_weight(3, MemoryPretrainStage(), random.Random(i)) for i in range(200)]
    assert min(jittered) >= 0.35 - 0.15 - 1e-9 and max(jittered) <= 0.35 + 0.15 + 1e-9
    assert max(jittered) - min(jittered) > 0.2  # the jitter really varies


def test_stage3_pseudo_label_is_the_weighted_mean_of_stm_and_pooled_ed() -> None:
    g = torch.Generator().manual_seed(0)
    stm = torch.randn(2, 3, 4, 8, generator=g)
    encoded = torch.randn(2, 3, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = pool_encoded(encoded, mask)
    assert torch.allclose(pooled[0, :, 0], encoded[0, :, :3].mean(dim=1))  # pads do not count
    assert torch.allclose(pooled[1, :, 0], encoded[1].mean(dim=1))
    label = pseudo_label(stm, encoded, mask, 0.3)

    def unit(x: torch.Tensor) -> torch.Tensor:  # both terms at unit RMS per slot, so w is the real share
        return x / x.pow(2).mean(dim=-1, keepdim=True).sqrt()

    assert torch.allclose(label, 0.7 * unit(stm) + 0.3 * unit(pooled).expand_as(stm), atol=1e-6)
    attended = pseudo_label(stm, encoded, mask, 1.0, pool="attention", sharpness=50.0)
    assert torch.allclose(attended[0, :, :, :].pow(2).mean(-1), torch.ones(3, 4), atol=1e-5)
    permuted = pseudo_label(stm[:, :, [2, 0, 3, 1]], encoded, mask, 0.3, pool="attention")
    assert torch.allclose(permuted, pseudo_label(stm, encoded, mask, 0.3, pool="attention")[:, :, [2, 0, 3, 1]])


def test_stage3_loss_decreases_and_trains_only_memory_attention(tokenizer: RxTokenizer) -> None:
    model = _model()
    dialogues = [DialogueGenerator(3).dialogue(3) for _ in range(6)]
    turns, _ = dialogue_batches(tokenizer, dialogues, 64)
    stage = MemoryPretrainStage(noise=0.0, weight_jitter=0.0)

    def loss() -> torch.Tensor:
        return memory_pretrain_loss(model, turns, stage, random.Random(0), torch.Generator().manual_seed(0))[0]

    before = loss().item()
    assert -1.0 <= before <= 1.0
    _steps(loss, list(model.memory_attention.parameters()), n=10)
    assert loss().item() < before - 0.01
    model.zero_grad(set_to_none=True)
    torch.autograd.backward(loss())
    assert all(p.grad is None for p in model.encoder.parameters())


def test_unfreezing_schedule_decoder_then_memory_attention_then_encoder() -> None:
    stage = MemoryAwareStage(steps=100, unfreeze_memory_attention=10, unfreeze_encoder=30)
    assert trainable_groups(0, stage) == ("decoder",)
    assert trainable_groups(9, stage) == ("decoder",)
    assert trainable_groups(10, stage) == ("decoder", "memory_attention")
    assert trainable_groups(30, stage) == ("decoder", "memory_attention", "encoder")
    model = _model()
    set_trainable(model, ("decoder",))
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert not any(p.requires_grad for p in model.memory_attention.parameters())
    assert not any(p.requires_grad for p in [*model.encoder.parameters(), *model.embedding.parameters()])
    with pytest.raises(ValueError, match="unknown component"):
        set_trainable(model, ("decodr",))


def test_stage4_gradient_reaches_the_encoder_only_through_memory(tokenizer: RxTokenizer) -> None:
    model = _model()
    dialogues = [DialogueGenerator(4).dialogue(3) for _ in range(4)]
    turns, present = dialogue_batches(tokenizer, dialogues, 64)
    set_trainable(model, ("decoder", "memory_attention", "encoder"))
    loss, per_turn, _ = memory_aware_loss(model, turns, present, torch.Generator().manual_seed(0))
    torch.autograd.backward(loss)
    assert len(per_turn) == 3
    assert any(p.grad is not None and p.grad.any() for p in model.encoder.parameters())
    # with a single turn nothing is ever read back from memory, so the encoder gets no gradient
    model.zero_grad(set_to_none=True)
    loss, _, _ = memory_aware_loss(model, turns[:1], present[:1], torch.Generator().manual_seed(0))
    torch.autograd.backward(loss)
    assert all(p.grad is None for p in model.encoder.parameters())


def test_stage4_loss_decreases(tokenizer: RxTokenizer) -> None:
    model = _model()
    dialogues = [DialogueGenerator(5).dialogue(3) for _ in range(6)]
    turns, present = dialogue_batches(tokenizer, dialogues, 64)

    def loss() -> torch.Tensor:
        return memory_aware_loss(model, turns, present, torch.Generator().manual_seed(0))[0]

    before = float(loss())
    _steps(loss, list(model.parameters()))
    assert float(loss()) < before


def test_dialogue_batches_mask_missing_turns(tokenizer: RxTokenizer) -> None:
    gen = DialogueGenerator(6)
    dialogues = [gen.dialogue(2), gen.dialogue(4)]
    turns, present = dialogue_batches(tokenizer, dialogues, 64)
    assert len(turns) == 4
    assert present.tolist() == [[True, True], [True, True], [False, True], [False, True]]


def test_recall_turns_marks_the_questions_only(tokenizer: RxTokenizer) -> None:
    gen = PeopleGenerator(3)
    dialogues = [gen.dialogue(2), gen.dialogue(5)]
    mask = recall_turns(dialogues)
    assert mask.shape == (5, 2)
    expected = [[t < len(d) and d.turns[t].kind in ("question", "unknown") for d in dialogues] for t in range(5)]
    assert mask.tolist() == expected
    assert mask[1, 0] and not mask[0, 0]  # a 2-turn dialogue is a fact, then a question
    assert mask[4, 1] and not mask[2:, 0].any()  # every dialogue ends with a question


def test_stage4_recall_only_loss_ignores_acknowledgements(tokenizer: RxTokenizer) -> None:
    model = _model()
    dialogues = [PeopleGenerator(7).dialogue(2) for _ in range(4)]
    turns, present = dialogue_batches(tokenizer, dialogues, 64)
    _, all_turns, _ = memory_aware_loss(model, turns, present, torch.Generator().manual_seed(0))
    _, recall_only, _ = memory_aware_loss(
        model, turns, present & recall_turns(dialogues), torch.Generator().manual_seed(0)
    )
    assert len(all_turns) == 2 and len(recall_only) == 1  # the fact's acknowledgement leaves the loss
    assert recall_only[0] == pytest.approx(all_turns[1])  # the question's own loss is unchanged


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    o = Optim(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, o) == pytest.approx(0.1)
    assert lr_at(9, o) == pytest.approx(1.0)
    assert lr_at(10, o) == pytest.approx(1.0)
    assert lr_at(99, o) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, o) >= lr_at(s + 1, o) for s in range(10, 99))
    opt = make_optimizer(list(_model().parameters()), o)
    assert opt.param_groups[1]["weight_decay"] == 0.0  # norms and biases are not decayed


def test_step_seeds_are_stable_and_distinct() -> None:
    assert step_seed(1, "joint_sft", 5) == step_seed(1, "joint_sft", 5)
    seeds = {step_seed(1, stage, s) for stage in ("a", "b") for s in range(100)}
    assert len(seeds) == 200
