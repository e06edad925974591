"""Time of the distillation loss and its gradient: the one-pass form against separate tensor ops.

    python scripts/bench_kd_loss.py [--batch 2] [--seq 128] [--vocab 49152] [--hidden 576] [--repeats 7] [--threads 2]

Both compute 0.5·CE + 0.5·KL(p_T ‖ p_S) at τ = 1 from the student's logits and the teacher's last
hidden state (its LM head inside the loss), forward and backward, on random tensors of the demo's
shapes by default:
- `separate`: the model's CE (F.cross_entropy on the shifted logits, what a Hugging Face causal LM
  computes) plus the KL from two log-softmaxes, as separate tensor ops over the whole logits;
- `one-pass`: bitft.train.logits_kd.ce_and_kd (the recipe's loss).
The two alternate in one process; the table gives the median and the fastest of --repeats rounds,
and the largest gradient difference between them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bitft.train.logits_kd import ce_and_kd, next_token_targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("batch", 2), ("seq", 128), ("vocab", 49152), ("hidden", 576), ("repeats", 7), ("threads", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(args.batch, args.seq, args.hidden)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    base = torch.randn(args.batch, args.seq, args.vocab) * 3
    n = args.batch * (args.seq - 1)

    def separate():
        logits = base.clone().requires_grad_()
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), labels[:, 1:].reshape(-1))
        with torch.inference_mode():
            log_p_t = F.log_softmax(head(hidden[:, :-1]).float(), dim=-1)
        kl = (log_p_t.exp() * (log_p_t - F.log_softmax(logits[:, :-1], dim=-1))).sum() / n
        (0.5 * ce + 0.5 * kl).backward()
        return logits.grad

    def one_pass():
        logits = base.clone().requires_grad_()
        ce_and_kd(logits, next_token_targets(labels), hidden, head, 0.5 / n, 0.5 / n)[0].backward()
        return logits.grad

    forms = {"separate": separate, "one-pass": one_pass}
    times = {k: [] for k in forms}
    for _ in range(args.repeats):
        for k, f in forms.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    diff = (separate() - one_pass()).abs().max().item()
    ref = statistics.median(times["separate"])
    print(f"\n{args.batch} × {args.seq} tokens, vocabulary {args.vocab}, hidden {args.hidden}, {args.threads} threads, "
          f"{args.repeats} rounds; largest gradient difference {diff:.2e}\n")
    print("| loss form | median s | fastest s | × separate |\n|---|---|---|---|")
    for k, ts in times.items():
        print(f"| {k} | {statistics.median(ts):.3f} | {min(ts):.3f} | {statistics.median(ts) / ref:.2f} |")


if __name__ == "__main__":
    main()
