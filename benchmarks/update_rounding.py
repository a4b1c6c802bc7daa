"""Does a LoRA layer keep the first, tiny updates? Two diagnostics behind nf4.py's one-GEMM forward.

  --gemm        the share of a random update C at 1e-3 of the base output that survives in bf16
                C.addmm_(x, W^T), addmm(C, x, W^T) and (x W^T) + C, against one rounding of x W^T + C
                and nf4.py's one GEMM over [x | h] and [W | bs] (1.0: rounded once; ~0.5: the product is rounded
                before C is added), for the 8B layer shapes on CUDA (one small shape on CPU).
  --first-step  the loss change from one step on every lora_B (-lr * sign(grad), what Adam's first step is)
                on the benchmark's 8B-width model (2 layers, NF4, bf16 autocast), under: the plain recipe
                (prepare_model_for_kbit_training + PEFT), fp32 compute (the reference), and the bf16 residual
                stream with tunekit's 4-bit function or with PEFT's forward. Runs on CPU in about 2 minutes.

    python3 benchmarks/update_rounding.py --gemm --device cuda   # on the GPU machine
    python benchmarks/update_rounding.py --first-step      # CPU (or --device cuda)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gemm(device: str) -> None:
    import torch

    from tunekit.backends.local.nf4 import one_gemm, wide_width, widen

    torch.manual_seed(0)
    shapes = [(2048, 4096, 4096), (2048, 4096, 1024), (8192, 4096, 14336), (8192, 14336, 4096)]
    for (m, k, n) in shapes if device == "cuda" else [(512, 1024, 1024)]:
        x = torch.randn(m, k, device=device).bfloat16()
        w = (torch.randn(n, k, device=device) * 0.02).bfloat16()
        base = x @ w.t()
        h = torch.randn(m, 16, device=device).bfloat16()  # the update is h bs^T, rank 16, at 1e-3 of the base
        bs = torch.randn(n, 16, device=device)
        bs = (bs * 1e-3 * base.float().pow(2).mean().sqrt() / (h.float() @ bs.t()).pow(2).mean().sqrt()).bfloat16()
        u = h.double() @ bs.double().t()
        c = h @ bs.t()

        def kept(y):
            return round(float(((y.double() - base.double()) * u).sum() / (u * u).sum()), 3)

        print({"device": device, "shape": [m, k, n], "in_place_addmm_": kept(c.clone().addmm_(x, w.t())),
               "addmm": kept(torch.addmm(c, x, w.t())), "product_then_add": kept(base + c),
               "one_gemm_nf4": kept(one_gemm(x, h, widen(w, bs, wide_width(k, 16))))}, flush=True)


def first_step(device: str, seq: int, batch: int, lr: float) -> None:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    import benchmarks.train_throughput as tb
    from tunekit.backends.local import kernels

    p = {"model": f"/tmp/tunekit-bench/llama-3.1-8b-L2-{device}", "shape": "llama-3.1-8b", "layers": 2,
         "device": device}
    tb.build_model(p)
    tok = AutoTokenizer.from_pretrained(p["model"])
    rows = tb.check_rows(tok, batch, seq, 42)  # the batch of the benchmark's --check-loss
    batch_t = [t.to(device) for t in tb.collate(tb.encode(tok, rows), tok.pad_token_id)]

    def model(upcast: bool, fast: bool, cdt=torch.bfloat16):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=cdt)
        m = AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.bfloat16, quantization_config=q,
                                                 **({"device_map": {"": 0}} if device == "cuda" else {}))
        if upcast:
            m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)
        torch.manual_seed(42)
        m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
        for q_ in m.parameters():
            if q_.requires_grad:
                q_.data = q_.data.float()  # fp32 adapters, as both recipes train them
        if fast:
            kernels.patch_lora(m)
        return m.train()

    def loss(m, autocast=True):
        ids, mask, labels = batch_t
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return m(input_ids=ids, attention_mask=mask, labels=labels).loss

    ref = model(True, False)
    loss(ref).backward()
    step = {n: -lr * torch.sign(q_.grad) for n, q_ in ref.named_parameters() if "lora_B" in n}

    def delta(m, name, autocast=True):
        with torch.no_grad():
            before = float(loss(m, autocast))
            for n, q_ in m.named_parameters():
                if n in step:
                    q_.copy_(step[n])
            after = float(loss(m, autocast))
        print({"forward": name, "loss_before": round(before, 4), "loss_after": round(after, 4),
               "change": round(after - before, 4)}, flush=True)

    delta(ref, "plain recipe (fp32 residual stream, PEFT adds the update in fp32)")
    del ref
    delta(model(True, False, torch.float32), "fp32 compute (reference)", autocast=False)
    delta(model(False, True), "bf16 residual stream, tunekit's 4-bit function (one rounding)")
    delta(model(False, False), "bf16 residual stream, PEFT's forward (rounds the base output, then the sum)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemm", action="store_true")
    ap.add_argument("--first-step", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    a = ap.parse_args(argv)
    if not (a.gemm or a.first_step):
        ap.error("choose --gemm and/or --first-step")
    if a.gemm:
        gemm(a.device)
    if a.first_step:
        first_step(a.device, a.seq, a.batch, a.lr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
