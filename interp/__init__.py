"""Plain torch + transformers measurement code (no Lightning).

Backbones and hooks: load_backbone, hooked, collect_activations. Directions and interventions:
compute_contrastive_directions, InterventionHandler, apply_direction_intervention, LayerAblator, PathPatcher.
Lenses: LogitLens, TunedLens. Grading: grade_answer, has_final_answer. Similarity: linear_cka, cka_matrix,
cka_permutation_null, MinibatchCKA. The two models lined up: analyze_cross_model_alignment, map_directions,
transplant_report, logit_lens_depth, create_summary_figure.
"""

from interp.ablation import LayerAblator
from interp.activations import capture_residuals, collect_activations
from interp.alignment import analyze_cross_model_alignment
from interp.backbone import BUILTIN_BACKBONES, BackboneSpec, decoder_layers, load_backbone, load_tokenizer
from interp.directions import compute_contrastive_directions, load_directions, pca_directions, save_directions
from interp.errors import UserError
from interp.generation import apply_direction_intervention, generate
from interp.grading import extract_answer, grade_answer, has_final_answer
from interp.hooks import hooked, site_name
from interp.interventions import AblateDirection, AddDirection, AddTrainableVectors, InterventionHandler
from interp.lens import LogitLens, TunedLens
from interp.lens_depth import logit_lens_depth
from interp.metrics import (
    completion_logprobs,
    first_tokens_logprob,
    gold_solution_nll,
    last_token_kl,
    next_token_logits,
)
from interp.orthogonalize import orthogonalize_weights
from interp.patching import PathPatcher, capture_sites
from interp.patching_sweep import attribution_patching, patching_sweep
from interp.plots import create_summary_figure
from interp.positions import PositionSpec
from interp.prompts import format_chat_prompt, post_instruction_ids
from interp.selection import bootstrap_ci, select_direction, zscore
from interp.similarity import (
    MinibatchCKA,
    bootstrap_cka_diagonal,
    cka_matrix,
    cka_permutation_null,
    linear_cka,
)
from interp.text_metrics import compression_ratio, ngram_repetition
from interp.token_roles import prompt_boundary
from interp.transplant import map_directions, transplant_report

__all__ = [
    "AblateDirection",
    "AddDirection",
    "AddTrainableVectors",
    "BUILTIN_BACKBONES",
    "BackboneSpec",
    "InterventionHandler",
    "LayerAblator",
    "LogitLens",
    "MinibatchCKA",
    "PathPatcher",
    "PositionSpec",
    "TunedLens",
    "UserError",
    "analyze_cross_model_alignment",
    "apply_direction_intervention",
    "attribution_patching",
    "bootstrap_ci",
    "capture_residuals",
    "bootstrap_cka_diagonal",
    "capture_sites",
    "cka_matrix",
    "cka_permutation_null",
    "create_summary_figure",
    "collect_activations",
    "compression_ratio",
    "compute_contrastive_directions",
    "decoder_layers",
    "extract_answer",
    "completion_logprobs",
    "first_tokens_logprob",
    "format_chat_prompt",
    "generate",
    "gold_solution_nll",
    "grade_answer",
    "has_final_answer",
    "hooked",
    "last_token_kl",
    "linear_cka",
    "load_backbone",
    "load_directions",
    "load_tokenizer",
    "logit_lens_depth",
    "map_directions",
    "next_token_logits",
    "ngram_repetition",
    "orthogonalize_weights",
    "patching_sweep",
    "pca_directions",
    "post_instruction_ids",
    "prompt_boundary",
    "save_directions",
    "select_direction",
    "site_name",
    "transplant_report",
    "zscore",
]
