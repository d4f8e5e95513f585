"""logit_lens_depth against HF output_hidden_states read through the model's own norm and head, in float64."""

import numpy as np
import pytest
import torch

from interp.activations import collect_activations
from interp.errors import UserError
from interp.lens import LogitLens, TunedLens
from interp.lens_depth import first_token_ids, logit_lens_depth
from interp.metrics import next_token_logits
from interp.prompts import tokenize_prompts


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_depth_report_equals_hidden_states_through_norm_and_head(tiny, chat_prompts):
    model, tokenizer = tiny
    answers, solutions = ["4", "72", "70", "x", "6"], ["2 + 2", "In April", "We use", "Hello", "Adding"]
    acts = collect_activations(model, tokenizer, chat_prompts, positions="last", batch_size=2)  # [n, 32, 64]
    final = next_token_logits(model, tokenizer, chat_prompts, batch_size=2)  # [n, vocab]
    report = logit_lens_depth(LogitLens(model, tokenizer), acts, final, first_token_ids(tokenizer, answers),
                              first_token_ids(tokenizer, solutions), n_bootstrap=50)  # fmt: skip
    with torch.no_grad():  # independent path: one batch, HF hidden states (index l + 1 = output of layer l)
        batch = tokenize_prompts(tokenizer, chat_prompts)
        out = model(**batch, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[1:-1], 1)[:, :, -1]  # [n, 31, d]: layers 0..30, pre-norm
        lens_logits = model.lm_head(model.model.norm(hidden)).double().numpy()  # [n, 31, vocab]
        final = out.logits[:, -1].double().numpy()  # [n, vocab]: the model's own output
    log_p, log_q = _log_softmax(final), _log_softmax(lens_logits)
    kl = (np.exp(log_p)[:, None] * (log_p[:, None] - log_q)).sum(-1)  # [n, 31]
    # float32 forwards in different batch shapes: logits agree to ~1e-5, so KL and probabilities to ~1e-4
    np.testing.assert_allclose(report["kl"]["mean"][:31], kl.mean(0), rtol=1e-3, atol=1e-4)
    assert abs(report["kl"]["mean"][31]) < 1e-6  # the last layer's lens is the model's own distribution
    target = first_token_ids(tokenizer, answers).numpy()
    probs = np.exp(np.take_along_axis(log_q, target[:, None, None].repeat(31, 1), -1)[..., 0])  # [n, 31]
    np.testing.assert_allclose(report["answer"]["prob"]["mean"][:31], probs.mean(0), rtol=1e-3, atol=1e-6)
    ranks = (lens_logits > np.take_along_axis(lens_logits, target[:, None, None].repeat(31, 1), -1)).sum(-1)
    np.testing.assert_array_equal(report["answer"]["top1_rate"][:31], (ranks == 0).mean(0))
    # ranks from differently blocked float32 logits can differ by a near-tie; np.median is the usual (even-n) median
    np.testing.assert_allclose(report["answer"]["median_rank"][:31], np.median(ranks, 0), rtol=0.05)
    assert all(low <= mean <= high for (low, high), mean in zip(report["kl"]["ci"], report["kl"]["mean"]))


def test_first_token_ids_and_bad_input(tiny):
    model, tokenizer = tiny
    ids = first_token_ids(tokenizer, ["18", "Natalia sold"])
    assert tokenizer.decode([int(ids[0])]) == "1" and tokenizer.decode([int(ids[1])]) == "N"
    with pytest.raises(UserError, match="has no tokens"):
        first_token_ids(tokenizer, ["7", ""])
    lens = LogitLens(model, tokenizer)
    with pytest.raises(UserError, match="one id per prompt"):
        logit_lens_depth(lens, torch.zeros(3, 2, 64), torch.zeros(3, 9), torch.zeros(2), torch.zeros(3))
    with pytest.raises(UserError, match="final_logits must be"):
        logit_lens_depth(lens, torch.zeros(3, 2, 64), torch.zeros(2, 9), torch.zeros(3), torch.zeros(3))


def test_tuned_lens_depth_equals_the_tuned_lens_own_readout(tiny, chat_prompts):
    """A tuned lens (random translators) read one slot at a time against TunedLens.kl_per_layer / logits, which
    apply every translator at once; the identity translators give the logit lens's report."""
    model, tokenizer = tiny
    layers = [3, 17, 31]  # the tuned lens needs the last layer (31)
    acts = collect_activations(model, tokenizer, chat_prompts, layers=layers, positions="last", batch_size=2)
    final = next_token_logits(model, tokenizer, chat_prompts, batch_size=2)
    answers = first_token_ids(tokenizer, ["4", "72", "70", "x", "6"])
    lens = TunedLens.for_model(model, layers)
    identity = logit_lens_depth(lens, acts[:, :2], final, answers, answers, lens_slots=[0, 1], n_bootstrap=20)
    logit = logit_lens_depth(LogitLens(model, tokenizer), acts[:, :2], final, answers, answers, n_bootstrap=20)
    np.testing.assert_allclose(identity["kl"]["mean"], logit["kl"]["mean"], rtol=1e-6, atol=1e-9)
    torch.manual_seed(0)
    with torch.no_grad():
        lens.translators.weight.normal_(std=0.3 / 8)  # d_model 64: A_l x is ~30% of x
        lens.translators.bias.normal_(std=0.3)
        lens.translators.weight[2] = 0  # the last layer's translator stays the identity, as trained
        lens.translators.bias[2] = 0
    # acts in another slot order than the lens's: slot 1 of acts is lens slot 0, and so on
    report = logit_lens_depth(lens, acts[:, [1, 0]], final, answers, answers, layers=[17, 3], lens_slots=[1, 0],
                              n_bootstrap=20)  # fmt: skip
    with torch.no_grad():
        kl = lens.kl_per_layer(acts, tuned=True)[:, [1, 0]].double()  # [n, 2], float32 log-softmax
        probs = lens.logits(acts)[:, [1, 0]].softmax(-1).gather(-1, answers[:, None, None].expand(-1, 2, 1))[..., 0]
    # float32 log-softmax over 152k logits of magnitude ~10: KL to ~1e-5 absolute per prompt
    np.testing.assert_allclose(report["kl"]["mean"], kl.mean(0).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(report["answer"]["prob"]["mean"], probs.double().mean(0).numpy(), rtol=1e-4, atol=1e-9)
    assert report["kl"]["mean"][0] != pytest.approx(logit["kl"]["mean"][1], rel=1e-2)  # the translators did act
    with pytest.raises(UserError, match="lens slots"):
        logit_lens_depth(lens, acts[:, :2], final, answers, answers, lens_slots=[0])


def test_median_rank_of_an_even_number_of_prompts_is_the_usual_median():
    """Ranks 0, 1, 100, 900 of the target: median 50.5 (a lower median would say 1 and hide the bimodal spread)."""

    class FixedLens:  # the same logits at every layer: target i sits at rank ranks[i]
        def layer_logits(self, resid, slot):
            return logits

    ranks = [0, 1, 100, 900]
    logits = torch.arange(1000, 0, -1, dtype=torch.float32).repeat(4, 1)  # token t has rank t
    report = logit_lens_depth(FixedLens(), torch.zeros(4, 2, 8), logits, torch.tensor(ranks), torch.tensor(ranks),
                              n_bootstrap=10)  # fmt: skip
    assert report["answer"]["median_rank"] == [50.5, 50.5] and report["answer"]["top1_rate"] == [0.25, 0.25]
    assert report["kl"]["mean"] == [0.0, 0.0]  # the lens is the final distribution itself
