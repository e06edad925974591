"""How far sparse (top-k + tail) distillation is from the full KL, on a real model and real text.

    python scripts/kd_topk_error.py [--student smollm2] [--teacher smollm2] [--blocks 8] [--k 8 16 32 64 256 1024]

Student: a model at λ=1 (default: SmolLM2-135M-Instruct converted, untrained: the start of a warmup;
pass a trained checkpoint to see the end); teacher: the full-precision model (default: the same
source at λ=0). Data: the demo's held-out blocks (text shipped with bitft, 128 tokens each).
For each k it prints, over all positions: the teacher's probability mass in its top k, the sparse KL
as a fraction of the full KL, and the gradient of the sparse KD in the student's logits against the
full KD's (cosine, relative L2 error) — the numbers behind the choice of k (docs/studies/recipe_study.md).
"""

from __future__ import annotations

import argparse

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="smollm2")
    p.add_argument("--teacher", default=None, help="default: the student's source at λ=0 (full precision)")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64, 256, 1024])
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args()
    torch.manual_seed(0)

    import bitft
    from bitft.data.pretrain import build_datasets
    from bitft.sources import load_model
    from bitft.train.distill import kd_loss_sum, plain_copy
    from bitft.train.sparse_kd import sparse_kd_sum, teacher_top_k

    student = load_model(args.student, lam=1.0, convert={})  # a full-precision source: converted on the fly
    tok = student.tokenizer
    teacher = plain_copy(load_model(args.teacher).model) if args.teacher else plain_copy(student.model)
    bitft.set_lambda(student.model, 1.0)
    _, held_out = build_datasets(tok, ["shipped:demo/pretrain"], block_size=128, eval_blocks=args.blocks, seed=42)
    ids = torch.stack([held_out[i]["input_ids"] for i in range(len(held_out))])
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    with torch.inference_mode():
        hidden = teacher.base_model(input_ids=ids).last_hidden_state[:, :-1]
        z_s = student.model(input_ids=ids).logits[:, :-1].float()
    head, tau = teacher.get_output_embeddings(), args.temperature
    z_s = z_s.clone().requires_grad_(True)
    full = kd_loss_sum(z_s, hidden, head, mask, tau)
    (g_full,) = torch.autograd.grad(full, z_s)
    print(f"student {args.student} (λ=1), teacher {args.teacher or args.student + ' (λ=0)'}; "
          f"{int(mask.sum())} positions, τ={tau:g}, vocabulary {head.weight.shape[0]:,}; full KL/token "
          f"{float(full.detach()) / int(mask.sum()):.4f}\n")
    print("| k | teacher mass in top k | sparse KL / full KL | gradient cosine | gradient rel. L2 error | cache bytes/token |")
    print("|---|---|---|---|---|---|")
    id_bytes = 2 if head.weight.shape[0] <= 1 << 16 else 4
    for k in args.k:
        logp, top = teacher_top_k(hidden, head, k, tau)
        sparse = sparse_kd_sum(z_s, logp.half().float(), top, mask, tau)  # as the cache stores them
        (g,) = torch.autograd.grad(sparse, z_s)
        cos = torch.nn.functional.cosine_similarity(g.flatten(), g_full.flatten(), dim=0)
        rel = (g - g_full).norm() / g_full.norm()
        mass = logp.exp().sum(-1).mean()
        print(f"| {k} | {float(mass):.4f} | {float(sparse.detach() / full.detach()):.4f} | {float(cos):.4f} | {float(rel):.4f} | "
              f"{4 + k * (2 + id_bytes)} |")


if __name__ == "__main__":
    main()
