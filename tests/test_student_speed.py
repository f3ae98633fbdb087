"""The student step's speed options change how batches are formed and in which precision the step runs, never
what is learnt from: length-grouped batches hold every row once per epoch with its own targets."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow.parquet as pq

import tiny

from pipeline.model.batching import length_grouped_batches


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - int(lengths.sum()) / padded


def test_length_grouped_batches_hold_every_row_once_with_little_padding():
    lengths = np.random.default_rng(0).integers(20, 257, size=1003)
    batches = length_grouped_batches(lengths, 16, np.random.default_rng(1), group_batches=8)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1003))
    assert len(batches) == -(-1003 // 16) and sum(len(b) < 16 for b in batches) == 1  # as consecutive slices
    order = np.random.default_rng(1).permutation(1003)
    random_batches = [order[i : i + 16] for i in range(0, 1003, 16)]
    assert padding_fraction(lengths, batches) < 0.1 < 0.3 < padding_fraction(lengths, random_batches)
    # The batches come in random order, not longest first: short and long batches alternate.
    longest = [int(lengths[b].max()) for b in batches]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)
    # Reproducible from the generator's seed; another seed (epoch) pairs rows differently.
    again = length_grouped_batches(lengths, 16, np.random.default_rng(1), group_batches=8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = length_grouped_batches(lengths, 16, np.random.default_rng(2), group_batches=8)
    pairs = {frozenset(b.tolist()) for b in batches}
    assert len(pairs & {frozenset(b.tolist()) for b in other}) < len(batches) // 4


def test_grouped_stream_gives_every_feature_its_own_targets_once(prepared_run):
    from pipeline.training.stream import ShardStream, find_shard_pairs

    targets = {}
    for fp in sorted((prepared_run / "data/features/train").glob("part-*.parquet")):
        logits = pq.read_table(prepared_run / "data/teacher/train" / fp.name).to_pylist()
        for f, t in zip(pq.read_table(fp).to_pylist(), logits):
            targets[tuple(f["input_ids"])] = (f["start_position"], f["end_position"], t["start_logits"])
    pairs = find_shard_pairs(prepared_run / "data/features/train", prepared_run / "data/teacher/train")
    stream = ShardStream(pairs, 3, 7, pad_token_id=0, group_by_length=True)
    seen = []
    for epoch in (0, 1):
        stream.epoch = epoch
        batches = list(stream)
        assert len(batches) == stream.steps_in_epoch(epoch)
        keys = []
        for b in batches:
            for i, n in enumerate(b["attention_mask"].sum(1).tolist()):
                key = tuple(b["input_ids"][i, :n].tolist())
                start, end, teacher_start = targets[key]
                assert (int(b["start_positions"][i]), int(b["end_positions"][i])) == (start, end)
                np.testing.assert_array_equal(b["teacher_start"][i, :n].numpy(), np.asarray(teacher_start, np.float32))
                keys.append(key)
        assert sorted(keys) == sorted(targets)  # every feature exactly once per epoch
        seen.append(keys)
    assert seen[0] != seen[1]  # reshuffled every epoch


def _tiny_batch(vocab_size: int, rows: int = 3, width: int = 24):
    import torch

    from pipeline.model.batching import pad_batch

    rng = np.random.default_rng(0)
    ids = [rng.integers(5, vocab_size, size=n) for n in (width, width - 5, width - 9)[:rows]]
    types = [np.r_[np.zeros(6, np.int64), np.ones(len(x) - 6, np.int64)] for x in ids]
    batch = pad_batch(ids, types, np.full(rows, 7), np.array([len(x) - 2 for x in ids]), 0)
    batch["start_positions"] = torch.tensor([8, 0, 9])[:rows]
    batch["end_positions"] = torch.tensor([10, 0, 9])[:rows]
    batch["teacher_start"] = torch.randn(rows, width)
    batch["teacher_end"] = torch.randn(rows, width)
    return batch


def _one_step(model_dir, precision: str, scaler=None):
    """One train_step on a fixed batch: (dtype the encoder's layers computed in, the model after the step)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from pipeline.model.loading import load_qa_model
    from pipeline.params import StudentParams
    from pipeline.training.step import build_optimizer, train_step

    torch.manual_seed(0)
    model = load_qa_model(str(model_dir)).train()
    seen = []
    model.qa_outputs.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    optimizer = build_optimizer(model, 1e-3, 0.01, torch.device("cpu"))
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10)
    settings = StudentParams(precision=precision, temperature=2.0, distillation_weight=0.5)
    loss = train_step(model, _tiny_batch(model.config.vocab_size), optimizer, scheduler, settings, 1,
                      torch.device("cpu"), scaler)
    assert torch.isfinite(loss.total)
    return seen[0], model


