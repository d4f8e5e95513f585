"""Steering vectors (lightning_modules/steering.py) on the tiny backbone: the addition against AddDirection /
InterventionHandler, gradients that reach only the vectors, a real learning check, checkpoints that hold only the
vectors, a resumed fit equal to an uninterrupted one, and bad input."""

import lightning as L
import pytest
import torch

from datamodules.completions import CompletionDataModule
from datamodules.problems import DatasetSource
from datamodules.prompts import ReasoningPromptsDataModule
from interp.backbone import BackboneSpec
from interp.errors import UserError
from interp.interventions import AddTrainableVectors, InterventionHandler
from interp.metrics import completion_logprobs
from interp.prompts import tokenize_prompts
from interp.steering_objectives import bipo_loss, sequence_logprob
from lightning_modules.steering import SteeringVectorModule

LAYERS = [8, 16]


def _data(limit: int = 10, batch_size: int = 4, pairs: bool = False) -> CompletionDataModule:
    prompts = ReasoningPromptsDataModule(sources=[DatasetSource("gsm8k", limit=limit)], val_fraction=0.2,
                                         test_fraction=0.2)  # fmt: skip
    return CompletionDataModule(prompts, BackboneSpec("tiny"), max_completion_tokens=24, batch_size=batch_size,
                                pairs=pairs)  # fmt: skip


def _module(data: CompletionDataModule, layers=LAYERS, **kwargs) -> SteeringVectorModule:
    """A module built and attached by hand (what `setup` does in a fit)."""
    data.setup()
    module = SteeringVectorModule(layers=layers, **kwargs)
    module._build({"layers": layers, "d_model": data.d_model})
    module.attach_backbone(data.backbone)
    module.backbone_model.requires_grad_(False)
    module.pad_id = data.pad_id
    return module


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_trainable_addition_equals_add_direction(tiny, chat_prompts):
    """Zero vectors leave the logits bit-identical; vectors v at layers 3 and 9 give exactly what
    InterventionHandler gives with the same rows (the same float32 arithmetic), on every token or only the prompt's."""
    model, tokenizer = tiny
    batch = tokenize_prompts(tokenizer, chat_prompts)
    plain = _logits(model, batch)
    zeros = torch.zeros(2, 64, requires_grad=True)
    with AddTrainableVectors(model, zeros, [3, 9]):
        assert torch.equal(_logits(model, batch), plain)
    torch.manual_seed(0)
    vectors = torch.randn(2, 64)
    rows = torch.zeros(32, 64)
    rows[[3, 9]] = vectors
    lengths = batch["attention_mask"].sum(1) - 2  # the last two real tokens of each row count as generated
    for apply_to, kwargs in (("all", {}), ("prompt", {"prompt_lengths": lengths})):
        with AddTrainableVectors(model, vectors.clone().requires_grad_(), [3, 9], 0.5, apply_to, **kwargs):
            ours = _logits(model, batch)
        with InterventionHandler(model, rows, 0.5, layers=[3, 9], apply_to=apply_to, **kwargs):
            theirs = _logits(model, batch)
        assert torch.equal(ours, theirs) and not torch.equal(ours, plain), apply_to
    with pytest.raises(UserError, match="sorted and unique"):
        AddTrainableVectors(model, vectors, [9, 3])
    with pytest.raises(UserError, match=r"vectors must be \[2, 64\]"):
        AddTrainableVectors(model, torch.zeros(3, 64), [3, 9])


def test_completion_logprobs_score_only_the_completion(tiny):
    """completion_logprobs against one unpadded forward per row (float32: equal to ~1e-5)."""
    model, tokenizer = tiny
    prompt_ids = [tokenizer("Hi there", add_special_tokens=False)["input_ids"], [9707]]
    completion_ids = [[16, 17, 18], [19]]
    logprobs, mask = completion_logprobs(model, prompt_ids, completion_ids, pad_id=0)
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].log_softmax(-1)
        expected = alone[torch.arange(len(c)), torch.tensor(c)]
        torch.testing.assert_close(logprobs[row][mask[row]].detach(), expected, rtol=0, atol=1e-4)


