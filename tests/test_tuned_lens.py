"""Tuned lens: identity start (= logit lens), the model's own logits at the last layer, training, checkpoints.

Independent references: the HF forward of each cached prompt (`model(...).logits`), the final norm and LM head
written out in float64 for every KL (compared within the float32 error bound of `tests/tolerances.py`), and
closed-form translators.
"""

import math

import lightning as L
import pytest
import torch
from pipeline_utils import build_datamodule, tiny_config
from tolerances import float32_kl_error, float32_readout_error, gamma

import interp.backbone
import train
from interp.errors import UserError
from interp.lens import AffineTranslators
from interp.prompts import tokenize_prompts
from lightning_modules.cache_writer import extract_activations
from lightning_modules.tuned_lens import TunedLensModule

N_BACKBONE_LAYERS = 32


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def lens_data(shared_cache_dir):
    """A complete activation cache of the tiny backbone, last token, every layer (7 + 7 problems)."""
    dm = build_datamodule(shared_cache_dir, limit=7, positions="last", batch_size=8)
    extract_activations(_trainer(), dm)
    dm.batch_size = 8
    dm.setup()
    return dm


def _layout(layers, d_model: int) -> dict:
    return {"layers": list(layers), "d_model": d_model, "n_backbone_layers": N_BACKBONE_LAYERS}


def _split_x(dm, split: str) -> torch.Tensor:
    return torch.cat([batch["x"] for batch in dm._loader(split, shuffle=False)])  # [n, n_layers, d_model]


def _readout64(model, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed [n, d], log-probabilities [n, vocab]) in float64, with the RMSNorm and LM head written out."""
    norm, weight = model.model.norm, model.lm_head.weight.double()
    h = h.double()
    normed = norm.weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return normed, (normed @ weight.T).log_softmax(-1)


def _reference_kl(model, x: torch.Tensor, translate=None) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(final || lens) [n, n_layers] in float64 from the backbone's weights, and the bound [n, n_layers] on
    the error of the module's float32 computation of it (`tests/tolerances.py`)."""
    weight = model.lm_head.weight.double()
    with torch.no_grad():
        normed_p, log_p = _readout64(model, x[:, -1])
        p_error = float32_readout_error(normed_p, weight)
        kls, bounds = [], []
        for slot in range(x.shape[1]):
            h = x[:, slot] if translate is None else translate(slot, x[:, slot])
            normed_q, log_q = _readout64(model, h)
            kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
            logit_error = torch.maximum(p_error, float32_readout_error(normed_q, weight))
            bounds.append(float32_kl_error(log_p, log_q, logit_error))
        return torch.stack(kls, dim=1), torch.stack(bounds, dim=1)


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    error = (actual.double() - expected).abs()
    assert bool((error <= bound).all()), f"max error / bound {float((error / bound).max()):.3g}"
    assert float(bound.max()) < 1e-3 * max(float(expected.abs().max()), 1.0)  # the bound is tight enough to fail


@pytest.fixture(scope="module")
def trained(lens_data, tmp_path_factory):
    """(module, checkpoint path) after 2 epochs on the tiny cache."""
    L.seed_everything(0, verbose=False)
    module = TunedLensModule(lr=1e-2)
    trainer = _trainer(max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=lens_data)
    path = tmp_path_factory.mktemp("lens_ckpt") / "lens.ckpt"
    trainer.save_checkpoint(path)
    return module, trainer, path


def test_translators_closed_form():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8)
    for rank in (None, 2):
        translators = AffineTranslators(3, 8, rank)
        assert torch.equal(translators(x), x)  # the identity at initialisation
        with torch.no_grad():
            for p in translators.parameters():
                p.copy_(torch.randn_like(p))
        if rank is None:
            A = translators.weight
        else:
            A = translators.up @ translators.down.transpose(1, 2)  # [n_layers, d, r] @ [n_layers, r, d]
            assert translators.up.shape == (3, 8, 2)
        torch.testing.assert_close(translators.matrices(), A)
        # float64 closed form; the float32 error of h + A h + b is at most gamma_(d + 2) * (|h| + |A| |h| + |b|),
        # and gamma_(d + r + 2) * (|h| + |U| |V|^T |h| + |b|) when A h is computed as U (V^T h)
        b, h = translators.bias.detach().double(), x.double()
        expected = h + torch.einsum("nld,led->nle", h, A.detach().double()) + b
        if rank is None:
            product, n_terms = A.detach().double().abs(), 8 + 2
        else:
            up, down = translators.up.detach().double().abs(), translators.down.detach().double().abs()
            product, n_terms = torch.einsum("ler,ldr->led", up, down), 8 + 2 + 2
        magnitude = h.abs() + torch.einsum("nld,led->nle", h.abs(), product) + b.abs()
        bound = gamma(n_terms) * magnitude
        assert bool(((translators(x).detach().double() - expected).abs() <= bound).all())
        for slot in range(3):  # one slot alone (the lens-depth readout) obeys the same bound
            alone = translators.apply_layer(x[:, slot], slot).detach().double()
            assert bool(((alone - expected[:, slot]).abs() <= bound[:, slot]).all())


