"""Every shipped config, as written: parsed and instantiated through the CLI train.py uses, checked field by field;
the real 32B backbones built on the meta device from their real configs; one fast_dev_run per module class.

No hub and no weights: the two hub ids' config.json files ship in interp/assets/ (see its README), and
`BackboneSpec` reads its depth and width from them instead of from the hub (the only substitution made).
"""

from __future__ import annotations

from operator import attrgetter

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from pipeline_utils import REPO, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

import interp.backbone
import train
from callbacks.probe_figures import ProbeAccuracyFigure
from cli import ProjectCLI, RunConfigInCheckpoint
from interp.backbone import ASSETS, BUILTIN_BACKBONES, decoder_layers
from lightning_modules.cache_writer import fast_dev_rows

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
# hub id -> the directory under interp/assets holding that model's real config.json
HUB_CONFIGS = {"Qwen/QwQ-32B": "qwq-32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": "r1-distill-qwen-32b"}
QWQ_32B_PARAMETERS = 32_763_876_352  # Qwen/QwQ-32B, embeddings and the untied lm_head included

PROBES, DIRECTIONS, LENS, STEERING, LORA = (
    "lightning_modules.probes.LayerProbeModule",
    "lightning_modules.directions.ReasoningDirectionModule",
    "lightning_modules.tuned_lens.TunedLensModule",
    "lightning_modules.steering.SteeringVectorModule",
    "lightning_modules.steering_lora.LoraSteeringModule",
)
MONITORS = {PROBES: ("val/acc_max_over_layers", "max"), DIRECTIONS: ("val/selected_ablation_score", "max"),
            LENS: ("val/kl_tuned_mean", "min"), STEERING: ("val/nll", "min"), LORA: ("val/nll", "min")}  # what best.ckpt is chosen by
HUB_SOURCES = [("gsm8k", "openai/gsm8k", "main", 500), ("math", "HuggingFaceH4/MATH-500", None, 500)]
EMBEDDED_100 = [("gsm8k", "embedded", None, 100), ("math", "embedded", None, 100)]
EVEN_LAYERS = list(range(0, 64, 2))
TOY_200 = [("toy_arithmetic", "embedded", None, 200)]
_TOY = {"datamodule.backbone.name_or_path": "toy-qwq", "datamodule.prompts.backbone": "toy-qwq", "datamodule.d_model": 128}


def _real(name: str, layers: list[int], **more) -> dict:
    """Fields shared by the configs of a real 32B backbone in bf16, sharded by accelerate."""
    return {"datamodule.backbone.name_or_path": name, "datamodule.backbone.dtype": "bfloat16",
            "datamodule.backbone.device_map": "auto", "datamodule.backbone.attn_implementation": "sdpa",
            "datamodule.prompts.backbone": name, "datamodule.prompts.max_prompt_tokens": 1024,
            "datamodule.d_model": 5120, "datamodule.layers": layers, "trainer.accelerator_name": "auto",
            "sources": HUB_SOURCES, **more}  # fmt: skip


def _tiny(layers: list[int], **more) -> dict:
    return {"datamodule.backbone.name_or_path": "tiny", "datamodule.backbone.dtype": "float32",
            "datamodule.backbone.device_map": None, "datamodule.prompts.backbone": "tiny",
            "datamodule.d_model": 64,
            "datamodule.layers": layers, "trainer.accelerator_name": "cpu", **more}  # fmt: skip


_PROBE_FIELDS = {"model.hparams.lr": 0.01, "model.hparams.weight_decay": 0.001, "datamodule.label": "reasoning",
                 "datamodule.positions.kind": "last", "datamodule.batch_position": -1}  # fmt: skip