def test_gradients_reach_only_the_vectors_and_sft_learns():
    """One step: the vectors get a gradient, no backbone parameter does. Thirty AdamW steps on one fixed batch lower
    its gold-solution NLL by far more than float noise (measured 11.958 -> 11.706 nats: this random backbone's
    output is near uniform, log 152064 = 11.93, so a residual vector can only move it so far)."""
    data = _data()
    module = _module(data)
    batch = data.collate(data.items["train"][:4])
    before = {name: p.detach().clone() for name, p in module.backbone_model.named_parameters()}
    optimizer = torch.optim.AdamW([module.vectors], lr=0.1)
    losses = []
    for _ in range(30):
        total, count = module.token_nll(batch)
        loss = total / count
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert module.vectors.grad is not None and bool(module.vectors.grad.abs().sum() > 0)
            assert all(p.grad is None and not p.requires_grad for p in module.backbone_model.parameters())
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    unsteered, count = module.token_nll(batch, strength=0.0)
    assert float(unsteered / count) == pytest.approx(losses[0], abs=1e-5)  # zero vectors at step 0: no effect
    for name, p in module.backbone_model.named_parameters():
        assert torch.equal(p, before[name]), name


def _fit(tmp_path, max_epochs: int, ckpt_path=None) -> tuple[SteeringVectorModule, L.Trainer]:
    L.seed_everything(0)
    module = SteeringVectorModule(layers=LAYERS, lr=0.05, init="random", max_norm=0.5)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, deterministic=True,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")])  # fmt: skip
    trainer.fit(module, datamodule=_data(), ckpt_path=ckpt_path)
    return module, trainer


def test_fit_checkpoints_only_the_vectors_and_resumes_exactly(tmp_path):
    """A 2-epoch fit resumed to 4 epochs ends with the vectors of an uninterrupted 4-epoch fit (per-epoch seeded
    order, optimizer state in the checkpoint); the checkpoint holds the vectors and nothing of the backbone;
    max_norm caps every vector."""
    whole, _ = _fit(tmp_path / "whole", 4)
    first, _ = _fit(tmp_path / "part", 2)
    checkpoint = torch.load(tmp_path / "part" / "last.ckpt", map_location="cpu", weights_only=False)
    assert list(checkpoint["state_dict"]) == ["vectors"] and checkpoint["steering_layout"]["layers"] == LAYERS
    assert checkpoint["optimizer_states"][0]["state"]  # AdamW moments travel with the vectors
    resumed, _ = _fit(tmp_path / "resumed", 4, ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert not torch.equal(first.vectors, whole.vectors)
    assert torch.equal(resumed.vectors, whole.vectors)
    assert bool((whole.vectors.norm(dim=-1) <= 0.5 + 1e-6).all())
    loaded = SteeringVectorModule.load_from_checkpoint(tmp_path / "part" / "last.ckpt", map_location="cpu")
    assert torch.equal(loaded.vectors, first.vectors) and loaded.layers == LAYERS


def test_validation_nll_is_the_mean_over_val_completion_tokens(tmp_path):
    """val/nll and val/nll_unsteered after a 2-epoch fit (the second epoch reads the unsteered NLL from the first's)
    = total NLL / tokens of the val completions, recomputed one problem at a time from the plain model's logits,
    with the final vectors added by InterventionHandler or not. Float32, 24-token completions of a 64-wide model:
    1e-5 relative."""
    module, trainer = _fit(tmp_path, 2)
    data = _data()
    data.setup()
    model = module.backbone_model
    full = torch.zeros(32, 64)
    full[LAYERS] = module.vectors.detach()
    for key, handler in (("val/nll_unsteered", None), ("val/nll", InterventionHandler(model, full, 1.0, layers=LAYERS))):
        total, count = 0.0, 0
        with handler or torch.no_grad(), torch.no_grad():
            for prompt, completion, _ in data.items["val"]:
                logits = model(torch.tensor([prompt + completion])).logits[0].double()  # [seq, vocab]
                logprobs = logits[len(prompt) - 1 : -1].log_softmax(-1)  # predicting the completion tokens
                total -= float(logprobs.gather(-1, torch.tensor(completion)[:, None]).sum())
                count += len(completion)
        assert float(trainer.callback_metrics[key]) == pytest.approx(total / count, rel=1e-5), key


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": [8, 32]}, r"model.layers \[32\] out of range"),
        ({"layers": [16, 8]}, "sorted list of distinct layers"),
        ({"layers": [8], "apply_to": "tokens"}, "model.apply_to must be one of"),
        ({"layers": [8], "objective": "dpo"}, "model.objective must be one of"),
        ({"layers": [8], "objective": "bipo"}, "bipo needs preferred / dispreferred completions"),
        ({"layers": [8], "init": "directions"}, "init: directions needs model.directions"),
        ({"layers": [8], "init": "directions", "directions": "nowhere.safetensors"}, "does not exist"),
    ],
)
def test_bad_input_is_one_clear_error_before_training(kwargs, message):
    with pytest.raises(UserError, match=message):
        SteeringVectorModule(**kwargs).check_data(_data())


