"""kdqa's CPU attention with dropout (pipeline/model/attention.py) computes softmax(QK^T * scaling + mask), dropout, x V:
checked against a direct float64 computation under the same dropout mask, forward and backward, with both mask
kinds transformers passes; and it is what a CPU student stage trains with (padding still masked)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import run_cli
from pipeline.model import attention, dropout
from pipeline.model.attention import NAME, chunk_keep_mask, dropout_attention, use_dropout_attention


def direct_attention(q, k, v, additive_mask, keep, scale, scaling):
    """The definition, in float64: probabilities, the kept ones scaled by `scale`, then the weighted values."""
    q, k, v = (t.double() for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) * scaling + additive_mask.double(), dim=-1)
    return (probs * keep.double() * scale) @ v


def drawn_mask(seed: int, shape: tuple, p: float, rows: int):
    """The whole dropout mask a call with this seed draws, chunk by chunk (pipeline.model.attention.chunk_keep_mask)."""
    chunks = [chunk_keep_mask(seed, i, torch.Size((min(rows, shape[0] - i), *shape[1:])), p)
              for i in range(0, shape[0], rows)]
    return torch.cat([keep for keep, _ in chunks]), chunks[0][1]


def qkv(seed=0, shape=(5, 3, 7, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_dropout_attention_equals_the_definition_under_the_same_mask(monkeypatch, mask_kind):
    """Forward and backward against float64 autograd of the definition, chunk by chunk (2 rows of 5 per chunk);
    the backward pass recomputes each chunk's probabilities and redraws its mask."""
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 2 * 3 * 7 * 7)
    q, k, v = qkv()
    attend = torch.ones(5, 1, 7, 7, dtype=torch.bool)
    attend[1, ..., 5:] = False  # row 1's last two tokens are padding, row 4's last one
    attend[4, ..., 6:] = False
    additive = torch.zeros(attend.shape).masked_fill(~attend, torch.finfo(torch.float32).min)
    mask = attend if mask_kind == "bool" else additive

    torch.manual_seed(3)
    out = dropout_attention(q, k, v, mask, 0.25, 0.5)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (1,)))  # the call's seed, drawn from torch's generator
    keep, scale = drawn_mask(seed, (5, 3, 7, 7), 0.25, rows=2)
    assert not keep.all() and keep.any() and scale == pytest.approx(1 / 0.75)
    want = direct_attention(q, k, v, additive, keep, scale, 0.5)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    wanted = torch.autograd.grad(want, (q, k, v), grad_out.double())
    for g, w in zip(got, wanted):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)
    # Padding takes no weight: the padded keys' values do not reach the output.
    v2 = v.detach().clone()
    v2[1, :, 5:] += 100.0
    torch.manual_seed(3)
    torch.testing.assert_close(dropout_attention(q, k, v2, mask, 0.25, 0.5), out)


def test_only_the_inputs_are_kept_for_the_backward_pass():
    """No attention matrix outlives its chunk (PyTorch's fallback keeps three float32 copies of each)."""
    import torch.nn.functional as F

    q, k, v = (t.detach().bfloat16().requires_grad_() for t in qkv(shape=(4, 2, 64, 8)))
    for attend, matrices in ((lambda: dropout_attention(q, k, v, None, 0.1, 8 ** -0.5), 0),
                             (lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), 3)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            attend()
        assert sum(t.shape[-2:] == (64, 64) for t in saved) == matrices


def test_chunks_of_one_call_draw_their_own_masks():
    """(The masks' probability: tests/test_dropout.py.) The same seed and row, the same mask; another row, another."""
    a, _ = chunk_keep_mask(7, 0, torch.Size((1000,)), 0.5)
    assert torch.equal(a, chunk_keep_mask(7, 0, torch.Size((1000,)), 0.5)[0])
    assert not torch.equal(a, chunk_keep_mask(7, 1, torch.Size((1000,)), 0.5)[0])