# What each shipped config must instantiate to: dotted attribute of the ProjectCLI -> value.
EXPECTED: dict[str, dict] = {
    "quickstart.yaml": {"class_path": PROBES, **_PROBE_FIELDS, **_tiny(list(range(32)), sources=EMBEDDED_100),
                        "trainer.max_epochs": 40, "datamodule.batch_size": 64},
    "probes_toy.yaml": {"class_path": PROBES, **_PROBE_FIELDS, **_tiny(list(range(3)), sources=TOY_200), **_TOY,
                        "trainer.max_epochs": 20, "datamodule.batch_size": 64},
    "probes_qwq.yaml": {"class_path": PROBES, **_PROBE_FIELDS, **_real("Qwen/QwQ-32B", list(range(64))),
                        "trainer.max_epochs": 50, "datamodule.batch_size": 64},
    "probes_r1distill.yaml": {"class_path": PROBES, **_PROBE_FIELDS, "trainer.max_epochs": 50,
                              **_real("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", list(range(64)))},
    "layer_specific.yaml": {"class_path": PROBES, **_PROBE_FIELDS, **_real("Qwen/QwQ-32B", list(range(15, 26))),
                            "trainer.max_epochs": 50},
    "directions_qwq.yaml": {
        "class_path": DIRECTIONS, **_real("Qwen/QwQ-32B", EVEN_LAYERS), "model.hparams.n_selection_prompts": 32,
        "model.hparams.n_report_prompts": 32, "model.hparams.null_kind": "placebo", "model.hparams.n_random": 19,
        "model.hparams.selection_metric": "first_tokens", "model.hparams.candidate_layers": None,
        "datamodule.positions.kind": "post_instruction", "datamodule.batch_position": None, "trainer.max_epochs": 1,
    },
    "directions_tiny.yaml": {
        "class_path": DIRECTIONS, **_tiny(list(range(32)), sources=[("gsm8k", "embedded", None, 20),
                                                                    ("math", "embedded", None, 20)]),
        "model.hparams.n_selection_prompts": 4, "model.hparams.n_report_prompts": 4, "model.hparams.n_random": 4,
        "model.hparams.null_kind": "placebo", "datamodule.positions.kind": "post_instruction",
        "datamodule.batch_position": None, "trainer.max_epochs": 1,
    },
    "directions_toy.yaml": {
        "class_path": DIRECTIONS, **_tiny(list(range(3)), sources=TOY_200), **_TOY,
        "model.hparams.n_selection_prompts": 8, "model.hparams.n_report_prompts": 8, "model.hparams.n_random": 8,
        "model.hparams.null_kind": "placebo", "datamodule.positions.kind": "post_instruction",
        "datamodule.batch_position": None, "trainer.max_epochs": 1,
    },
    "tuned_lens_toy.yaml": {"class_path": LENS, **_tiny(list(range(3)), sources=TOY_200), **_TOY,
                            "model.hparams.lr": 0.001, "model.hparams.rank": None, "datamodule.batch_size": 16,
                            "trainer.max_epochs": 30},
    "tuned_lens_qwq.yaml": {"class_path": LENS, **_real("Qwen/QwQ-32B", list(range(64))), "model.hparams.lr": 0.001,
                            "model.hparams.rank": 32, "datamodule.batch_size": 16, "trainer.max_epochs": 20},
    "steering_tiny.yaml": {"class_path": STEERING, "sources": [("gsm8k", "embedded", None, 20), ("math", "embedded", None, 20)],
                           "datamodule.backbone.name_or_path": "tiny", "datamodule.prompts.backbone": "tiny",
                           "datamodule.d_model": 64, "trainer.accelerator_name": "cpu", "model.hparams.layers": [8, 16],
                           "model.hparams.apply_to": "all", "model.hparams.init": "zeros", "datamodule.batch_size": 4,
                           "datamodule.max_completion_tokens": 64, "trainer.max_epochs": 3},
    "steering_lora_tiny.yaml": {"class_path": LORA, "sources": [("gsm8k", "embedded", None, 20), ("math", "embedded", None, 20)],
                                "datamodule.backbone.name_or_path": "tiny", "datamodule.prompts.backbone": "tiny",
                                "datamodule.d_model": 64, "trainer.accelerator_name": "cpu", "model.hparams.layers": [8, 16],
                                "model.hparams.rank": 4, "model.hparams.alpha": 8.0, "datamodule.batch_size": 4,
                                "trainer.max_epochs": 3},
    "steering_toy.yaml": {"class_path": STEERING, "sources": TOY_200, "datamodule.backbone.name_or_path": "toy-qwq",
                          "datamodule.prompts.backbone": "toy-qwq", "datamodule.d_model": 128,
                          "trainer.accelerator_name": "cpu", "model.hparams.layers": [1, 2], "datamodule.batch_size": 8,
                          "datamodule.max_completion_tokens": 128, "trainer.max_epochs": 10},
    "steering_qwq.yaml": {"class_path": STEERING, "sources": HUB_SOURCES, "datamodule.backbone.name_or_path": "Qwen/QwQ-32B",
                          "datamodule.backbone.dtype": "bfloat16", "datamodule.backbone.device_map": "auto",
                          "datamodule.prompts.backbone": "Qwen/QwQ-32B", "datamodule.prompts.max_prompt_tokens": 1024,
                          "datamodule.d_model": 5120, "trainer.accelerator_name": "auto",
                          "model.hparams.layers": [24, 32, 40], "model.hparams.gradient_checkpointing": True,
                          "datamodule.batch_size": 2, "datamodule.max_completion_tokens": 256, "trainer.max_epochs": 3},
    "tuned_lens_tiny.yaml": {"class_path": LENS, **_tiny(list(range(32)), sources=EMBEDDED_100),
                             "model.hparams.lr": 0.001, "model.hparams.weight_decay": 0.0,
                             "model.hparams.rank": None,
                             "datamodule.batch_size": 16, "trainer.max_epochs": 5},
}  # fmt: skip