def test_directions_from_another_backbone_are_refused(tmp_path):
    from interp.directions import save_directions

    save_directions(tmp_path / "d.safetensors", torch.ones(1, 1, 64), {"backbone": {"name_or_path": "tiny-r1-distill",
                    "weights": "other"}, "d_model": 64, "layers": [8], "selected": {"position": 0, "layer": 8}})  # fmt: skip
    module = SteeringVectorModule(layers=[8], init="directions", directions=str(tmp_path / "d.safetensors"))
    with pytest.raises(UserError, match="come from backbone 'tiny-r1-distill'"):
        module.check_data(_data())


def test_bipo_loss_by_hand():
    """margin = (-2 - -3) - (-5 - -4) = 2; beta 0.5: -log sigmoid(+-1) = log(1 + e^-+1)."""
    values = [torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0])]
    assert float(bipo_loss(*values, multiplier=1.0, beta=0.5)) == pytest.approx(0.313261687518, abs=1e-7)
    assert float(bipo_loss(*values, multiplier=-1.0, beta=0.5)) == pytest.approx(1.313261687518, abs=1e-6)
    logprobs, mask = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -4.0, -5.0]]), torch.tensor([[0, 1, 1], [1, 1, 1]]).bool()
    assert sequence_logprob(logprobs, mask).tolist() == [-11.0, -12.0]


def test_bipo_step_starts_at_log_2_and_learns():
    """Zero vectors: steered = reference, so the loss is log 2 exactly; the seeded multiplier takes both signs;
    20 steps of AdamW on one batch lower the loss of a fixed-sign evaluation below log 2."""
    data = _data(pairs=True)
    module = _module(data, objective="bipo", beta=1.0)
    batch = data.collate(data.items["train"][:4])
    assert batch["dispreferred_ids"][0] == data.prompts.tokenizer(
        "The answer is \\boxed{" + data.prompts.rows[int(batch["rows"][0])].gold_answer + "}.", add_special_tokens=False
    )["input_ids"]
    assert float(module.bipo_step(batch, 0)) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)
    signs = [module.multiplier(step) for step in range(20)]
    assert set(signs) == {-1.0, 1.0}
    optimizer = torch.optim.AdamW([module.vectors], lr=0.05)
    for step in range(20):
        loss = module.bipo_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = [float(module.bipo_step(batch, step)) for step in (signs.index(1.0), signs.index(-1.0))]
    assert max(after) < float(torch.log(torch.tensor(2.0))) - 0.01, after


def test_gradient_checkpointing_gives_the_same_vector_gradients(monkeypatch):
    """Activation checkpointing (each layer recomputed in the backward) leaves the vectors' gradient unchanged:
    the recomputed forward is the same float32 arithmetic (tolerance: a few ulps, not a loose bound). The vectors'
    hooks sit on the decoder layers' outputs, outside the checkpointed forward, so they act once per forward."""
    from transformers.models.qwen2 import modeling_qwen2

    mlp_calls = []
    forward = modeling_qwen2.Qwen2MLP.forward
    monkeypatch.setattr(modeling_qwen2.Qwen2MLP, "forward", lambda self, x: mlp_calls.append(1) or forward(self, x))
    data = _data()
    grads, calls = [], []
    for checkpointing in (False, True):
        module = _module(data, layers=[3, 20])
        module.backbone.release()  # a fresh backbone per run: checkpointing must not leak into the other
        model = module.backbone_model
        if checkpointing:
            model.activation_checkpointing_enable()
            model.train()
        with torch.no_grad():
            module.vectors.normal_(generator=torch.Generator().manual_seed(0))
        mlp_calls.clear()
        total, count = module.token_nll(data.collate(data.items["train"][:4]))
        (total / count).backward()
        calls.append(len(mlp_calls))
        grads.append(module.vectors.grad.clone())
    assert calls[0] == 32 and calls[1] > calls[0]  # the layers the gradient passes through ran again
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)
    assert bool(grads[0].abs().sum() > 0)


