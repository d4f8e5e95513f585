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


def test_the_prompts_tokenizer_comes_from_the_backbones_revision(tmp_path, monkeypatch):
    """A pinned revision formats the prompts with that revision's tokenizer and chat template, not the hub's newest."""
    import datamodules.prompts as prompts_module

    calls = []
    real = prompts_module.load_tokenizer

    def recording(name_or_path, revision=None, trust_remote_code=False):
        calls.append((name_or_path, revision, trust_remote_code))
        return real(name_or_path)  # a built-in has no revisions to choose from

    monkeypatch.setattr(prompts_module, "load_tokenizer", recording)
    prompts = ReasoningPromptsDataModule(sources=SOURCES)
    CachedActivationDataModule(prompts, BackboneSpec("tiny", revision="v1.1"), cache_dir=tmp_path)
    prompts.setup()
    assert calls == [("tiny", "v1.1", False)]
