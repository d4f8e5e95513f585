"""Interventions pinned against independent computations: HF hidden states, manual hooks, weight
orthogonalization, a model with a layer deleted, hand-rolled generation loops and closed-form means."""

import copy

import pytest
import torch
from tolerances import U32
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from interp.ablation import LayerAblator
from interp.activations import collect_activations
from interp.backbone import decoder_layers
from interp.errors import UserError
from interp.generation import apply_direction_intervention, generate, generate_token_ids
from interp.hooks import hooked, site_name
from interp.interventions import AblateDirection, AddDirection, InterventionHandler
from interp.orthogonalize import orthogonalize_weights
from interp.positions import padded_position_ids
from interp.prompts import format_chat_prompt, tokenize_prompts

N_NEW = 6  # new tokens per generation test: enough to see several decoding steps, fast on 2 cores


def _randn(*shape, seed=0):
    """Fixed random numbers, independent of test order."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, batch, keep=4):
    """Logits of the last `keep` positions (each depends on every earlier token; the full 152k-vocab
    unembedding of every position would dominate the test time)."""
    position_ids = padded_position_ids(batch["attention_mask"])
    return model(**batch, position_ids=position_ids, use_cache=False, logits_to_keep=keep).logits


def _hidden_states(model, batch):
    """HF output_hidden_states: entry l = input of layer l (entry L is after the final norm: unused)."""
    position_ids = padded_position_ids(batch["attention_mask"])
    return model.model(**batch, position_ids=position_ids, output_hidden_states=True).hidden_states


class _Recorder:
    """Copies of the activations at `sites`, one list entry per forward (via `hooked`)."""

    def __init__(self, model, sites):
        self.model, self.sites = model, list(sites)
        self.seen: dict[str, list[torch.Tensor]] = {site: [] for site in self.sites}

    def __enter__(self):
        hooks = [
            (site, (lambda s: lambda h: self.seen[s].append(h.detach().clone()))(site)) for site in self.sites
        ]
        self._ctx = hooked(self.model, hooks)
        self._ctx.__enter__()
        return self.seen

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _assert_no_hooks(model):
    """No hook registered through interp.hooks is left (transformers keeps hooks of its own on the layers)."""
    for module in model.modules():
        for hook in [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]:
            assert getattr(hook, "__module__", None) != "interp.hooks", type(module).__name__


@pytest.fixture(scope="module")
def batch(tiny, chat_prompts):
    """Three short chat prompts of different lengths (left padded)."""
    return tokenize_prompts(tiny[1], [chat_prompts[0], chat_prompts[3], chat_prompts[2]])


@pytest.fixture(scope="module")
def short_prompts(chat_prompts):
    """Four short chat prompts of different lengths (generation tests re-run them many times)."""
    return [chat_prompts[i] for i in (0, 3, 2, 4)]


@pytest.fixture(scope="module")
def mean_direction(tiny, chat_prompts):
    """A direction the residual stream really uses: the mean layer-10 activation (cosine ~0.95 with each)."""
    return collect_activations(tiny[0], tiny[1], chat_prompts, layers=[10]).mean(0)[0]


# ---------------------------------------------------------------------------------------------- hook sites


def test_new_sites_decompose_the_residual_stream(tiny, batch):
    model, _ = tiny
    n = len(decoder_layers(model))
    sites = ["embed"] + [
        site_name(layer, kind)
        for layer in range(n)
        for kind in ("resid_pre", "attn_out", "mlp_out", "resid_post")
    ]
    with _Recorder(model, sites) as seen:
        _logits(model, batch)
    hidden = _hidden_states(model, batch)
    shape = (*batch["input_ids"].shape, model.config.hidden_size)
    assert seen["embed"][0].shape == shape
    torch.testing.assert_close(seen["embed"][0], hidden[0], atol=0, rtol=0)
    for layer in range(n):
        assert seen[site_name(layer, "attn_out")][0].shape == shape
        torch.testing.assert_close(seen[site_name(layer, "resid_pre")][0], hidden[layer], atol=0, rtol=0)
        total = sum(seen[site_name(layer, kind)][0] for kind in ("resid_pre", "attn_out", "mlp_out"))
        torch.testing.assert_close(seen[site_name(layer, "resid_post")][0], total, atol=1e-6, rtol=1e-5)
    _assert_no_hooks(model)


def test_sites_are_found_structurally_on_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)).eval()
    ids = torch.randint(0, 64, (2, 5))
    sites = ["embed"] + [
        site_name(layer, kind)
        for layer in range(2)
        for kind in ("resid_pre", "attn_out", "mlp_out", "resid_post")
    ]
    with _Recorder(model, sites) as seen:
        model(input_ids=ids)
    torch.testing.assert_close(seen["embed"][0], model.transformer.wte(ids), atol=0, rtol=0)
    for layer in range(2):
        total = sum(seen[site_name(layer, kind)][0] for kind in ("resid_pre", "attn_out", "mlp_out"))
        torch.testing.assert_close(seen[site_name(layer, "resid_post")][0], total, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- add


def test_strength_zero_is_the_identity(tiny, batch):
    model, _ = tiny
    clean = _logits(model, batch)
    directions = _randn(len(decoder_layers(model)), model.config.hidden_size)
    with InterventionHandler(model, directions, 0.0):
        assert torch.equal(_logits(model, batch), clean)
    with InterventionHandler(model, directions[3], 0.0, mode="ablate"):
        assert torch.equal(_logits(model, batch), clean)


def test_add_at_a_layer_equals_a_manual_hook_and_leaves_earlier_layers(tiny, batch):
    model, _ = tiny
    n = len(decoder_layers(model))
    r = _randn(model.config.hidden_size)
    sites = [site_name(layer) for layer in range(n)]
    with _Recorder(model, sites) as clean:
        clean_logits = _logits(model, batch)
    with InterventionHandler(model, r, 3.0, layers=[7]), _Recorder(model, sites) as steered:
        logits = _logits(model, batch)
    for layer in range(7):
        assert torch.equal(steered[site_name(layer)][0], clean[site_name(layer)][0])
    torch.testing.assert_close(steered[site_name(7)][0], clean[site_name(7)][0] + 3.0 * r, atol=1e-6, rtol=0)
    assert not torch.allclose(logits, clean_logits, atol=1e-3)
    with hooked(model, [(site_name(7), lambda h: h + 3.0 * r)]):
        assert torch.equal(_logits(model, batch), logits)

    rows = _randn(n, model.config.hidden_size)  # one direction per layer: row l goes to layer l
    with InterventionHandler(model, rows, -2.0, layers=[9, 3]):
        got = _logits(model, batch)
    with hooked(
        model, [(site_name(3), lambda h: h - 2.0 * rows[3]), (site_name(9), lambda h: h - 2.0 * rows[9])]
    ):
        assert torch.equal(_logits(model, batch), got)


def test_nested_handlers_compose(tiny, batch):
    model, _ = tiny
    r1, r2 = _randn(2, model.config.hidden_size)
    with InterventionHandler(model, r1, 1.5, layers=[3]), InterventionHandler(model, r2, 0.5, layers=[3, 9]):
        nested = _logits(model, batch)
    manual = [(site_name(3), lambda h: h + 1.5 * r1 + 0.5 * r2), (site_name(9), lambda h: h + 0.5 * r2)]
    with hooked(model, manual):
        torch.testing.assert_close(nested, _logits(model, batch), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- ablate


def _relative_projection(x, r_hat):
    """max over tokens of |x . r_hat| / |x|."""
    return float(((x @ r_hat).abs() / x.norm(dim=-1).clamp_min(1e-12)).max())


def test_ablation_removes_the_direction_at_every_write_and_every_layer_output(tiny, batch, mean_direction):
    model, _ = tiny
    n = len(decoder_layers(model))
    r_hat = mean_direction / mean_direction.norm()
    writes = ["embed"] + [site_name(layer, kind) for layer in range(n) for kind in ("attn_out", "mlp_out")]
    outputs = [site_name(layer) for layer in range(n)]
    with _Recorder(model, writes + outputs) as clean:
        _logits(model, batch)
    assert _relative_projection(clean[site_name(10)][0], r_hat) > 0.5  # there is something to remove
    with (
        InterventionHandler(model, mean_direction, mode="ablate"),
        _Recorder(model, writes + outputs) as seen,
    ):
        _logits(model, batch)
    for site in writes + outputs:
        assert _relative_projection(seen[site][0], r_hat) < 1e-5, site


def test_hook_ablation_equals_weight_orthogonalization(tiny, batch, mean_direction):
    model, _ = tiny
    clean = _logits(model, batch)
    with InterventionHandler(model, mean_direction, mode="ablate"):
        hooked_logits = _logits(model, batch)
    assert not torch.allclose(hooked_logits, clean, atol=1e-3)
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, mean_direction)
    r_hat = mean_direction / mean_direction.norm()
    assert float((edited.get_input_embeddings().weight @ r_hat).abs().max()) < 1e-6
    for block in decoder_layers(edited):
        assert float((r_hat @ block.self_attn.o_proj.weight).abs().max()) < 1e-6
        assert float((r_hat @ block.mlp.down_proj.weight).abs().max()) < 1e-6
    torch.testing.assert_close(_logits(edited, batch), hooked_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(_logits(model, batch), clean)  # the fixture's model is untouched

    rows = _randn(len(decoder_layers(model)), model.config.hidden_size)
    rows[10] = mean_direction
    with InterventionHandler(model, rows, mode="ablate", ablation_layer=10):
        assert torch.equal(_logits(model, batch), hooked_logits)


def test_orthogonalization_unties_tied_embeddings():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    original = model.lm_head.weight.detach().clone()
    batch = {"input_ids": torch.randint(0, 96, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    r = torch.randn(32)
    with InterventionHandler(model, r, mode="ablate"):
        expected = _logits(model, batch)
    orthogonalize_weights(model, r)
    assert torch.equal(model.lm_head.weight, original)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model, batch), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- positions and generation


def _greedy(model, batch, use_cache):
    return model.generate(
        **batch, max_new_tokens=N_NEW, do_sample=False, use_cache=use_cache, pad_token_id=0, eos_token_id=None
    )


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("positions", ["prompt", "generated", "all"])
def test_positions_select_prompt_or_generated_tokens(tiny, batch, positions, use_cache):
    """What the handler adds in each forward of `generate`, read between a hook before and one after it."""
    model, _ = tiny
    r = _randn(model.config.hidden_size)
    site = site_name(5)
    with _Recorder(model, [site]) as before:
        with InterventionHandler(model, r, 2.0, layers=[5], apply_to=positions):
            with _Recorder(model, [site]) as after:
                _greedy(model, batch, use_cache)
    prompt_len = batch["input_ids"].shape[1]
    assert len(before[site]) == N_NEW
    for step, (b, a) in enumerate(zip(before[site], after[site])):
        start = 0 if step == 0 or not use_cache else prompt_len + step - 1  # absolute position of column 0
        length = prompt_len if step == 0 else (1 if use_cache else prompt_len + step)
        assert a.shape[1] == length
        absolute = torch.arange(start, start + length)
        chosen = {"prompt": absolute < prompt_len, "generated": absolute >= prompt_len, "all": absolute >= 0}
        expected = chosen[positions].to(torch.float32)[None, :, None] * (2.0 * r)
        # a = fl(b + 2r) and a - b is exact (Sterbenz) or within one rounding: |a - b - 2r| <= 2u (|b| + |2r|)
        bound = 2 * U32 * (b.abs() + expected.abs())
        assert bool(((a - b) - expected).abs().le(bound).all())
        assert bool((a - b)[:, ~chosen[positions]].eq(0).all())  # untouched positions are untouched exactly


@pytest.mark.parametrize("positions", ["prompt", "generated", "all"])
def test_greedy_generation_with_cache_equals_without_cache(tiny, short_prompts, positions):
    model, tokenizer = tiny
    r = _randn(model.config.hidden_size)
    kwargs = {"max_new_tokens": N_NEW, "do_sample": False, "batch_size": 3}
    baseline = generate_token_ids(model, tokenizer, short_prompts[:3], **kwargs)
    with InterventionHandler(model, r, 4.0, layers=[5], apply_to=positions):
        cached = generate_token_ids(model, tokenizer, short_prompts[:3], **kwargs)
        uncached = generate_token_ids(model, tokenizer, short_prompts[:3], use_cache=False, **kwargs)
    assert cached == uncached
    assert cached != baseline
    if positions == "generated":  # the first new token is predicted from the (untouched) prompt
        assert [row[0] for row in cached] == [row[0] for row in baseline]


def test_generated_positions_match_a_hand_rolled_loop(tiny, batch):
    """Greedy decoding without a cache, adding r only at positions >= the prompt length, by hand."""
    model, _ = tiny
    r = _randn(model.config.hidden_size)
    prompt_len = batch["input_ids"].shape[1]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(N_NEW):
        tail = (torch.arange(ids.shape[1]) >= prompt_len).to(torch.float32)[None, :, None]
        with hooked(model, [(site_name(5), lambda h, tail=tail: h + tail * (4.0 * r))]):
            logits = _logits(model, {"input_ids": ids, "attention_mask": mask})
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    with InterventionHandler(model, r, 4.0, layers=[5], apply_to="generated"):
        assert torch.equal(_greedy(model, batch, use_cache=True), ids)


def test_a_new_prompt_batch_restarts_the_prompt(tiny, short_prompts):
    """Without a cache too: generating prompts in batches equals generating each prompt alone."""
    model, tokenizer = tiny
    r = _randn(model.config.hidden_size)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "use_cache": False}
    with InterventionHandler(model, r, 4.0, layers=[5], apply_to="generated"):
        together = generate_token_ids(model, tokenizer, short_prompts[:4], batch_size=2, **kwargs)
        alone = [generate_token_ids(model, tokenizer, [p], **kwargs)[0] for p in short_prompts[:4]]
    assert together == alone


def test_generate_greedy_matches_hf_generate_in_input_order(tiny, short_prompts):
    model, tokenizer = tiny
    prompts = short_prompts[:3]
    texts = generate(model, tokenizer, prompts, max_new_tokens=N_NEW, do_sample=False, batch_size=2)
    for prompt, text in zip(prompts, texts):
        one = tokenize_prompts(tokenizer, [prompt])
        ids = model.generate(
            **one, max_new_tokens=N_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        assert text == tokenizer.decode(ids[0, one["input_ids"].shape[1] :])


def test_sampling_is_reproducible_with_a_seed_and_leaves_the_global_rng(tiny, short_prompts):
    model, tokenizer = tiny
    state = torch.get_rng_state()
    first = generate(model, tokenizer, short_prompts[:2], max_new_tokens=4, seed=1)
    again = generate(model, tokenizer, short_prompts[:2], max_new_tokens=4, seed=1)
    other = generate(model, tokenizer, short_prompts[:2], max_new_tokens=4, seed=2)
    assert first == again and first != other
    assert torch.equal(torch.get_rng_state(), state)


def test_apply_direction_intervention(tiny, short_prompts):
    model, tokenizer = tiny
    r = _randn(model.config.hidden_size)
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    text = apply_direction_intervention(model, tokenizer, short_prompts[0], r, 4.0, layers=[5], **kwargs)
    with InterventionHandler(model, r, 4.0, layers=[5]):
        assert [text] == generate(model, tokenizer, short_prompts[:1], **kwargs)
    texts = apply_direction_intervention(model, tokenizer, short_prompts[:2], r, 0.0, **kwargs)
    assert texts == generate(model, tokenizer, short_prompts[:2], **kwargs)
    assert text != texts[0]


# --------------------------------------------------------------------------------------- layer ablation


@pytest.mark.parametrize("layer", [4, 31])
def test_zero_ablation_equals_deleting_the_layer(tiny, batch, layer):
    model, _ = tiny
    with (
        LayerAblator(model, layer),
        _Recorder(model, [site_name(layer, "resid_pre"), site_name(layer)]) as seen,
    ):
        ablated = _logits(model, batch)
    assert torch.equal(seen[site_name(layer)][0], seen[site_name(layer, "resid_pre")][0])
    shorter = copy.deepcopy(model)
    del shorter.model.layers[layer]
    shorter.config.num_hidden_layers -= 1
    shorter.config.layer_types = [t for i, t in enumerate(shorter.config.layer_types) if i != layer]
    torch.testing.assert_close(ablated, _logits(shorter, batch), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ablated, _logits(model, batch), atol=1e-3)


def test_mean_ablation_uses_float64_role_means_over_real_reference_tokens(tiny, batch, chat_prompts):
    """Means of the first real token and of the later real tokens, each prompt alone through HF hidden states."""
    model, tokenizer = tiny
    layers = [3, 10]
    ablator = LayerAblator(
        model, layers, "mean", reference_inputs=chat_prompts, tokenizer=tokenizer, batch_size=2
    )
    alone = [_hidden_states(model, tokenize_prompts(tokenizer, [prompt])) for prompt in chat_prompts]
    for layer in layers:  # independent: each prompt alone, unpadded, through HF output_hidden_states
        written = [hidden[layer + 1][0].double() - hidden[layer][0].double() for hidden in alone]  # [seq, d]
        first = sum(c[0] for c in written) / len(written)
        later = sum(c[1:].sum(0) for c in written) / sum(c.shape[0] - 1 for c in written)
        assert ablator.means[layer].dtype == torch.float64
        torch.testing.assert_close(ablator.means[layer], torch.stack([first, later]), atol=1e-6, rtol=1e-5)
    assert ablator.counts == [len(chat_prompts), sum(h[0].shape[1] - 1 for h in alone)]
    # The tiny model's pad embedding is zero, so its layers write nothing at padding: put a real token under
    # the padding instead, so that counting padded positions would show.
    padded = tokenize_prompts(tokenizer, chat_prompts)
    padded["input_ids"] = padded["input_ids"].where(padded["attention_mask"].bool(), 13)
    from_batch = LayerAblator(model, layers, "mean", reference_inputs=padded)
    for layer in layers:
        torch.testing.assert_close(from_batch.means[layer], ablator.means[layer], atol=1e-6, rtol=1e-5)
    sites = [site_name(layer, kind) for layer in layers for kind in ("resid_pre", "resid_post")]
    with ablator, _Recorder(model, sites) as seen:
        _logits(model, batch)
    mask = batch["attention_mask"].bool()
    is_first = mask & (mask.long().cumsum(-1) == 1)  # [batch, seq]: each row's first real token (left padded)
    for layer in layers:
        m = ablator.means[layer].float()
        expected = seen[site_name(layer, "resid_pre")][0] + torch.where(is_first[..., None], m[0], m[1])
        torch.testing.assert_close(seen[site_name(layer)][0], expected, atol=1e-6, rtol=0)


def test_mean_ablation_over_one_token_reproduces_that_token(tiny):
    """Reference = the same single-token prompt: the mean contribution is its contribution: no change."""
    model, tokenizer = tiny
    one, other = (tokenize_prompts(tokenizer, [word]) for word in ("Hi", "Why"))
    assert one["input_ids"].shape == other["input_ids"].shape == (1, 1)
    clean = _logits(model, one)
    with LayerAblator(model, [2, 8, 20], "mean", reference_inputs=one):
        torch.testing.assert_close(_logits(model, one), clean, atol=1e-5, rtol=1e-5)
    with LayerAblator(model, [2, 8, 20], "mean", reference_inputs=other):
        assert not torch.allclose(_logits(model, one), clean, atol=1e-3)


def test_resample_ablation_pairs_rows_and_last_aligned_columns(tiny):
    model, tokenizer = tiny
    prompts = [format_chat_prompt(tokenizer, q) for q in ("What is 2+2?", "What is 3+5?", "Hi")]
    a, b, short = prompts
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert lengths[0] == lengths[1] > lengths[2]
    run = tokenize_prompts(tokenizer, [a, b])
    clean = _logits(model, run)
    with LayerAblator(
        model, 6, "resample", reference_inputs=[a, b], tokenizer=tokenizer
    ):  # itself: no change
        torch.testing.assert_close(_logits(model, run), clean, atol=1e-5, rtol=1e-5)

    sites = [site_name(6, "resid_pre"), site_name(6)]
    swapped = LayerAblator(model, 6, "resample", reference_inputs=tokenize_prompts(tokenizer, [b, a]))
    with swapped, _Recorder(model, sites) as seen:
        _logits(model, run)
    written = seen[site_name(6)][0] - seen[site_name(6, "resid_pre")][0]
    for row, donor in enumerate([b, a]):
        hidden = _hidden_states(model, tokenize_prompts(tokenizer, [donor]))
        torch.testing.assert_close(written[row], hidden[7][0] - hidden[6][0], atol=1e-5, rtol=1e-5)

    # left padding: the short prompt (row 0) gets the long one's contribution at the last-aligned columns
    padded = tokenize_prompts(tokenizer, [short, a])
    with (
        LayerAblator(model, 6, "resample", reference_inputs=[a, a], tokenizer=tokenizer),
        _Recorder(model, sites) as seen,
    ):
        _logits(model, padded)
    written = seen[site_name(6)][0] - seen[site_name(6, "resid_pre")][0]
    hidden = _hidden_states(model, tokenize_prompts(tokenizer, [a]))
    real = padded["attention_mask"][0].bool()
    torch.testing.assert_close(written[0][real], (hidden[7][0] - hidden[6][0])[real], atol=1e-5, rtol=1e-5)

    with LayerAblator(model, 6, "resample", reference_inputs=[a, short], tokenizer=tokenizer):
        with pytest.raises(UserError, match="shorter"):
            _logits(model, tokenize_prompts(tokenizer, [b, a]))
        with pytest.raises(UserError, match="shapes must match"):
            _logits(model, tokenize_prompts(tokenizer, [a]))
        with pytest.raises(UserError, match="shapes must match"):  # KV-cached decoding steps have 1 column
            model.generate(**tokenize_prompts(tokenizer, [a, b]), max_new_tokens=2, do_sample=False)
    _assert_no_hooks(model)


# ------------------------------------------------------------------------------- cleanup and bad inputs


def test_hooks_are_removed_after_exceptions(tiny, batch):
    model, tokenizer = tiny
    clean = _logits(model, batch)
    r = _randn(model.config.hidden_size)
    contexts = [
        lambda: InterventionHandler(model, r, 2.0, apply_to="generated", prompt_lengths=[2, 2, 2]),
        lambda: InterventionHandler(model, r, mode="ablate", apply_to="prompt", prompt_lengths=[2, 2, 2]),
        lambda: LayerAblator(model, [1, 2]),
    ]
    for make in contexts:
        with pytest.raises(RuntimeError, match="boom"):
            with make():
                _logits(model, batch)
                raise RuntimeError("boom")
        _assert_no_hooks(model)
    with pytest.raises(UserError):  # raised by a hook in the middle of a forward
        with LayerAblator(model, 1, "resample", reference_inputs=batch):
            _logits(model, tokenize_prompts(tokenizer, ["Hi"]))
    _assert_no_hooks(model)
    assert torch.equal(_logits(model, batch), clean)


def test_bad_inputs_raise_user_errors(tiny):
    model, tokenizer = tiny
    d, n = model.config.hidden_size, len(decoder_layers(model))
    bad = {
        "hidden size is 64": lambda: InterventionHandler(model, torch.ones(d + 1)),
        "has 32 layers": lambda: InterventionHandler(model, torch.ones(n - 1, d)),
        r"\[d_model\] or \[n_layers, d_model\]": lambda: InterventionHandler(model, torch.ones(1, n, d)),
        "NaN": lambda: InterventionHandler(model, torch.full((d,), float("nan"))),
        "zero-norm": lambda: InterventionHandler(model, torch.zeros(d), mode="ablate"),
        "unknown intervention mode": lambda: InterventionHandler(model, torch.ones(d), mode="steer"),
        "unknown apply_to": lambda: InterventionHandler(model, torch.ones(d), apply_to="last"),
        "prompt_lengths are only used": lambda: AddDirection(model, torch.ones(d), prompt_lengths=[3]),
        "AblateDirection takes one": lambda: AblateDirection(model, torch.ones(n, d)),
        "out of range": lambda: InterventionHandler(model, torch.ones(d), layers=[n]),
        "ablation_layer is only used": lambda: InterventionHandler(model, torch.ones(d), ablation_layer=1),
        "needs one direction": lambda: InterventionHandler(model, torch.ones(n, d), mode="ablate"),
        "choose its direction with ablation_layer": lambda: InterventionHandler(
            model, torch.ones(d), mode="ablate", layers=[3]
        ),
        "ablation_layer 40 out of range": lambda: InterventionHandler(
            model, torch.ones(n, d), mode="ablate", ablation_layer=40
        ),
        "one \\[d_model\\] direction": lambda: orthogonalize_weights(model, torch.ones(n, d)),
        "unknown ablation_method": lambda: LayerAblator(model, 1, "random"),
        "needs reference_inputs": lambda: LayerAblator(model, 1, "mean"),
        "only used by": lambda: LayerAblator(model, 1, reference_inputs=["Hi"]),
        "need the tokenizer": lambda: LayerAblator(model, 1, "mean", reference_inputs=["Hi"]),
        "layers \\[32\\] out of range": lambda: LayerAblator(model, [32]),
        "non-empty list": lambda: generate(model, tokenizer, "Hi"),
        "max_new_tokens": lambda: generate(model, tokenizer, ["Hi"], max_new_tokens=0),
        "temperature > 0": lambda: generate(model, tokenizer, ["Hi"], temperature=0.0),
    }
    for message, make in bad.items():
        with pytest.raises(UserError, match=message):
            make()
    _assert_no_hooks(model)


@pytest.mark.parametrize("make", [
    lambda model: InterventionHandler(model, torch.ones(model.config.hidden_size), 1.0, layers=[2]),
    lambda model: LayerAblator(model, [2], "zero"),
])  # fmt: skip
def test_an_active_intervention_cannot_be_entered_again(tiny, make):
    model, _ = tiny
    intervention = make(model)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with intervention:
        with pytest.raises(RuntimeError, match="already active"):
            intervention.__enter__()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    with intervention:  # usable again after exit
        pass


def test_the_handler_is_exactly_its_plain_intervention(tiny, batch):
    """InterventionHandler(mode=...) runs the same hooks as the AddDirection / AblateDirection it names."""
    model, _ = tiny
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    pairs = [
        (InterventionHandler(model, r, 2.0, layers=[4]), AddDirection(model, r, 2.0, [4])),
        (InterventionHandler(model, r, 0.5, mode="ablate"), AblateDirection(model, r, 0.5)),
    ]
    for handler, plain in pairs:
        with handler:
            a = _logits(model, batch)
        with plain:
            b = _logits(model, batch)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert not torch.equal(a, _logits(model, batch))  # the intervention does something