@pytest.fixture
def hub_configs_from_assets(monkeypatch) -> list[str]:
    """`load_config` of the two hub ids reads their shipped config.json; any other hub access fails. Returns the
    names it was asked for."""
    real_load_config, asked = interp.backbone.load_config, []

    def load_config(name_or_path, revision=None, trust_remote_code=False):
        asked.append(name_or_path)
        if name_or_path in HUB_CONFIGS:
            return real_load_config(str(ASSETS / HUB_CONFIGS[name_or_path]))
        assert name_or_path in BUILTIN_BACKBONES, f"a config asked the hub for {name_or_path!r}"
        return real_load_config(name_or_path)

    monkeypatch.setattr(interp.backbone, "load_config", load_config)
    return asked


def _raw(config_name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / config_name).read_text())


def test_every_config_is_checked():
    assert set(EXPECTED) == set(CONFIGS)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_config_instantiates_as_written(config_name, tmp_path, monkeypatch, hub_configs_from_assets):
    """Datamodule, model and trainer (callbacks, logger) built from the file's own values; nothing runs."""
    monkeypatch.chdir(tmp_path)
    cli = ProjectCLI(args=["--config", str(REPO / "configs" / config_name)])
    expected, run = dict(EXPECTED[config_name]), config_name.removesuffix(".yaml")

    class_path = expected.pop("class_path")
    assert f"{type(cli.model).__module__}.{type(cli.model).__name__}" == class_path
    sources = expected.pop("sources")
    got = [(s.name, s.path, s.subset, s.limit) for s in cli.datamodule.prompts.sources]
    assert got == sources and all(s.split == "test" for s in cli.datamodule.prompts.sources)
    accelerator = expected.pop("trainer.accelerator_name")
    assert cli.config.trainer.accelerator == accelerator and cli.config.trainer.devices == 1
    for attribute, value in expected.items():
        assert attrgetter(attribute)(cli) == value, attribute
    backbone = _raw(config_name)["data"]["init_args"]["backbone"]["name_or_path"]
    # depth and width came from this model's own config (built-ins: from their recipe, no config read)
    assert set(hub_configs_from_assets) == ({backbone} if backbone in HUB_CONFIGS else set())

    # The trainer callbacks train.py uses, for this run name and this module's monitored metric.
    assert cli.run_name == run
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert sorted(c.filename for c in checkpoints) == ["best", "last"]
    assert all(c.dirpath.endswith(f"checkpoints/{run}") for c in checkpoints)
    best = next(c for c in checkpoints if c.filename == "best")
    assert (best.monitor, best.mode) == MONITORS[class_path]
    assert any(isinstance(c, ProbeAccuracyFigure) for c in cli.trainer.callbacks)
    (stored,) = [c for c in cli.trainer.callbacks if isinstance(c, RunConfigInCheckpoint)]
    assert yaml.safe_load(stored.config_yaml)["data"]["init_args"]["backbone"]["name_or_path"] == backbone
    assert isinstance(cli.trainer.logger, TensorBoardLogger) and cli.trainer.logger.name == run


# ---- the real 32B backbones on the meta device ------------------------------------------------------------------
_META_MODELS: dict[str, torch.nn.Module] = {}


def _meta_model(hub_id: str) -> torch.nn.Module:
    """The real architecture from the shipped config.json, on the meta device (no weights, no memory)."""
    if hub_id not in _META_MODELS:
        config = AutoConfig.from_pretrained(ASSETS / HUB_CONFIGS[hub_id])
        with torch.device("meta"):
            _META_MODELS[hub_id] = AutoModelForCausalLM.from_config(config)
    return _META_MODELS[hub_id]


def _qwen2_parameters(c) -> int:
    """Closed form for Qwen2ForCausalLM (untied embeddings; q/k/v have biases, o_proj and the MLP none)."""
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    attention = (c.hidden_size + 1) * (c.hidden_size + 2 * kv) + c.hidden_size * c.hidden_size
    layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size  # + two RMSNorms
    return 2 * c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size


REAL_CONFIGS = [c for c in CONFIGS if _raw(c)["data"]["init_args"]["backbone"]["name_or_path"] in HUB_CONFIGS]


def test_the_real_configs_are_the_32b_ones():
    assert set(REAL_CONFIGS) == {c for c, fields in EXPECTED.items() if fields["datamodule.d_model"] == 5120}
    assert len(REAL_CONFIGS) == 6


