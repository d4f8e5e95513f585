"""The cached datamodule decides the prompts' tokenizer only when the prompts name no backbone of their own."""

import pytest

from datamodules.activations import CachedActivationDataModule
from datamodules.problems import DatasetSource
from datamodules.prompts import ReasoningPromptsDataModule
from interp.backbone import BackboneSpec
from interp.errors import UserError

SOURCES = [DatasetSource("gsm8k", limit=4)]


def test_unset_prompt_backbone_follows_the_activation_backbone(tmp_path):
    prompts = ReasoningPromptsDataModule(sources=SOURCES)
    assert prompts.backbone is None
    CachedActivationDataModule(prompts, BackboneSpec("tiny-r1-distill"), cache_dir=tmp_path)
    assert prompts.backbone == "tiny-r1-distill"


def test_a_different_prompt_backbone_is_refused_not_overwritten(tmp_path):
    prompts = ReasoningPromptsDataModule(backbone="tiny-qwq", sources=SOURCES)
    with pytest.raises(UserError, match="data.prompts.backbone 'tiny-qwq' differs from data.backbone 'tiny'"):
        CachedActivationDataModule(prompts, BackboneSpec("tiny"), cache_dir=tmp_path)
    assert prompts.backbone == "tiny-qwq"
    CachedActivationDataModule(prompts, BackboneSpec("tiny-qwq"), cache_dir=tmp_path)  # the same one is fine


def test_prompts_alone_default_to_the_tiny_tokenizer():
    prompts = ReasoningPromptsDataModule(sources=SOURCES)
    prompts.setup()
    assert prompts.backbone == "tiny" and prompts.rows
