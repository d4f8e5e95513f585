"""apply_to="prompt" / "generated" outside generate: teacher-forced forwards (prompt + solution in one
left-padded sequence) act exactly where a manual hook with a hand-built position mask acts, and a forward
without a prompt boundary raises instead of silently changing nothing."""

import numpy as np
import pytest
import torch

from interp.errors import UserError
from interp.hooks import hooked, site_name
from interp.interventions import InterventionHandler
from interp.metrics import gold_solution_nll
from interp.positions import padded_position_ids
from interp.token_roles import prompt_boundary

LAYER, STRENGTH = 5, 4.0
SOLUTIONS = ["2 + 2 = 4, so \\boxed{4}.", "48 + 24 = 72 clips.", "It is 70."]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher_forced(tiny, chat_prompts):
    """Three prompt + solution rows of different lengths, left padded by hand, and their roles [batch, seq]."""
    _, tokenizer = tiny
    prompts = [chat_prompts[i] for i in (0, 3, 2)]
    p = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    s = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in SOLUTIONS]
    width = max(len(a) + len(b) for a, b in zip(p, s))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    is_prompt = torch.zeros(3, width, dtype=torch.bool)
    is_solution = torch.zeros(3, width, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(p, s)):
        start = width - len(a) - len(b)
        ids[i, start:] = torch.tensor(a + b)
        mask[i, start:] = 1
        is_prompt[i, start : start + len(a)] = True
        is_solution[i, start + len(a) :] = True
    assert len({len(a) for a in p}) == 3 and bool((mask == 0).any())  # really padded, different boundaries
    batch = {"input_ids": ids, "attention_mask": mask}
    return batch, [len(a) for a in p], {"prompt": is_prompt, "generated": is_solution}, prompts


def _forward(model, batch):
    """Full-sequence logits [batch, seq, vocab] of one teacher-forced forward (no cache)."""
    with torch.no_grad():
        return model(**batch, position_ids=padded_position_ids(batch["attention_mask"]), use_cache=False).logits


@pytest.mark.parametrize("positions", ["generated", "prompt"])
def test_prompt_lengths_select_exactly_the_solution_or_prompt_tokens(tiny, teacher_forced, positions):
    model, _ = tiny
    batch, prompt_lengths, roles, _ = teacher_forced
    r = _randn(model.config.hidden_size)
    chosen = roles[positions].to(torch.float32)[:, :, None]  # [batch, seq, 1], built by hand
    with hooked(model, [(site_name(LAYER), lambda h: h + chosen * (STRENGTH * r))]):
        expected = _forward(model, batch)
    seen = []
    record = [(site_name(LAYER), lambda h: seen.append(h.clone()))]
    with hooked(model, record):  # outer: runs before the handler's hook
        handler = InterventionHandler(
            model, r, STRENGTH, layers=[LAYER], apply_to=positions, prompt_lengths=prompt_lengths
        )
        with handler, hooked(model, record):
            got = _forward(model, batch)
    torch.testing.assert_close(seen[1] - seen[0], chosen * (STRENGTH * r), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # the same float32 operations
    assert not torch.equal(got, _forward(model, batch))
    with prompt_boundary(model, prompt_lengths):  # the same, declared around the forward
        with InterventionHandler(model, r, STRENGTH, layers=[LAYER], apply_to=positions):
            torch.testing.assert_close(_forward(model, batch), expected, atol=0, rtol=0)


@pytest.mark.parametrize("positions", ["generated", "prompt"])
def test_a_forward_without_a_prompt_boundary_raises(tiny, teacher_forced, positions):
    model, _ = tiny
    batch, *_ = teacher_forced
    r = _randn(model.config.hidden_size)
    with InterventionHandler(model, r, STRENGTH, layers=[LAYER], apply_to=positions):
        with pytest.raises(UserError, match="outside generate"):
            _forward(model, batch)
    with InterventionHandler(model, r, mode="ablate", apply_to=positions):
        with pytest.raises(UserError, match="prompt_lengths"):
            _forward(model, batch)
    with InterventionHandler(model, r, STRENGTH, layers=[LAYER], apply_to="all"):  # needs no boundary
        _forward(model, batch)


def test_gold_solution_nll_under_generated_positions_equals_hf_loss_with_a_manual_hook(tiny, teacher_forced):
    """The README example: the NLL inside the handler (left-padded batches) equals HF's loss on each unpadded
    prompt + solution with r added by hand at the solution positions only. Before the fix it equalled the
    un-intervened NLL."""
    model, tokenizer = tiny
    _, prompt_lengths, _, prompts = teacher_forced
    r = _randn(model.config.hidden_size)
    with InterventionHandler(model, r, STRENGTH, layers=[LAYER], mode="add", apply_to="generated"):
        nll = gold_solution_nll(model, tokenizer, prompts, SOLUTIONS, batch_size=3)
    reference = []
    for prompt, solution, n_prompt in zip(prompts, SOLUTIONS, prompt_lengths):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        s = tokenizer(solution, add_special_tokens=False)["input_ids"]
        tail = (torch.arange(len(p) + len(s)) >= n_prompt).to(torch.float32)[None, :, None]
        with hooked(model, [(site_name(LAYER), lambda h, tail=tail: h + tail * (STRENGTH * r))]), torch.no_grad():
            loss = model(input_ids=torch.tensor([p + s]), labels=torch.tensor([[-100] * len(p) + s])).loss
        reference.append(float(loss))
    np.testing.assert_allclose(nll.numpy(), reference, atol=1e-5, rtol=1e-6)  # as tests/test_metrics.py
    plain = gold_solution_nll(model, tokenizer, prompts, SOLUTIONS, batch_size=3)
    assert float((nll - plain).abs().min()) > 1e-3


def test_generation_forwards_keep_the_generation_rule_under_a_boundary(tiny, teacher_forced):
    """prompt_lengths only mark forwards without a KV cache: cached generation still works."""
    model, tokenizer = tiny
    batch, prompt_lengths, _, prompts = teacher_forced
    r = _randn(model.config.hidden_size)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with InterventionHandler(model, r, STRENGTH, layers=[LAYER], apply_to="generated"):
        expected = model.generate(**batch, **kwargs)
    handler = InterventionHandler(
        model, r, STRENGTH, layers=[LAYER], apply_to="generated", prompt_lengths=prompt_lengths
    )
    with handler:
        assert torch.equal(model.generate(**batch, **kwargs), expected)


def test_bad_prompt_boundaries_raise(tiny, teacher_forced):
    model, _ = tiny
    batch, prompt_lengths, *_ = teacher_forced
    r = _randn(model.config.hidden_size)
    with pytest.raises(UserError, match="only used with apply_to"):
        InterventionHandler(model, r, apply_to="all", prompt_lengths=prompt_lengths)
    with pytest.raises(UserError, match="token counts"):
        InterventionHandler(model, r, apply_to="generated", prompt_lengths=[2.5, 3.0, 1.0])
    with InterventionHandler(model, r, apply_to="generated", prompt_lengths=prompt_lengths[:2]):
        with pytest.raises(UserError, match="rows"):
            _forward(model, batch)
    n_real = batch["attention_mask"].sum(-1).tolist()
    with InterventionHandler(model, r, apply_to="prompt", prompt_lengths=[n_real[0] + 1, 1, 1]):
        with pytest.raises(UserError, match="exceeds"):
            _forward(model, batch)
