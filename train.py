"""Train a study module on a frozen backbone: per-layer probes, reasoning directions, a tuned lens or steering vectors.

    python train.py --config configs/probes_qwq.yaml [--backbone tiny] [--run_name NAME] [--ckpt_path last]

1. extract residual-stream activations into the activation cache (Trainer.predict; reused when complete), for the
   modules that train on cached activations (probes, directions, tuned lens; steering vectors train through the
   backbone instead),
2. fit the module (checkpoints/<run>/, TensorBoard in logs/<run>/),
3. print where the results are and the evaluate.py command that reads them.
"""

import sys

# The study modules a config's model.class_path can name (tests/test_configs.py keeps this list true).
STUDY_MODULES = {
    "probes": ("lightning_modules.probes.LayerProbeModule", "a linear probe per layer (+ control task)"),
    "directions": ("lightning_modules.directions.ReasoningDirectionModule",
                   "a reasoning direction per layer, selected by ablation on held-out prompts"),
    "tuned_lens": ("lightning_modules.tuned_lens.TunedLensModule", "an affine translator per layer to the logits"),
    "steering": ("lightning_modules.steering.SteeringVectorModule",
                 "learnable steering vectors, backbone frozen"),
    "lora": ("lightning_modules.steering_lora.LoraSteeringModule", "the LoRA baseline for steering"),
}

HELP = """usage: python train.py --config CONFIG [--backbone NAME] [--run_name NAME] [--ckpt_path last]
                       [--overwrite true] [--section.option VALUE ...]

{doc}
Study modules (a config's model.class_path; e.g. --model LayerProbeModule):
{modules}

Common options:
  --config FILE           configs/*.yaml (probes_*, directions_*, tuned_lens_*, steering_*; quickstart, *_tiny and
                          *_toy run on a laptop CPU)
  --backbone NAME         tiny | tiny-qwq | tiny-r1-distill | toy-qwq | toy-r1-distill | a hub id | a local directory |
                          shape:qwq-32b (random weights, real shape)
  --run_name NAME         output folder under checkpoints/ and logs/ (default: the config's file name)
  --ckpt_path last|FILE   resume a run; without it, a run name that has checkpoints is refused
  --overwrite true        replace that run instead
  --trainer.X / --model.init_args.X / --data.init_args.X   any option of the config

Every option of a config, with its values: python train.py --config FILE --help (loads Lightning: several seconds).
Then: python evaluate.py --ckpt checkpoints/<run>/best.ckpt; tensorboard --logdir logs. See README.md.
"""


def main(args: list[str] | None = None) -> None:
    from cli import ProjectCLI
    from datamodules.activations import CachedActivationDataModule
    from lightning_modules.cache_writer import extract_activations

    cli = ProjectCLI(args=args)
    ckpt_path = cli.checked_ckpt_path()
    if isinstance(cli.datamodule, CachedActivationDataModule):
        extract_activations(cli.trainer, cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    if cli.trainer.is_global_zero:
        print(cli.where_results_are())


def config_files_error(argv: list[str]) -> str | None:
    """The first-contact mistakes found before Lightning is imported (seconds earlier): a --config file that does not
    exist or is not YAML. Everything else is checked by the CLI, still before any model loads."""
    import yaml

    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for path in paths:
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except OSError as error:
            return f"--config {path}: {error.strerror}"
        except yaml.YAMLError as error:
            return f"--config {path} is not valid YAML: {str(error).splitlines()[0]}"
    return None


def short_help() -> str:
    """This tool's help, printed without importing Lightning (`--help` alone answers at once)."""
    modules = "\n".join(f"  {name:<12} {path.rpartition('.')[2]:<26} {what}"
                        for name, (path, what) in STUDY_MODULES.items())  # fmt: skip
    return HELP.format(doc=__doc__.split("\n\n", 1)[1], modules=modules)


if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(short_help())
        sys.exit(0)
    if (message := config_files_error(sys.argv[1:])) is not None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    from cli import run_main

    run_main(main)
