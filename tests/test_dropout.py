"""kdqa's CPU dropout (pipeline/model/dropout.py): the masks' probability, the function against its definition
under the same mask (forward and backward), PyTorch's dropout wherever it does not apply, and the same gradients
under gradient checkpointing (the recomputed layer drops what it dropped the first time)."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.dropout import CpuDropout, draw_keep_mask, use_cpu_dropout


def test_dropout_probability_is_kept_on_average_and_rounded_to_one_in_65536():
    keep, scale = draw_keep_mask(torch.Size((4_000_000,)), 0.1, torch.Generator().manual_seed(0))
    dropped = 1 - keep.double().mean().item()
    assert abs(dropped - 6554 / 65536) < 0.0015  # 0.1 rounds to 6554/65536; 4M draws: sd 0.00015
    assert scale == 1 / (1 - 6554 / 65536)
    # Each 16-bit quarter of the 64-bit words is uniform: no element position is dropped more often than another.
    by_position = 1 - keep.view(-1, 4).double().mean(dim=0)
    assert (by_position - dropped).abs().max() < 0.002


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_is_the_definition_under_its_mask(dtype):
    """x * keep / (1 - p), with the mask the default generator's state draws; the gradient is the same mask
    times the same scale; the mask differs from call to call."""
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    drop = CpuDropout(0.25).train()
    torch.manual_seed(11)
    y = drop(x)
    torch.manual_seed(11)
    keep, scale = draw_keep_mask(x.shape, 0.25, None)
    assert 0 < keep.sum() < keep.numel() and y.dtype == dtype
    want = x.detach().double() * keep.double() * scale
    torch.testing.assert_close(y.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    torch.testing.assert_close(x.grad.double(), grad_out.double() * keep.double() * scale,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
    assert not torch.equal(drop(x) != 0, y != 0)


def test_evaluation_and_zero_probability_are_pytorchs_dropout():
    x = torch.randn(4, 8)
    assert torch.equal(CpuDropout(0.5).eval()(x), x)
    assert torch.equal(CpuDropout(0.0).train()(x), x)


def tiny_bert(hidden_dropout: float):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=hidden_dropout, attention_probs_dropout_prob=0.0)
    return BertForQuestionAnswering._from_config(config, attn_implementation="sdpa")


def test_use_cpu_dropout_replaces_every_dropout_and_keeps_the_weights():
    model, plain = tiny_bert(0.2), tiny_bert(0.2)
    dropouts = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert use_cpu_dropout(model) == dropouts > 0
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert all(m.p == 0.2 for m in model.modules() if isinstance(m, CpuDropout) and m.p)
    assert model.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.eval()(input_ids=ids).start_logits, plain.eval()(input_ids=ids).start_logits)


def test_under_gradient_checkpointing_it_gives_the_same_gradients():
    from pipeline.stages.student import enable_gradient_checkpointing

    ids = torch.randint(1, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        model = tiny_bert(0.3)
        use_cpu_dropout(model)
        if checkpointed:
            enable_gradient_checkpointing(model, "tiny")
        model.train()
        torch.manual_seed(5)
        out = model(input_ids=ids)
        (out.start_logits.sum() + out.end_logits.square().sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
