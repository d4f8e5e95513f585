"""Train per-layer probes (or other modules) on activations of a frozen backbone.

    python train.py --config configs/probes_qwq.yaml [--backbone tiny] [--run_name NAME] [--ckpt_path last]

1. extract residual-stream activations into the activation cache (Trainer.predict; reused when complete), for the
   modules that train on cached activations (probes, directions, tuned lens; steering vectors train through the
   backbone instead),
2. fit the module (checkpoints/<run>/, TensorBoard in logs/<run>/).
"""

from cli import ProjectCLI, run_main
from datamodules.activations import CachedActivationDataModule
from lightning_modules.cache_writer import extract_activations


def main(args: list[str] | None = None) -> None:
    cli = ProjectCLI(args=args)
    ckpt_path = cli.checked_ckpt_path()
    if isinstance(cli.datamodule, CachedActivationDataModule):
        extract_activations(cli.trainer, cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    if cli.trainer.is_global_zero:
        print(cli.where_results_are())


if __name__ == "__main__":
    run_main(main)
