"""The toy_arithmetic problems, their dataset source, the toy corpus and the restricted-vocabulary training math
(no toy model is built here: tests/test_toy_pair.py does that)."""

import re
from dataclasses import replace

import pytest
import torch
from transformers import Qwen2ForCausalLM

from datamodules.problems import DatasetSource, load_problems
from datamodules.toy_corpus import ToyCorpusDataModule, reasoning_completion, solver_texts, tokenize_pairs
from interp.backbone import BUILTIN_BACKBONES, tiny_config
from interp.errors import UserError
from interp.grading import grade_answer
from interp.restricted_vocab import RestrictedVocab, expand_to_full, restrict, restricted_config
from interp.toy_arithmetic import NUMBER_WORDS, VALUES, question_text, toy_problems, worked_solution
from lightning_modules.toy_lm import RECIPE, fit_toy_lm

EQUATION = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")


def test_splits_hold_disjoint_computations_and_every_quantity_is_one_to_nine():
    train, test = toy_problems("train", 5000), toy_problems("test", 500)
    assert not {p.computation for p in train} & {p.computation for p in test}
    assert {len(p.steps) for p in test} == {1, 2, 3}
    for p in train + test:
        assert all(v in VALUES for v in p.values()) and all(n in VALUES for _, n in p.steps)
    assert toy_problems("test", 50, seed=0) == test[:50]  # deterministic, and a prefix of a longer draw


def test_worked_solution_computes_every_step_and_the_question_spells_its_numbers():
    for p in toy_problems("test", 300):
        equations = EQUATION.findall(worked_solution(p))
        assert len(equations) == len(p.steps)
        total = p.start
        for (a, op, b, c), (step_op, n) in zip(equations, p.steps):
            assert (int(a), op, int(b)) == (total, step_op, n)
            total = total + n if op == "+" else total - n
            assert int(c) == total
        assert total == p.answer
        question = question_text(p)
        assert not re.search(r"\d", question) and NUMBER_WORDS[p.start] in question


def test_dataset_source_yields_gradable_problems_with_gold_solutions():
    problems = load_problems(DatasetSource("toy_arithmetic", split="test"))
    generated = toy_problems("test", 1000)
    assert len(problems) == 1000 and problems[7].problem_id == "toy_arithmetic/test/7"
    for problem, toy in zip(problems[:50], generated):
        assert problem.dataset == "toy_arithmetic" and problem.question == question_text(toy)
        assert problem.gold_answer == str(toy.answer) and problem.gold_solution == worked_solution(toy)
        assert grade_answer(reasoning_completion(toy), problem.gold_answer, "toy_arithmetic")
        assert not grade_answer(reasoning_completion(toy), str(toy.answer + 1), "toy_arithmetic")
    assert len(load_problems(DatasetSource("toy_arithmetic", split="train", limit=30))) == 30
    with pytest.raises(UserError, match="toy_arithmetic has the splits"):
        DatasetSource("toy_arithmetic", split="validation")


def _restricted_model(seed: int, ids: list[int]):
    spec = BUILTIN_BACKBONES["toy-qwq"]
    full_config = tiny_config(spec)
    vocab = RestrictedVocab(ids, full_config.vocab_size)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(restricted_config(full_config, vocab)).double().eval(), vocab, full_config


def test_restricted_cross_entropy_is_the_full_vocabulary_cross_entropy():
    ids = [0, 5, 17, 220, 151643, 151668] + list(range(15, 25))
    small, vocab, full_config = _restricted_model(0, ids)
    with torch.no_grad():  # a trained "other" row is not special: make it large so the check is not vacuous
        small.lm_head.weight[-1] *= 5
    full = expand_to_full(small, vocab, full_config).double()
    tokens = torch.tensor([[0, 17, 220, 151668, 20, 5, 15]])
    with torch.no_grad():
        restricted = torch.log_softmax(vocab.logits(small(input_ids=vocab.encode(tokens)).logits), -1)
        reference = torch.log_softmax(full(input_ids=tokens).logits, -1)  # [1, 7, 152064]
    # float64 throughout: differences are rounding of sums over 152k terms (~1e-12), far below 1e-9
    torch.testing.assert_close(restricted[..., :-1], reference[..., vocab.ids], rtol=0, atol=1e-9)
    unseen = torch.ones(full_config.vocab_size, dtype=torch.bool)
    unseen[vocab.ids] = False
    torch.testing.assert_close(restricted[..., -1], torch.logsumexp(reference[..., unseen], -1), rtol=0, atol=1e-9)
    assert (full.model.embed_tokens.weight[unseen] == 0).all()
    back = restrict(full, vocab).state_dict()
    for name, value in small.state_dict().items():  # the "other" input row is never used: expanded as zeros
        rows = slice(0, -1) if name == "model.embed_tokens.weight" else slice(None)
        assert torch.equal(back[name][rows], value[rows]), name


def test_corpus_batches_mask_prompts_and_padding(tiny):
    _, tokenizer = tiny
    pairs = solver_texts(tokenizer, toy_problems("train", 6), control_fraction=0.4, seed=0)
    examples = tokenize_pairs(tokenizer, pairs)
    vocab = RestrictedVocab({t for ids, _ in examples for t in ids}, 152064)
    data = ToyCorpusDataModule(examples, vocab, batch_size=len(examples), num_samples=len(examples))
    batch = data.collate(examples)
    for row, (ids, prompt_length) in enumerate(examples):
        labels = batch["labels"][row]
        assert (labels[:prompt_length] == -100).all() and (labels[len(ids) :] == -100).all()
        kept = vocab.decode(labels[prompt_length : len(ids)]).tolist()
        assert kept == ids[prompt_length:] and kept[-1] == tokenizer.eos_token_id
        assert int(batch["attention_mask"][row].sum()) == len(ids)
    assert tokenizer.decode(examples[0][0][examples[0][1] :]).startswith(worked_solution(toy_problems("train", 1)[0]))


def test_toy_fit_is_deterministic(tiny):
    _, tokenizer = tiny
    examples = tokenize_pairs(tokenizer, solver_texts(tokenizer, toy_problems("train", 8), 0.4, seed=0))
    recipe = replace(RECIPE, steps=3, batch_size=4, warmup_steps=2)
    spec = replace(BUILTIN_BACKBONES["toy-qwq"], num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    (first, _), (second, _) = fit_toy_lm(spec, examples, recipe), fit_toy_lm(spec, examples, recipe)
    before = Qwen2ForCausalLM(tiny_config(spec))
    for name, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name
    assert not torch.equal(first.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)