def test_bfloat16_attention_stays_in_bfloat16_and_close_to_the_definition():
    """Under autocast the products and probabilities stay in bfloat16, mask included."""
    q, k, v = (t.detach().bfloat16() for t in qkv(shape=(2, 3, 16, 8)))
    additive = torch.zeros(2, 1, 1, 16)
    additive[0, ..., 12:] = torch.finfo(torch.float32).min
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dropout_attention(q, k, v, additive, 0.1, 8 ** -0.5)
    assert out.dtype == torch.bfloat16
    torch.manual_seed(1)
    seed = int(torch.randint(0, 2**62, (1,)))
    keep, scale = drawn_mask(seed, (2, 3, 16, 16), 0.1, rows=attention.chunk_rows(q))
    want = direct_attention(q, k, v, additive, keep, scale, 8 ** -0.5)
    torch.testing.assert_close(out.double(), want, rtol=0.05, atol=0.05)


def tiny_bert(attention_dropout: float):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=attention_dropout)
    return BertForQuestionAnswering._from_config(config, attn_implementation="sdpa")


def test_a_bert_model_trains_through_it_with_its_padding_masked(monkeypatch):
    """In training mode the model's attention runs kdqa's function (with the padding mask transformers builds
    for SDPA); evaluation and dropout 0 stay on PyTorch's SDPA. A dropout probability that rounds to 0 keeps
    everything, so training-mode logits equal SDPA's evaluation logits, padded or not."""
    calls = []
    real = attention.dropout_attention
    monkeypatch.setattr(attention, "dropout_attention", lambda *a: calls.append(a[3]) or real(*a))
    model = tiny_bert(attention_dropout=1e-9)  # rounds to 0/65536: nothing dropped
    reference = tiny_bert(attention_dropout=1e-9).eval()
    assert use_dropout_attention(model) and model.config._attn_implementation == NAME
    model.train()
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    padded = torch.ones(2, 9, dtype=torch.long)
    padded[1, 6:] = 0
    out = model(input_ids=ids, attention_mask=padded)
    assert len(calls) == 2 and calls[0] is not None  # both layers, with a mask
    want = reference(input_ids=ids, attention_mask=padded)
    torch.testing.assert_close(out.start_logits, want.start_logits, rtol=1e-5, atol=1e-5)
    alone = model(input_ids=ids[1:, :6], attention_mask=padded[1:, :6])
    torch.testing.assert_close(out.start_logits[1:, :6], alone.start_logits, rtol=1e-5, atol=1e-5)
    calls.clear()
    model.eval()
    model(input_ids=ids, attention_mask=padded)
    assert not calls  # no dropout: PyTorch's SDPA
    without = tiny_bert(attention_dropout=0.0)
    use_dropout_attention(without)
    without.train()(input_ids=ids, attention_mask=padded)
    assert not calls


def test_under_gradient_checkpointing_it_gives_the_same_gradients():
    """A checkpointed layer runs its forward again before its backward under the same random state: the same
    call seed, the same dropout masks, the gradients of the plain run."""
    from pipeline.stages.student import enable_gradient_checkpointing

    ids = torch.randint(1, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[2, 8:] = 0
    grads = []
    for checkpointed in (False, True):
        model = tiny_bert(attention_dropout=0.3)
        if checkpointed:
            enable_gradient_checkpointing(model, "tiny")
        assert use_dropout_attention(model)
        model.train()
        torch.manual_seed(5)
        out = model(input_ids=ids, attention_mask=mask)
        (out.start_logits.sum() + out.end_logits.square().sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", ["auto", "sdpa"])
def test_the_cpu_student_stage_uses_it_unless_told_sdpa(run_copy, monkeypatch, setting):
    calls = []
    real = attention.dropout_attention
    monkeypatch.setattr(attention, "dropout_attention", lambda *a: calls.append(1) or real(*a))
    params = yaml.safe_load((run_copy / "params.yaml").read_text())
    drops = []  # and its hidden dropout (student.dropout_masks), likewise kdqa's unless told torch
    real_drop = dropout.CpuDropout.forward
    monkeypatch.setattr(dropout.CpuDropout, "forward", lambda self, x: drops.append(1) or real_drop(self, x))
    params["student"].update(attention=setting, dropout_masks="auto" if setting == "auto" else "torch", max_steps=2)
    (run_copy / "params.yaml").write_text(yaml.safe_dump(params))
    run_cli(["student"], run_copy)
    assert bool(calls) == bool(drops) == (setting == "auto")
    # The saved model names no attention function only kdqa registers: it loads anywhere.
    assert NAME not in json.dumps(json.loads((run_copy / "models/student/config.json").read_text()))
