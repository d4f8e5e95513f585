"""The tuned lens (Belrose et al. 2023) for every cached layer at once, trained on the activation cache.

Each cached layer l gets an affine translator  h -> h + (A_l h + b_l)  with A_l = 0 and b_l = 0 at
initialisation, so the untrained tuned lens IS the logit lens. The translated residual is read through the
frozen backbone's own final norm and unembedding (`interp.lens.LogitLens`). Training minimises, per layer,
    KL(p_final || q_l),   p_final = softmax(unembed(norm(resid_post of the LAST layer)))  (the model's own
                          next-token distribution at the cached position),  q_l = the tuned lens at layer l,
so the datamodule must cache the last layer. There the lens IS the model (KL 0), so the last layer's
translator is left out of the loss and stays the identity (with AdamW even float32 rounding noise in a
zero gradient would otherwise move it). Log-softmaxes are float32 and the KL sum over the vocabulary is
float32 (a float64 [batch, vocab] block would double the largest tensors); epoch means are accumulated in
float64. At the last layer p_final and the logit lens are the same computation, so its logit-lens KL is 0.

Frozen parts: only the final norm and the LM head of the backbone are kept (loaded in `setup` from the
datamodule's BackboneSpec, or lazily from the spec stored in the checkpoint). They are plain attributes, not
submodules: checkpoints hold only the translators (`strict_loading = False`).

Memory (real backbones, d_model = 5120, 64 layers, vocab 152064):
- a full translator is d^2 + d = 26.2M parameters (105 MB float32); 64 of them are 1.68B parameters, about
  27 GB with gradients and AdamW state. `rank=r` uses A_l = U_l V_l^T instead (2 d r + d parameters per
  layer: 0.66M at r = 64); U starts at zero and V random, so the lens still starts as the logit lens.
- the readout makes [batch, k, vocab] float32 blocks, k layers at a time with at most READOUT_BLOCK_ELEMENTS
  (128 MB) logits per block (one pass over the LM head weight serves k layers). In training each block is
  recomputed in the backward pass (activation checkpointing), so only one block is alive at a time instead
  of batch x n_layers x vocab logits and their softmaxes.
- `setup` loads the whole backbone through `BackboneSpec.load()` once and then frees all but the two
  modules: the host must hold the backbone once (about 64 GB in bfloat16 for a 32B model).

Metric keys: {split}/kl_tuned/L{layer:02d}, {split}/kl_logit/L{layer:02d} (the logit lens, untrained) and
{split}/kl_tuned_mean, {split}/kl_logit_mean (means over the lensed layers, i.e. every cached layer but the last,
whose KL is 0 by construction); ModelCheckpoint monitors val/kl_tuned_mean.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchmetrics import Metric

from interp.backbone import BackboneSpec
from interp.errors import UserError
from interp.lens import LogitLens

# At most this many logits (batch x layers-per-block x vocab) per readout block: 128 MB in float32.
READOUT_BLOCK_ELEMENTS = 1 << 25


class AffineTranslators(nn.Module):
    """x [batch, n_layers, d_model] -> x + (A_l x_l + b_l) per layer l, the identity at initialisation.

    Full rank: weight [n_layers, d_model(out), d_model(in)]. Low rank (`rank=r`): A_l = up_l @ down_l^T with
    up [n_layers, d_model, r] (zeros) and down [n_layers, d_model, r] (random, scale 1/sqrt(d_model)).
    """

    def __init__(self, n_layers: int, d_model: int, rank: int | None = None):
        super().__init__()
        self.rank = rank
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        else:
            self.up = nn.Parameter(torch.zeros(n_layers, d_model, rank))
            self.down = nn.Parameter(torch.randn(n_layers, d_model, rank) / math.sqrt(d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))

    def matrices(self) -> torch.Tensor:
        """A_l as dense matrices [n_layers, d_model(out), d_model(in)] (for inspection; d^2 per layer)."""
        if self.rank is None:
            return self.weight
        return torch.einsum("ler,ldr->led", self.up, self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            delta = torch.einsum("bld,led->ble", x, self.weight)  # [batch, n_layers, d_model]
        else:
            low = torch.einsum("bld,ldr->blr", x, self.down)  # [batch, n_layers, rank]
            delta = torch.einsum("blr,ler->ble", low, self.up)
        return x + (delta + self.bias)


class LayerMean(Metric):
    """Mean over samples of a per-layer value: update([batch, n_layers]); compute() -> [n_layers], float64."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.add_state("total", default=torch.zeros(n_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total = self.total + values.detach().to(torch.float64).sum(0)
        self.count = self.count + values.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class TunedLensModule(L.LightningModule):
    checkpoint_monitor = ("val/kl_tuned_mean", "min")

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, rank: int | None = None):
        """
        Args:
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay; it pulls the translators towards the identity (the logit lens).
            rank: None = full-rank translators (d_model^2 parameters per layer); r: A_l = U_l V_l^T, rank r.
        """
        super().__init__()
        if rank is not None and rank < 1:
            raise UserError(f"model.rank must be a positive integer or null, got {rank}")
        self.save_hyperparameters()
        self.strict_loading = False
        self.translators: AffineTranslators | None = None
        self.layers: list[int] = []
        self.final_slot: int = -1  # index of the backbone's last layer in `layers`
        self.trained_slots: list[int] = []  # all other slots (the last layer's translator stays the identity)
        self.backbone_spec: BackboneSpec | None = None
        self._lens: LogitLens | None = None  # frozen final norm + unembedding, NOT a submodule
        self._move_lens = True  # False for a sharded backbone (device_map): LogitLens places inputs itself
        self.last_metrics: dict[str, dict[str, torch.Tensor]] = {}  # split -> name -> [n_layers] (callbacks)

    # ---- building (from the datamodule when fitting, from the checkpoint when loading) ---------------------
    def _build(self, layers: Sequence[int], d_model: int, n_backbone_layers: int) -> None:
        self.layers = list(layers)
        if n_backbone_layers - 1 not in self.layers:
            raise UserError(
                f"the tuned lens needs the last layer ({n_backbone_layers - 1}) in data.layers: its "
                f"resid_post gives the model's own logits (the training target); got layers {self.layers}"
            )
        if len(self.layers) < 2:
            raise UserError(f"the tuned lens needs a layer besides the last in data.layers: {self.layers}")
        self.final_slot = self.layers.index(n_backbone_layers - 1)
        self.trained_slots = [slot for slot in range(len(self.layers)) if slot != self.final_slot]
        self.translators = AffineTranslators(len(self.layers), d_model, self.hparams.rank)
        self.metrics = nn.ModuleDict({
            split: nn.ModuleDict({name: LayerMean(len(self.layers)) for name in ("kl_tuned", "kl_logit")})
            for split in ("val", "test")
        })  # fmt: skip
        self.to(self.device)

    def attach_backbone(self, backbone: BackboneSpec | nn.Module) -> None:
        """Keep the final norm and LM head of `backbone` (a spec, loaded here, or a loaded causal LM)."""
        if isinstance(backbone, BackboneSpec):
            self.backbone_spec = backbone
            model, _ = backbone.load()
            self._move_lens = backbone.device_map is None
        else:
            model = backbone
            self._move_lens = not getattr(model, "hf_device_map", None)
        lens = LogitLens(model)
        lens.model = None  # LogitLens.logits uses only .norm and .unembed: drop the rest of the backbone
        self._lens = lens

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if self.translators is None:
            self._build(dm.layers, dm.d_model, dm.backbone.num_layers())
        elif list(dm.layers) != self.layers:
            raise UserError(f"data.layers {list(dm.layers)} differ from the tuned lens's {self.layers}")
        if self._lens is None:
            self.attach_backbone(dm.backbone)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tuned_lens_layout"] = {
            "layers": self.layers,
            "d_model": self.translators.bias.shape[1],
            "n_backbone_layers": self.layers[self.final_slot] + 1,
            "backbone": dataclasses.asdict(self.backbone_spec) if self.backbone_spec else None,
        }
        assert all(key.startswith("translators.") for key in checkpoint["state_dict"]), "backbone keys leaked"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        layout = checkpoint["tuned_lens_layout"]
        if self.translators is None:
            self._build(layout["layers"], layout["d_model"], layout["n_backbone_layers"])
        elif list(layout["layers"]) != self.layers:
            raise UserError(f"the checkpoint's layers {layout['layers']} differ from the run's {self.layers}")
        if self.backbone_spec is None and layout["backbone"] is not None:
            self.backbone_spec = BackboneSpec(**layout["backbone"])  # loaded on first use (see `lens`)

    @property
    def lens(self) -> LogitLens:
        """The frozen readout (final norm + unembedding), on this module's device unless sharded."""
        if self._lens is None:
            if self.backbone_spec is None:
                raise UserError("the tuned lens has no backbone: call attach_backbone() or fit it first")
            self.attach_backbone(self.backbone_spec)
        if self._move_lens and self._lens.unembed.weight.device != self.device:
            self._lens.norm.to(self.device)
            self._lens.unembed.to(self.device)
        return self._lens

    # ---- the lens ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tuned-lens logits [batch, n_layers, vocab] float32 of cached residuals [batch, n_layers, d_model].

        Memory: batch x n_layers x vocab floats; use `kl_per_layer` for anything large.
        """
        return self.lens.logits(self.translators(x.to(self.device)))

    @torch.no_grad()
    def final_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own next-token log-probabilities [batch, vocab] float32, from the last layer in x."""
        return self.lens.logits(x[:, self.final_slot].to(self.device)).log_softmax(-1)

    def kl_per_layer(
        self, x: torch.Tensor, tuned: bool = True, slots: Sequence[int] | None = None
    ) -> torch.Tensor:
        """KL(final distribution || lens distribution) [batch, n_slots] float32 (tuned=False: the logit lens).

        x: cached residuals [batch, n_layers, d_model]; slots: indices into `layers` (None = all).
        Layers are read out a few at a time (at most READOUT_BLOCK_ELEMENTS logits per block); with gradients
        enabled each block is checkpointed, i.e. recomputed in the backward pass instead of kept.
        """
        x = x.to(self.device)
        slots = list(range(x.shape[1])) if slots is None else list(slots)
        log_p = self.final_log_probs(x)[:, None]  # [batch, 1, vocab]
        p = log_p.exp()
        h = self.translators(x) if tuned else x  # [batch, n_layers, d_model]
        vocab = self.lens.unembed.weight.shape[0]
        per_block = max(1, READOUT_BLOCK_ELEMENTS // (x.shape[0] * vocab))

        def block_kl(h_block: torch.Tensor) -> torch.Tensor:  # [batch, k, d_model] -> [batch, k]
            log_q = self.lens.logits(h_block).log_softmax(-1)  # [batch, k, vocab]
            return (p * (log_p - log_q)).sum(-1).to(self.device)

        # The last layer is read alone, exactly like log_p (same shapes, same kernels), so its logit-lens KL
        # is exactly 0 rather than float32 noise of a differently blocked matmul.
        others = [slot for slot in slots if slot != self.final_slot]
        blocks = [others[i : i + per_block] for i in range(0, len(others), per_block)]
        blocks += [[self.final_slot]] if self.final_slot in slots else []
        kls = []
        for block in blocks:
            h_block = h[:, block]
            if torch.is_grad_enabled() and h_block.requires_grad:
                kls.append(checkpoint(block_kl, h_block, use_reentrant=False))
            else:
                kls.append(block_kl(h_block))
        order = [slot for block in blocks for slot in block]
        return torch.cat(kls, dim=1)[:, [order.index(slot) for slot in slots]]

    # ---- steps ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.kl_per_layer(batch["x"], slots=self.trained_slots).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["x"]))
        return loss

    def _eval_step(self, batch: dict, split: str) -> None:
        kl_tuned = self.kl_per_layer(batch["x"], tuned=True)
        self.metrics[split]["kl_tuned"].update(kl_tuned)
        self.metrics[split]["kl_logit"].update(self.kl_per_layer(batch["x"], tuned=False))
        self.log(f"{split}/loss", kl_tuned.mean(), batch_size=len(batch["x"]), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch(self, split: str) -> None:
        values = {name: metric.compute().float() for name, metric in self.metrics[split].items()}
        for metric in self.metrics[split].values():
            metric.reset()
        for name, per_layer in values.items():
            for layer, value in zip(self.layers, per_layer):
                self.log(f"{split}/{name}/L{layer:02d}", value, sync_dist=True)
            lensed = per_layer[self.trained_slots]  # the last layer's KL is 0 by construction: not averaged in
            self.log(f"{split}/{name}_mean", lensed.mean(), prog_bar=name == "kl_tuned", sync_dist=True)
        self.last_metrics[split] = {name: v.detach().cpu() for name, v in values.items()}

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

    # ---- the evaluation protocol (lightning_modules/protocol.py) ------------------------------------------------
    def build_report(self, trainer: L.Trainer, datamodule, split: str, options, checkpoint: str) -> dict:
        """`callbacks.tuned_lens_report.tuned_lens_report`: per-layer tuned / logit-lens KL on the test split
        (the activation cache is extracted first if it is incomplete)."""
        from callbacks.tuned_lens_report import tuned_lens_report
        from lightning_modules.protocol import cached_test_report

        return cached_test_report(tuned_lens_report, self, trainer, datamodule, split, checkpoint, "tuned-lens")

    @staticmethod
    def write_report(report: dict, output_dir: Path) -> dict[str, Path]:
        """tuned_lens_results.json + visualizations/tuned_lens_kl.png (`callbacks.tuned_lens_report`)."""
        from callbacks.tuned_lens_report import write_tuned_lens_report

        return write_tuned_lens_report(report, output_dir)