def _fit_lora(tmp_path, max_epochs: int, ckpt_path=None):
    from lightning_modules.steering_lora import LoraSteeringModule

    L.seed_everything(0)
    module = LoraSteeringModule(layers=LAYERS, rank=4, lr=0.01)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, deterministic=True,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")])  # fmt: skip
    trainer.fit(module, datamodule=_data(), ckpt_path=ckpt_path)
    return module


def test_lora_baseline_trains_only_its_adapter_checkpoints_it_alone_and_resumes(tmp_path):
    """The LoRA baseline on the same data and objective: rank 4 on the 7 projections of layers 8 and 16; the
    checkpoint holds lora_A / lora_B only; a resumed fit equals an uninterrupted one; strength 0 is the backbone."""
    from lightning_modules.steering_lora import LoraSteeringModule

    whole = _fit_lora(tmp_path / "whole", 3)
    checkpoint = torch.load(tmp_path / "whole" / "last.ckpt", map_location="cpu", weights_only=False)
    adapter = checkpoint["lora_adapter"]
    assert checkpoint["state_dict"] == {} and len(adapter) == 2 * 7 * len(LAYERS)
    assert all(".lora_A." in name or ".lora_B." in name for name in adapter)
    assert {int(name.split(".layers.")[1].split(".")[0]) for name in adapter} == set(LAYERS)
    n_adapter = sum(t.numel() for t in adapter.values())
    assert n_adapter == sum(p.numel() for p in whole.trainable_parameters()) > 64 * len(LAYERS)  # vs the vectors'
    _fit_lora(tmp_path / "part", 1)
    resumed = _fit_lora(tmp_path / "resumed", 3, ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    for ours, theirs in zip(resumed.trainable_parameters(), whole.trainable_parameters()):
        assert torch.equal(ours, theirs)
    assert any(bool(p.abs().sum() > 0) for name, p in whole.adapted_backbone().named_parameters() if "lora_B" in name)
    loaded = LoraSteeringModule.load_from_checkpoint(tmp_path / "whole" / "last.ckpt", map_location="cpu")
    data = _data()
    data.setup()
    loaded.pad_id = data.pad_id
    batch = data.collate(data.items["val"][:2])
    steered, _ = loaded.token_nll(batch)
    plain, _ = loaded.token_nll(batch, strength=0.0)
    reference = _module(data, layers=LAYERS)  # a fresh backbone, no adapter
    base, _ = reference.token_nll(batch, strength=0.0)
    torch.testing.assert_close(plain, base, rtol=0, atol=0)
    trained, _ = whole.token_nll(batch)
    torch.testing.assert_close(steered, trained, rtol=1e-6, atol=1e-5)  # the checkpoint's adapter, reloaded
    assert not torch.equal(steered, plain)


def test_bf16_backbone_trains_float32_vectors():
    """A bfloat16 backbone (the real configs' dtype): the vectors and their gradient stay float32 and the gradient
    is the float32 backbone's up to bf16 rounding (unit roundoff 2^-8 = 0.004; measured relative error 0.01)."""
    grads = {}
    for dtype in ("float32", "bfloat16"):
        prompts = ReasoningPromptsDataModule(sources=[DatasetSource("gsm8k", limit=10)], val_fraction=0.2,
                                             test_fraction=0.2)  # fmt: skip
        data = CompletionDataModule(prompts, BackboneSpec("tiny", dtype=dtype), max_completion_tokens=24, batch_size=4)
        module = _module(data)
        with torch.no_grad():
            module.vectors.copy_(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))
        total, count = module.token_nll(data.collate(data.items["train"][:4]))
        (total / count).backward()
        assert next(module.backbone_model.parameters()).dtype == getattr(torch, dtype)
        assert module.vectors.dtype == module.vectors.grad.dtype == torch.float32
        grads[dtype] = module.vectors.grad
    error = (grads["bfloat16"] - grads["float32"]).norm() / grads["float32"].norm()
    assert float(error) < 12 * 2**-8, float(error)