@pytest.mark.parametrize("rank", [None, 4])
def test_untrained_tuned_lens_is_the_logit_lens(lens_data, tiny, rank):
    model, _ = tiny
    module = TunedLensModule(rank=rank)
    module._build(_layout(lens_data.layers, lens_data.d_model))
    module.attach_backbone(model)
    x = _split_x(lens_data, "val")
    with torch.no_grad():
        kl_tuned, kl_logit = module.lens.kl_per_layer(x, tuned=True), module.lens.kl_per_layer(x, tuned=False)
    assert kl_tuned.shape == (len(x), N_BACKBONE_LAYERS)
    assert torch.equal(kl_tuned, kl_logit)
    assert kl_logit[:, -1].abs().max() < 1e-7  # the last layer's logit lens is the model itself
    assert kl_logit[:, 0].min() > 1e-4  # ... the first is not (the test can fail)
    reference, bound = _reference_kl(model, x)
    _assert_within(kl_logit, reference, bound)


def test_last_layer_lens_logits_are_the_models_logits(lens_data, tiny):
    model, tokenizer = tiny
    module = TunedLensModule()
    module._build(_layout(lens_data.layers, lens_data.d_model))
    module.attach_backbone(model)
    x = _split_x(lens_data, "test")
    rows = lens_data.row_index["test"].tolist()
    with torch.no_grad():
        lens_logits = module(x)[:, module.final_slot]  # [n, vocab]
        for i, row in enumerate(rows):
            batch = tokenize_prompts(tokenizer, [lens_data.prompts.rows[row].prompt])
            hf_logits = model(**batch).logits[0, -1]
            torch.testing.assert_close(lens_logits[i], hf_logits, atol=1e-4, rtol=1e-4)


def test_needs_the_last_layer_and_another():
    module = TunedLensModule()
    with pytest.raises(UserError, match="last layer"):
        module._build(_layout([0, 5], 64))
    with pytest.raises(UserError, match="besides the last"):
        module._build(_layout([31], 64))
    with pytest.raises(UserError, match="rank"):
        TunedLensModule(rank=0)


def test_training_beats_the_logit_lens(trained, lens_data, tiny):
    module, trainer, _ = trained
    model, _ = tiny
    val = module.last_metrics["val"]
    assert val["kl_tuned"].shape == val["kl_logit"].shape == (N_BACKBONE_LAYERS,)
    assert val["kl_tuned"].mean() < 0.5 * val["kl_logit"].mean()
    # The last layer is the model itself: its translator is never trained and its KL stays 0.
    assert float(val["kl_tuned"][-1]) == 0.0
    assert not module.translators.weight[-1].any() and not module.translators.bias[-1].any()
    assert module.translators.weight[0].abs().max() > 0

    # Logged numbers: per layer and means, equal to an independent float64 recomputation on the val split.
    metrics = trainer.callback_metrics
    assert {f"val/{m}/L{i:02d}" for m in ("kl_tuned", "kl_logit") for i in range(32)} <= set(metrics)
    x = _split_x(lens_data, "val")
    A, b = module.translators.weight.detach().double(), module.translators.bias.detach().double()
    # The reference reads the module's own float32 translated residuals, after checking them against the closed
    # form h + A h + b in float64 within the float32 bound of a (d + 2)-term sum; the KL bounds then cover the
    # float32 readout and KL.
    with torch.no_grad():
        translated = module.translators(x).double()  # [n, n_layers, d_model]
    h = x.double()
    exact = h + torch.einsum("nld,led->nle", h, A) + b
    magnitude = h.abs() + torch.einsum("nld,led->nle", h.abs(), A.abs()) + b.abs()
    assert bool(((translated - exact).abs() <= gamma(x.shape[-1] + 2) * magnitude).all())
    ref_tuned, bound_tuned = _reference_kl(model, x, translate=lambda i, h: translated[:, i])
    ref_logit, bound_logit = _reference_kl(model, x)
    ref_tuned, bound_tuned, ref_logit, bound_logit = (t.mean(0) for t in (ref_tuned, bound_tuned, ref_logit, bound_logit))
    _assert_within(val["kl_tuned"], ref_tuned, bound_tuned)
    _assert_within(val["kl_logit"], ref_logit, bound_logit)
    # The means are over the lensed layers: the last layer is the model itself (KL 0 by construction).
    lensed = slice(0, N_BACKBONE_LAYERS - 1)
    for name, ref, bound in (("kl_tuned", ref_tuned, bound_tuned), ("kl_logit", ref_logit, bound_logit)):
        logged = float(metrics[f"val/{name}_mean"])
        assert abs(logged - float(ref[lensed].mean())) <= float(bound[lensed].mean()) + 1e-6 * abs(logged)
    assert float(metrics["val/kl_logit/L05"]) == pytest.approx(float(ref_logit[5]), abs=float(bound_logit[5]))
    assert TunedLensModule.checkpoint_monitor == ("val/kl_tuned_mean", "min")


