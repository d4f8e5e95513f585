"""What the study modules over cached layers (probes, tuned lens, directions) share.

Their parameters cannot be made in `__init__`: the shapes come from the data (the cached layers, d_model, the
classes or positions). Each module describes them in a layout dict (`layout()`, with at least "layers") and
builds them from one (`_build(layout)`):
    fitting   `setup` builds from the datamodule's layout, or checks that an already built module matches it;
    loading   `on_load_checkpoint` builds from the layout the checkpoint stores under `layout_key`, so
              `load_from_checkpoint` needs no datamodule.
Checkpoints hold only what was trained: `on_save_checkpoint` asserts that every state-dict key starts with one of
`trained_keys` (the frozen backbone is never a submodule, see `frozen_backbone.py`; `strict_loading = False`).
Metrics per cached layer are logged as {split}/{name}/L{layer:02d} (`log_per_layer`), layer = the backbone's.
"""

from __future__ import annotations

import lightning as L
import torch

from interp.errors import UserError


class LayerStudyModule(L.LightningModule):
    layout_key: str  # the checkpoint entry holding `layout()`, e.g. "probe_layout"
    trained_keys: tuple[str, ...]  # prefixes of the state-dict keys a checkpoint may hold

    def __init__(self):
        super().__init__()
        self.strict_loading = False
        self.layers: list[int] = []  # the backbone layer of each cached layer (the layer axis); set by _build

    def layout(self) -> dict:
        raise NotImplementedError

    def _build(self, layout: dict) -> None:
        raise NotImplementedError

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Raise UserError when `datamodule` cannot feed this module. The CLI calls it as soon as the config is
        instantiated, before any model loads; modules call it again in `setup`."""

    def build_or_check(self, layout: dict, source: str) -> None:
        """Build from `layout` unless built; else the layout's layers must be this module's (`source` names it)."""
        if not self.layers:
            self._build(layout)
        elif list(layout["layers"]) != self.layers:
            raise UserError(f"{source} {list(layout['layers'])} differ from the module's layers {self.layers}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[self.layout_key] = self.layout()
        leaked = [key for key in checkpoint["state_dict"] if not key.startswith(self.trained_keys)]
        assert not leaked, f"untrained (backbone?) keys leaked into the checkpoint: {leaked}"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.build_or_check(checkpoint[self.layout_key], "the checkpoint's layers")

    def log_per_layer(self, split: str, values: dict[str, torch.Tensor]) -> None:
        """Log {split}/{name}/L{layer:02d} for every name -> [n_layers] value and every cached layer."""
        for name, per_layer in values.items():
            for layer, value in zip(self.layers, per_layer):
                self.log(f"{split}/{name}/L{layer:02d}", value, sync_dist=True)