def test_precision_sets_the_steps_autocast_and_keeps_float32_weights(tiny_assets):
    import torch

    from pipeline.model.inference import cpu_has_native_bf16

    dtype16, model16 = _one_step(tiny_assets.student, "bfloat16")
    dtype32, model32 = _one_step(tiny_assets.student, "float32")
    assert (dtype16, dtype32) == (torch.bfloat16, torch.float32)
    assert all(p.dtype == torch.float32 for p in model16.parameters())  # master weights stay float32
    moved = [(a - b).abs().max().item() for a, b in zip(model16.parameters(), model32.parameters())]
    assert 0 < max(moved) < 1e-2  # the same step, rounded differently
    auto, _ = _one_step(tiny_assets.student, "auto")
    assert auto == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def test_grad_scaler_step_equals_the_plain_step(tiny_assets):
    """The float16 path's scaler: gradients unscaled before clipping, so the clipped gradients and the update
    are the plain step's (checked with the CPU scaler; kdqa uses the CUDA one for float16). AdamW alone would
    hide a missing unscale (its update ignores a constant gradient scale); the clipped gradients do not."""
    import torch

    _, plain = _one_step(tiny_assets.student, "float32")
    _, scaled = _one_step(tiny_assets.student, "float32", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_float16_off_cuda_is_one_error_before_training(run_copy):
    from conftest import run_cli
    from reliability_kit import assert_one_line_error

    tiny.write_params(run_copy / "params.yaml", "./inputs/teacher", "./inputs/student", "./inputs/train.json",
                      "./inputs/dev.json", student__precision="float16")
    result = run_cli(["student"], run_copy, expect_ok=False)
    assert_one_line_error(result, "student.precision: float16 trains on CUDA only")
    assert not (run_copy / "models" / "student").exists() and not (run_copy / "logs" / "student").exists()


def test_checkpoints_do_not_cross_precisions():
    import torch

    from pipeline.params import Params
    from pipeline.stages.student import training_key

    params = Params()
    assert training_key(params, {}, torch.bfloat16) != training_key(params, {}, None)
    params.student.precision = "bfloat16"
    assert training_key(params, {}, torch.bfloat16) != training_key(Params(), {}, torch.bfloat16)


def test_attention_dropout_zero_lets_the_fused_cpu_attention_kernel_train(tiny_assets):
    """student.attention_dropout reaches the model (null keeps the model's own), and at 0 PyTorch's fused (flash)
    CPU attention runs the training step, which it refuses with dropout: the reason for `student.attention`'s
    own CPU attention (tests/test_attention.py)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.params import StudentParams
    from pipeline.stages.student import build_student

    cpu = torch.device("cpu")
    own = build_student(StudentParams(model=str(tiny_assets.teacher)), cpu).config.attention_probs_dropout_prob
    assert own > 0
    off = build_student(StudentParams(model=str(tiny_assets.teacher), attention_dropout=0.0), cpu)
    assert off.config.attention_probs_dropout_prob == 0.0
    q = torch.randn(2, 2, 8, 4, requires_grad=True)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=0.0).sum().backward()
        try:
            with warnings.catch_warnings():  # the refusal, explained in two UserWarnings before the error
                warnings.simplefilter("ignore", UserWarning)
                F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=own)
            fused_takes_dropout = True
        except RuntimeError:
            fused_takes_dropout = False
    assert not fused_takes_dropout


def test_gradient_checkpointing_recomputes_layers_and_learns_the_same(tiny_assets):
    """student.gradient_checkpointing trades compute for memory only: each layer runs again in the backward pass
    (under the same dropout masks), and two steps with dropout on leave the weights they leave without it. So a
    checkpoint resumes across the setting."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from pipeline.params import Params, StudentParams
    from pipeline.stages.student import build_student, training_key
    from pipeline.training.step import build_optimizer, train_step

    def two_steps(checkpointing: bool):
        settings = StudentParams(model=str(tiny_assets.student), precision="float32", temperature=2.0,
                                 distillation_weight=0.5, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = build_student(settings, torch.device("cpu")).train()
        assert model.config.hidden_dropout_prob > 0  # dropout on: the recomputation must replay its masks
        calls = []
        # inside the layer: transformers checkpoints the layer's forward, so the layer's own hooks run once
        model.base_model.encoder.layer[0].intermediate.register_forward_hook(lambda *_: calls.append(1))
        optimizer = build_optimizer(model, 1e-3, 0.01, torch.device("cpu"))
        scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10)
        batch = _tiny_batch(model.config.vocab_size)
        for _ in range(2):
            train_step(model, batch, optimizer, scheduler, settings, 1, torch.device("cpu"), None)
        return model, len(calls)

    plain, plain_calls = two_steps(False)
    recomputed, recomputed_calls = two_steps(True)
    assert (plain_calls, recomputed_calls) == (2, 4)  # forward, and forward again in each backward
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(a, b)
    on = Params()
    on.student.gradient_checkpointing = True
    assert training_key(on, {}, None) == training_key(Params(), {}, None)


def test_gradient_checkpointing_auto_is_on_for_cpu_training_only(tmp_path):
    """`auto` (the default) recomputes layers on a CPU, where the job's peak memory is the machine's RAM, and not
    on CUDA; true and false are kept as given, and nothing else is a yes/no answer."""
    import pytest
    import torch

    from pipeline.params import StudentParams, load_params
    from pipeline.runtime.errors import KdqaError
    from pipeline.stages.student import uses_gradient_checkpointing

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert StudentParams().gradient_checkpointing == "auto"
    assert uses_gradient_checkpointing(StudentParams(), cpu) and not uses_gradient_checkpointing(StudentParams(), cuda)
    for given in (True, False):
        assert uses_gradient_checkpointing(StudentParams(gradient_checkpointing=given), cpu) is given
        assert uses_gradient_checkpointing(StudentParams(gradient_checkpointing=given), cuda) is given
    for text, wanted in (("true", True), ("false", False), ("auto", "auto")):
        (tmp_path / "params.yaml").write_text(f"student:\n  gradient_checkpointing: {text}\n")
        assert load_params(tmp_path / "params.yaml").student.gradient_checkpointing == wanted
    for text in ("1", "yes please", "0.5"):
        (tmp_path / "params.yaml").write_text(f"student:\n  gradient_checkpointing: {text}\n")
        with pytest.raises(KdqaError, match=r"student.gradient_checkpointing must be one of auto, true, false"):
            load_params(tmp_path / "params.yaml")