@pytest.mark.parametrize("config_name", REAL_CONFIGS)
def test_real_backbone_on_meta_device_fits_the_config(config_name):
    data = _raw(config_name)["data"]["init_args"]
    hub_id = data["backbone"]["name_or_path"]
    model = _meta_model(hub_id)
    config = model.config
    assert all(p.is_meta for p in model.parameters())
    assert len(decoder_layers(model)) == config.num_hidden_layers == 64
    assert model.get_input_embeddings().weight.shape == (config.vocab_size, config.hidden_size) == (152064, 5120)
    layers = data["layers"] if "layers" in data else _raw(config_name)["model"]["init_args"]["layers"]
    layers = layers if layers is not None else range(config.num_hidden_layers)
    assert all(0 <= layer < config.num_hidden_layers for layer in layers)
    n_parameters = sum(p.numel() for p in model.parameters())
    assert n_parameters == _qwen2_parameters(config)
    if hub_id == "Qwen/QwQ-32B":
        assert n_parameters == QWQ_32B_PARAMETERS


def test_closed_form_parameter_count_matches_a_built_model():
    """The closed form above, checked on a small Qwen2 built for real (so it is not fitted to the 32B number)."""
    config = AutoConfig.from_pretrained(ASSETS / "qwq-32b")
    for key, value in dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000).items():  # fmt: skip
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == _qwen2_parameters(config)


# ---- one fast_dev_run per module class (tiny backbone, a few embedded problems) -------------------------------
# module class -> (tiny config that uses it, problems per source, data overrides)
FAST_DEV_RUNS = {
    PROBES: ("quickstart.yaml", 4, {}),
    DIRECTIONS: ("directions_tiny.yaml", 5, {"layers": [0, 2, 4, 30]}),  # 2 val problems: 1 chooses, 1 reports
    LENS: ("tuned_lens_tiny.yaml", 2, {}),
    STEERING: ("steering_tiny.yaml", 5, {}),
    LORA: ("steering_lora_tiny.yaml", 5, {}),
}


def test_every_module_class_has_a_fast_dev_run():
    assert {fields["class_path"] for fields in EXPECTED.values()} == set(FAST_DEV_RUNS)
    assert all(EXPECTED[name]["class_path"] == cls for cls, (name, _, _) in FAST_DEV_RUNS.items())


@pytest.mark.parametrize("class_path", sorted(FAST_DEV_RUNS))
def test_fast_dev_run_per_module_class(class_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_name, limit, overrides = FAST_DEV_RUNS[class_path]
    runs = []

    class RecordingCLI(ProjectCLI):
        def __init__(self, args=None):
            super().__init__(args=args)
            runs.append(self)

    monkeypatch.setattr("cli.ProjectCLI", RecordingCLI)  # train.main imports it from cli when called
    train.main(["--config", str(tiny_config(config_name, tmp_path, limit=limit, **overrides)),
                "--trainer.fast_dev_run", "true", "--run_name", "dev"])  # fmt: skip
    (cli,) = runs
    assert f"{type(cli.model).__module__}.{type(cli.model).__name__}" == class_path
    assert cli.trainer.state.finished and cli.trainer.state.fn == "fit"
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 1  # fast_dev_run: one train batch
    if class_path in (STEERING, LORA):  # train through the backbone: no activation cache
        assert not (tmp_path / "cache").exists()
        return
    (manifest,) = (tmp_path / "cache").glob("*/manifest.json")
    cache, rows = cli.datamodule.cache, cli.datamodule.prompts.rows  # fast_dev_run: a few problems per split
    assert manifest.parent == cache.directory and cache.finished_rows() == fast_dev_rows(rows)
    assert cache.complete == (len(fast_dev_rows(rows)) == len(rows))  # complete only if that is every row
    assert cli.datamodule.cache.manifest["layers"] == cli.datamodule.layers
    assert cli.datamodule.cache.manifest["positions"] == _raw(config_name)["data"]["init_args"]["positions"]


def test_the_short_help_lists_every_study_module_and_loads_no_lightning():
    """`train.py --help` is printed before Lightning is imported; its module list is exactly the classes the
    configs use plus the LoRA baseline, each an evaluable study module."""
    import subprocess
    import sys

    from lightning_modules.protocol import study_module_class

    used = {_raw(name)["model"]["class_path"] for name in CONFIGS}
    listed = {path for path, _ in train.STUDY_MODULES.values()}
    assert used <= listed and all(study_module_class(path) for path in listed)
    probe = "import sys, runpy; sys.argv = ['train.py', '--help']\ntry:\n    runpy.run_path('train.py', run_name='__main__')\n" \
            "except SystemExit:\n    pass\nprint('LIGHTNING', 'lightning' in sys.modules)"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "LayerProbeModule" in result.stdout and "LIGHTNING False" in result.stdout, result.stderr
