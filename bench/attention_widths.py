"""What the first step at a new batch width costs: a bert-medium-shaped QA model (random weights, batch 16) takes
one training step at each of 41 widths (64..384 by 8), twice over (pass 1: every width new to the process; pass 2:
all seen), in float32 and in bfloat16 autocast with PyTorch's cuDNN attention backend off and on.

    python -m bench.attention_widths      # meant for a GPU; on a CPU it runs a tiny model as a smoke test

On CUDA, cuDNN's fused attention builds an execution plan per input shape the first time it meets it; the
student stage's length-grouped batches bring many widths, so a short run pays that on most of its steps.
Results: bench/results/attention-widths-h200.md."""

import argparse
import time


def main(argv=None) -> None:
    argparse.ArgumentParser(prog="python -m bench.attention_widths", description=__doc__.split("\n\n")[0]).parse_args(argv)
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = dev.type == "cpu"
    cfg = BertConfig(vocab_size=30522, hidden_size=512 if not small else 64, num_hidden_layers=8 if not small else 1,
                     num_attention_heads=8 if not small else 2, intermediate_size=2048 if not small else 128,
                     attn_implementation="sdpa")
    widths = list(range(64, 385, 8)) if not small else [16, 24]

    def run(label, dtype, cudnn):
        if dev.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        torch.manual_seed(0)
        model = BertForQuestionAnswering(cfg).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        for p in (1, 2):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for w in widths:
                ids = torch.randint(1000, 30000, (16, w), device=dev)
                with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
                loss = out.start_logits.float().logsumexp(-1).mean() + out.end_logits.float().logsumexp(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"{label:38s} pass {p}: {1000 * (time.perf_counter() - t) / len(widths):7.1f} ms/step over "
                  f"{len(widths)} widths", flush=True)

    print(torch.__version__, torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", flush=True)
    run("float32", None, True)
    run("bfloat16, cuDNN attention off", torch.bfloat16, False)
    run("bfloat16, cuDNN attention on", torch.bfloat16, True)
    run("bfloat16, cuDNN attention off (again)", torch.bfloat16, False)


if __name__ == "__main__":
    main()
