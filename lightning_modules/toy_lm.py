"""The toy reasoning pair: a small Qwen2 trained to solve toy_arithmetic problems, and its distilled student.

- toy-qwq (the "RL-trained reasoner" stand-in): random init (seed 0), trained on the generator's worked
  solutions for the 20,000 training problems (reasoning prompts) and on control answers (copy / restate /
  topic prompts, 40% of the examples), with QwQ-32B's chat template.
- toy-r1-distill (the "distilled" stand-in): random init (seed 1), trained only on toy-qwq's own greedy outputs
  (sequence-level distillation) for the first `distill_problems` training problems, reasoning and control
  prompts alike, with R1-Distill's chat template. Unlike the real pair the two share no base model: the
  student learns everything it knows from the teacher's text.

Both are a Lightning fit of `ToyLMModule` over `datamodules.toy_corpus.ToyCorpusDataModule`, deterministic on
CPU, with logits restricted to the corpus's token ids (interp/restricted_vocab.py: exact full-vocabulary
cross-entropy), then expanded to the real 152,064-row vocabulary and written with `save_pretrained`.
`interp.backbone.build_tiny_backbone` calls the builders on first use and caches the result;
`toy_recipe.json` in the model directory records the recipe and the corpus's token ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList, PreTrainedModel, Qwen2ForCausalLM

from datamodules.prompt_rows import CONTROL_TEMPLATES
from datamodules.toy_corpus import (
    IGNORE,
    ToyCorpusDataModule,
    control_prompt,
    reasoning_prompt,
    solver_texts,
    tokenize_pairs,
)
from interp.backbone import TinySpec, load_backbone, resolve_backbone_path, tiny_config
from interp.prompts import length_sorted_chunks
from interp.restricted_vocab import (
    RestrictedVocab,
    UnseenMassLogits,
    expand_to_full,
    restrict,
    restricted_config,
)
from interp.toy_arithmetic import SPLIT_SIZES, toy_problems

RECIPE_FILE = "toy_recipe.json"


@dataclass(frozen=True)
class ToyRecipe:
    """How a toy model is trained (the shape is the backbone's TinySpec)."""

    steps: int = 700  # toy-qwq: 0.985 held-out accuracy (800: 0.985); it rises steeply between 400 and 600 steps
    student_steps: int = 800  # toy-r1-distill: 0.955 (700 steps on 2,000 problems: 0.85)
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    control_fraction: float = 0.4  # of the training examples
    distill_problems: int = 3000  # training problems the teacher answers for the student
    max_new_tokens: int = 96  # teacher generation budget (the longest solution is ~70 tokens)


RECIPE = ToyRecipe()


class ToyLMModule(L.LightningModule):
    """Next-token training of a restricted-vocabulary causal LM (completion tokens only).

    AdamW (betas 0.9 / 0.98) with linear warmup then cosine decay to 0 over `steps`; logs `train/loss`."""

    def __init__(self, model: PreTrainedModel, vocab: RestrictedVocab, recipe: ToyRecipe):
        super().__init__()
        self.model, self.vocab, self.recipe = model, vocab, recipe

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raw = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # [b, t, V]
        logits = self.vocab.logits(raw)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE)  # fmt: skip

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        r = self.recipe
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=r.lr, betas=(0.9, 0.98), weight_decay=r.weight_decay
        )

        def schedule(step: int) -> float:
            warm = min(1.0, (step + 1) / r.warmup_steps)
            return warm * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(step, r.steps) / r.steps)).item())

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit_toy_lm(spec: TinySpec, examples: list[tuple[list[int], int]], recipe: ToyRecipe = RECIPE) -> tuple:
    """Train a restricted-vocabulary model of `spec`'s shape from random init (seed `spec.seed`) for
    `recipe.steps` steps.

    Returns (full-vocabulary model, RestrictedVocab)."""
    L.seed_everything(spec.seed, verbose=False)
    full_config = tiny_config(spec)
    vocab = RestrictedVocab({t for ids, _ in examples for t in ids}, full_config.vocab_size)
    model = Qwen2ForCausalLM(restricted_config(full_config, vocab))
    data = ToyCorpusDataModule(
        examples, vocab, recipe.batch_size, recipe.steps * recipe.batch_size, seed=spec.seed
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=recipe.steps, deterministic=True, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(ToyLMModule(model, vocab, recipe), datamodule=data)
    return expand_to_full(model.eval(), vocab, full_config), vocab


def _save(model: PreTrainedModel, vocab: RestrictedVocab, recipe: ToyRecipe, out_dir: Path, **extra) -> None:
    model.save_pretrained(out_dir)
    record = {"recipe": asdict(recipe), "corpus_token_ids": vocab.ids.tolist(), **extra}
    (Path(out_dir) / RECIPE_FILE).write_text(json.dumps(record, indent=1))


@contextlib.contextmanager
def _all_cores_quietly():
    """Every core for the build (the test suite pins torch to one thread), and no Lightning banner."""
    threads, logger = torch.get_num_threads(), logging.getLogger("lightning.pytorch")
    level = logger.level
    torch.set_num_threads(max(threads, os.cpu_count() or 1))
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        logger.setLevel(level)


@_all_cores_quietly()
def build_toy_qwq(spec: TinySpec, tokenizer, out_dir: Path, recipe: ToyRecipe = RECIPE) -> None:
    """Train toy-qwq on the generator's solutions and write it to `out_dir` (the module docstring)."""
    problems = toy_problems("train", SPLIT_SIZES["train"])
    examples = tokenize_pairs(
        tokenizer, solver_texts(tokenizer, problems, recipe.control_fraction, seed=spec.seed)
    )
    model, vocab = fit_toy_lm(spec, examples, recipe)
    _save(model, vocab, recipe, out_dir, trained_on="toy_arithmetic train split, generator solutions")


@torch.no_grad()
def greedy_completions(model: PreTrainedModel, vocab: RestrictedVocab, tokenizer, prompts: list[str],
                       max_new_tokens: int, batch_size: int = 256) -> list[str]:  # fmt: skip
    """Greedy completions (text up to, not including, EOS) of a restricted-vocabulary model, equal to those
    of its full-vocabulary expansion (`UnseenMassLogits`); RuntimeError if it ever picks an unseen id."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    eos = int(vocab.encode(torch.tensor(tokenizer.eos_token_id)))
    out: list[str] = [""] * len(prompts)
    for chunk in length_sorted_chunks([len(x) for x in ids], batch_size):
        longest = max(len(ids[i]) for i in chunk)
        batch = torch.zeros(len(chunk), longest, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for row, i in enumerate(chunk):  # left padding
            batch[row, longest - len(ids[i]) :] = vocab.encode(torch.tensor(ids[i]))
            mask[row, longest - len(ids[i]) :] = 1
        new = model.generate(
            input_ids=batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=eos, logits_processor=LogitsProcessorList([UnseenMassLogits(vocab)]),
        )[:, longest:]  # fmt: skip
        for row, i in enumerate(chunk):
            tokens = new[row].tolist()
            tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
            if vocab.other in tokens:
                raise RuntimeError("the teacher chose a token outside its training corpus")
            out[i] = tokenizer.decode(vocab.decode(torch.tensor(tokens, dtype=torch.long)).tolist())
    return out


@_all_cores_quietly()
def build_toy_r1_distill(spec: TinySpec, tokenizer, out_dir: Path, recipe: ToyRecipe = RECIPE) -> None:
    """Train toy-r1-distill on toy-qwq's greedy outputs and write it to `out_dir` (the module docstring)."""
    teacher_path = resolve_backbone_path("toy-qwq")
    teacher_full, teacher_tokenizer = load_backbone(teacher_path)  # the real from_pretrained path
    record = json.loads((Path(teacher_path) / RECIPE_FILE).read_text())
    teacher_vocab = RestrictedVocab(record["corpus_token_ids"], teacher_full.config.vocab_size)
    teacher = restrict(teacher_full, teacher_vocab)
    del teacher_full

    problems = toy_problems("train", SPLIT_SIZES["train"])[: recipe.distill_problems]
    controls = sorted(CONTROL_TEMPLATES)
    rng = torch.Generator().manual_seed(spec.seed)
    draws = torch.rand(len(problems), generator=rng).tolist()
    jobs = [(p, None) for p in problems] + [
        (p, controls[k % len(controls)]) for k, (p, u) in enumerate(zip(problems, draws))
        if u < recipe.control_fraction / (1 - recipe.control_fraction)
    ]  # fmt: skip

    def prompt(tok, problem, control):
        return reasoning_prompt(tok, problem) if control is None else control_prompt(tok, problem, control)

    answers = greedy_completions(teacher, teacher_vocab, teacher_tokenizer,
                                 [prompt(teacher_tokenizer, p, c) for p, c in jobs], recipe.max_new_tokens)  # fmt: skip
    pairs = [(prompt(tokenizer, p, c), answer) for (p, c), answer in zip(jobs, answers)]
    model, vocab = fit_toy_lm(spec, tokenize_pairs(tokenizer, pairs), replace(recipe, steps=recipe.student_steps))
    _save(model, vocab, recipe, out_dir, trained_on=f"toy-qwq greedy outputs for {len(pairs)} prompts")