def test_checkpoint_holds_only_translators_and_reloads(trained, lens_data):
    module, _, path = trained
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert keys == {"translators.weight", "translators.bias"}
    assert not any(word in key for key in keys for word in ("lm_head", "norm", "embed", "layers."))
    assert checkpoint["tuned_lens_layout"]["layers"] == list(range(N_BACKBONE_LAYERS))

    # No backbone given: the reloaded module loads its readout from the spec stored in the checkpoint.
    reloaded = TunedLensModule.load_from_checkpoint(path, map_location="cpu")
    assert reloaded.hparams.lr == 1e-2
    x = _split_x(lens_data, "test")
    with torch.no_grad():
        assert torch.equal(reloaded(x), module(x))
        assert torch.equal(reloaded.lens.kl_per_layer(x), module.lens.kl_per_layer(x))


@pytest.mark.slow
def test_train_and_resume_through_train_py(tmp_path, monkeypatch, shared_cache_dir):
    monkeypatch.chdir(tmp_path)
    config = tiny_config("tuned_lens_tiny.yaml", tmp_path, limit=3, cache_dir=str(shared_cache_dir))
    args = ["--config", str(config), "--run_name", "run"]
    train.main([*args, "--trainer.max_epochs", "1"])
    train.main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    ckpt_dir = tmp_path / "checkpoints" / "run"
    checkpoint = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert set(checkpoint["state_dict"]) == {"translators.weight", "translators.bias"}
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 2  # one training batch per epoch
    monitors = [v["monitor"] for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert "val/kl_tuned_mean" in monitors and (ckpt_dir / "best.ckpt").is_file()
    assert list((tmp_path / "logs" / "run").glob("events.out.tfevents.*"))


def test_config_without_the_last_layer_fails_before_any_model_loads(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(interp.backbone, "load_backbone", no_loading)
    config = tiny_config("tuned_lens_tiny.yaml", tmp_path, limit=2, layers=[0, 3])
    with pytest.raises(UserError, match="last layer"):
        train.main(["--config", str(config), "--trainer.fast_dev_run", "true", "--run_name", "dev"])


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, shared_cache_dir):
    """train.py 1 epoch, then evaluate.py on last.ckpt: (checkpoint, logs/run with tuned_lens_results.json)."""
    import evaluate

    tmp_path = tmp_path_factory.mktemp("evaluated_lens")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        config = tiny_config("tuned_lens_tiny.yaml", tmp_path, limit=3, cache_dir=str(shared_cache_dir))
        train.main(["--config", str(config), "--run_name", "run", "--trainer.max_epochs", "1"])
        ckpt = tmp_path / "checkpoints" / "run" / "last.ckpt"
        evaluate.main(["--ckpt", str(ckpt)])
    return ckpt, tmp_path / "logs" / "run"


@pytest.mark.slow
def test_evaluate_a_tuned_lens_checkpoint(evaluated_run, tiny):
    """tuned_lens_results.json equals a float64 recomputation on the test rows."""
    import json

    from tolerances import U32

    from cli import datamodule_from_run_config

    model, _ = tiny
    ckpt, out = evaluated_run
    report = json.loads((out / "tuned_lens_results.json").read_text())
    assert (out / "visualizations" / "tuned_lens_kl.png").is_file()

    # The independent computation: the run's own test rows, rebuilt from the config in the checkpoint.
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    dm = datamodule_from_run_config(checkpoint["run_config"])
    dm.setup()
    x = _split_x(dm, "test")  # [n_test, n_layers, d_model]
    module = TunedLensModule.load_from_checkpoint(ckpt, map_location="cpu")
    A, b = module.translators.weight.detach().double(), module.translators.bias.detach().double()
    assert A[0].abs().max() > 0  # trained: the tuned lens is not the logit lens
    with torch.no_grad():
        translated = module.translators(x).double()  # [n_test, n_layers, d_model]
    h = x.double()
    exact = h + torch.einsum("nld,led->nle", h, A) + b
    magnitude = h.abs() + torch.einsum("nld,led->nle", h.abs(), A.abs()) + b.abs()
    assert bool(((translated - exact).abs() <= gamma(x.shape[-1] + 2) * magnitude).all())
    ref_tuned, bound_tuned = (t.mean(0) for t in _reference_kl(model, x, translate=lambda i, h: translated[:, i]))
    ref_logit, bound_logit = (t.mean(0) for t in _reference_kl(model, x))

    assert report["split"] == "test" and report["n_test"] == len(x) == len(dm.row_index["test"])
    assert report["checkpoint"] == str(ckpt) and report["backbone"] == "tiny"
    assert [row["layer"] for row in report["layers"]] == list(range(N_BACKBONE_LAYERS))
    assert report["lensed_layers"] == list(range(N_BACKBONE_LAYERS - 1))
    for name, ref, bound in (("kl_tuned", ref_tuned, bound_tuned), ("kl_logit", ref_logit, bound_logit)):
        reported = torch.tensor([row[name] for row in report["layers"]], dtype=torch.float64)
        # + the float32 rounding of the float64 mean over rows (the module's metrics are reported in float32)
        _assert_within(reported, ref, bound + U32 * ref.abs())
        assert reported[-1] == 0.0  # the last layer is the model itself
        lensed = slice(0, N_BACKBONE_LAYERS - 1)
        assert report[f"{name}_mean"] == pytest.approx(float(reported[lensed].mean()), rel=1e-12)
        assert abs(report[f"{name}_mean"] - float(ref[lensed].mean())) <= float((bound + U32 * ref.abs())[lensed].mean())
    # one training step moved the tuned lens away from the logit lens by more than the bounds: a swap would fail
    assert abs(float(ref_tuned[0] - ref_logit[0])) > 4 * float(bound_tuned[0] + bound_logit[0])
    _assert_top_tokens(report["top_tokens"], dm, module, model, x)


def _assert_top_tokens(top: dict, dm, module, model, x: torch.Tensor) -> None:
    """tuned_lens_results.json's top tokens: the first test rows; for each lens and layer, the reported tokens are
    the k most probable under a float64 readout of the same residual (probabilities within the float32 readout
    and softmax error, no other token more probable beyond that error), decoded by the run's tokenizer; at the
    last layer both lenses are the model's own next-token distribution (an HF forward of the prompt)."""
    from tolerances import U32, float32_sum_error

    k, examples = top["k"], top["examples"]
    assert k == 5 and [e["row_index"] for e in examples] == dm.row_index["test"][:4].tolist()
    weight, tokenizer = model.lm_head.weight.double(), dm.prompts.tokenizer
    softmax_error = float32_sum_error(weight.shape[0]) + 4 * U32
    readouts = {"tuned": lambda slot: module.translators.apply_layer(x[:4, slot], slot).detach(),
                "logit": lambda slot: x[:4, slot]}  # fmt: skip
    for name, residual in readouts.items():
        for slot in range(x.shape[1]):
            with torch.no_grad():
                normed, log_p = _readout64(model, residual(slot))  # [4, d_model], [4, vocab]
            logit_error = float32_readout_error(normed, weight)  # [4]
            for i, example in enumerate(examples):
                ids = torch.tensor(example[name]["ids"][slot])
                reported = torch.tensor(example[name]["probs"][slot], dtype=torch.float64)
                p = log_p[i].exp()
                slack = math.expm1(2 * float(logit_error[i]) + softmax_error)
                assert len(set(ids.tolist())) == k and bool((reported[:-1] >= reported[1:]).all())
                assert bool(((reported - p[ids]).abs() <= slack * p[ids]).all())
                others = torch.ones_like(p, dtype=torch.bool)
                others[ids] = False
                assert float(p[others].max()) <= float(p[ids].min()) * (1 + slack) ** 2  # they are the top k
                assert example[name]["tokens"][slot] == [tokenizer.decode([t]) for t in ids.tolist()]
                assert slack < 1e-3
    for example in examples:
        row = dm.prompts.rows[example["row_index"]]
        assert (example["kind"], example["problem_id"]) == (row.kind, row.problem_id)
        assert row.prompt.endswith(example["prompt_tail"]) and example["prompt_tail"]
        assert example["tuned"]["ids"][-1] == example["logit"]["ids"][-1]  # the last translator is the identity
        with torch.no_grad():
            logits = model(**tokenize_prompts(tokenizer, [row.prompt])).logits[0, -1]
        ids = torch.tensor(example["logit"]["ids"][-1])
        others = torch.ones_like(logits, dtype=torch.bool)
        others[ids] = False
        # the lens's last-layer logits are the model's within 1e-4 (test_last_layer_lens_logits_are_the_models_logits)
        assert float(logits[others].max()) <= float(logits[ids].min()) + 2e-4


@pytest.mark.slow
def test_the_report_shows_the_top_tokens_of_the_selected_layer(evaluated_run, browser):
    """report.html in chromium: moving the layer control shows, per example, each lens's top tokens at that layer
    exactly as tuned_lens_results.json holds them, and the model's own output (the last layer)."""
    import json

    from pipeline_utils import open_in_browser
    from selenium.webdriver.common.by import By

    _, out = evaluated_run
    top = json.loads((out / "tuned_lens_results.json").read_text())["top_tokens"]
    open_in_browser(browser, out / "report.html")
    for layer in (0, 17, N_BACKBONE_LAYERS - 1):
        browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                               browser.find_element(By.ID, "layer-slider"), layer)  # fmt: skip
        for lens, json_lens, slot in (("tuned", "tuned", layer), ("logit", "logit", layer),
                                      ("model", "logit", N_BACKBONE_LAYERS - 1)):  # fmt: skip
            for i, example in enumerate(top["examples"]):
                cell = browser.find_element(By.CSS_SELECTOR, f"table.top-tokens td[data-lens='{lens}'][data-example='{i}']")
                shown = [(d.get_attribute("data-token"), int(d.get_attribute("data-id")), float(d.get_attribute("data-prob")))
                         for d in cell.find_elements(By.CSS_SELECTOR, "div[data-token]")]  # fmt: skip
                readout = example[json_lens]
                assert shown == list(zip(readout["tokens"][slot], readout["ids"][slot], readout["probs"][slot]))
    browser.save_screenshot(str(out / "report.png"))


@pytest.mark.parametrize(("positions", "n_positions", "batch_position", "tokens_dropped"),
                         [("last", 1, -1, 0), ("last_4", 4, -1, 0), ("last_4", 4, 0, 3), ("last_4", 4, -3, 2),
                          ("post_instruction", 6, 1, 4)])  # fmt: skip
def test_the_top_tokens_prompt_ends_at_the_token_read(tiny, positions, n_positions, batch_position, tokens_dropped):
    """The lenses read one cached position; the prompt shown beside their top tokens ends with that token."""
    from types import SimpleNamespace

    from interp.positions import PositionSpec
    from lightning_modules.tuned_lens_report import _text_read

    _, tokenizer = tiny
    prompt = "Natalia sold clips to 48 of her friends.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    datamodule = SimpleNamespace(positions=PositionSpec.parse(positions), batch_position=batch_position,
                                 cache=SimpleNamespace(manifest={"n_positions": n_positions}))  # fmt: skip
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert _text_read(datamodule, tokenizer, prompt) == tokenizer.decode(ids[: len(ids) - tokens_dropped])
    assert _text_read(SimpleNamespace(positions=PositionSpec.parse("mean")), tokenizer, prompt) == prompt
