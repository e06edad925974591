"""Block-wise reconstruction before end-to-end training (EfficientQAT's Block-AP, arXiv 2407.11062).

For decoder block k = 0 … L−1 in order, on calibration sequences of the recipe's training data:

    x_0 = x̂_0 = the embeddings                    (the embeddings and head are not trained here)
    target   y_k = B_k(x_k),  x_{k+1} = y_k        the full-precision block on the full-precision input
    input    x̂_k = B̂_{k−1}(… B̂_0(x̂_0))           the already reconstructed ternary blocks' output
    loss     L_k = Σ_{t≥1} ‖B̂_k(x̂_k) − y_k‖² / Σ_{t≥1} ‖y_k‖²    over a batch, position 0 left out

so each block learns to cancel what comes from upstream. B̂_k is the block as deployed (BitLinear at
λ = 1: ternary weights, int8 activations, straight-through gradients); trained: all its parameters
(master weights, norms; with `block_equalize`, per-channel scales folded into them at the block's end,
bitft.train.equalize); AdamW without weight decay (the run's betas and eps), linear warmup then cosine
to 0 over `block_steps`; the error on held-out calibration sequences (more training blocks, never the
recipe's eval blocks) every `block_eval_steps` steps, and a stop after `block_patience` evaluations
without a new best; the best weights are kept. The plain MSE is dominated by position 0's massive
activations (~3,800 against ~15 from block 11 of SmolLM2, where it stops learning); the relative error
without position 0 is what the probe in docs/studies/blockwise.md found to train.

Memory: the model, one block's gradients and AdamW state, and two activation streams of N × T × d values
(x, overwritten by y block after block, and x̂), in memory or, with `block_activations: disk` (auto: when
they would take over half the available memory), in memory-mapped files under OUTPUT_DIR/blockwise.
Llama-3-8B: see docs/studies/blockwise.md.

Resuming: OUTPUT_DIR/blockwise/ holds block_K.pt for every finished block and state.pt (the block being
trained and the step that comes next, its weights, best weights, AdamW and schedule, the losses so far),
written every `block_save_steps` and on a preemption signal (then exit 75, bitft.train.preempt). A
relaunch recomputes both streams through the original and the finished blocks (the same arithmetic,
the same bits) and goes on; the batches of step s of block k are a function of (seed, k, s), so the
losses of a resumed run are those of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from bitft.bitlinear import clear_weight_cache
from bitft.errors import ConfigError, Preempted
from bitft.files import write_text_atomic
from bitft.train import equalize

logger = logging.getLogger("bitft")


class _Stop(Exception):
    """Raised by a hook to end a model forward once the first block's input is known."""


def phase_complete(output_dir) -> bool:
    """Whether OUTPUT_DIR/blockwise holds every block of a finished phase (then any launch loads them, no stream)."""
    path = Path(output_dir) / "blockwise" / "summary.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("complete"))


def check_blockwise(first_lambda: float, use_peft: bool, world_size: int, ternary_init: str, complete: bool = False) -> None:
    """One ConfigError line for a run the block phase cannot serve (a finished phase only loads its blocks)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    why = None
    if first_lambda != 1.0:
        why = f"the schedule starts at λ={first_lambda:g}: it trains the deployed λ=1 forward (set lambda_warmup_steps: 0)"
    elif use_peft:
        why = "use_peft: it trains the master weights, not LoRA adapters"
    elif is_deepspeed_zero3_enabled():
        why = "DeepSpeed ZeRO-3 partitions the weights it trains block by block: use ZeRO-2 or DDP"
    elif world_size > 1 and not complete:
        why = (f"it runs in one process, this launch has {world_size}: run the same command with --num_processes 1 "
               "--max_steps 0 first (the phase is kept in output_dir/blockwise), then this one")
    elif ternary_init != "absmean":
        why = f"ternary_init {ternary_init} rewrites the master weights after it: keep ternary_init: absmean"
    if why:
        raise ConfigError(f"block_steps > 0 (block-wise reconstruction): {why}")


def calibration_ids(train_set, n: int) -> torch.Tensor:
    """[n, T] token ids: the first N blocks of the recipe's training data, in its order."""
    import itertools

    items = [torch.as_tensor(x["input_ids"]) for x in itertools.islice(iter(train_set), n)]
    if len(items) < n:
        raise ConfigError(f"block_calibration_blocks + block_heldout_blocks = {n}, but the training data has {len(items)} blocks")
    return torch.stack(items)


class Streams:
    """The model's decoder blocks called one at a time on stored activations, with the keyword arguments
    (rotary embeddings, mask, positions) that the model passes each block for a batch of B sequences."""

    def __init__(self, model, ids: torch.Tensor, batch: int, folder: Path, disk: bool):
        from bitft.train.feature_kd import decoder_layers

        self.layers, self.batch = decoder_layers(model), batch
        self.kwargs: dict[int, dict] = {}
        device = next(model.parameters()).device
        n, t = ids.shape
        d, dtype = model.config.hidden_size, next(self.layers[0].parameters()).dtype
        self.x, self.xq = (self._empty(folder / f"{name}.bin", (n, t, d), dtype, disk) for name in ("x", "xq"))

        def pre(k):
            def hook(mod, args, kwargs):
                if k not in self.kwargs:
                    self.kwargs[k] = {a: v for a, v in kwargs.items() if a != "hidden_states"}
                if k == 0:
                    self._x0 = args[0] if args else kwargs["hidden_states"]
                    if len(self.kwargs) == len(self.layers):
                        raise _Stop
            return hook

        hooks = [layer.register_forward_pre_hook(pre(k), with_kwargs=True) for k, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                for i in range(0, n, batch):
                    try:
                        model(ids[i:i + batch].to(device), use_cache=False)
                    except _Stop:
                        pass
                    self.x[i:i + batch] = self._x0.to(self.x.device)
        finally:
            for h in hooks:
                h.remove()
        self.xq.copy_(self.x)

    @staticmethod
    def _empty(path: Path, shape, dtype, disk: bool) -> torch.Tensor:
        if not disk:
            return torch.empty(shape, dtype=dtype)
        size = math.prod(shape)
        path.unlink(missing_ok=True)
        return torch.from_file(str(path), shared=True, size=size, dtype=dtype).view(shape)

    def block(self, k: int, x: torch.Tensor) -> torch.Tensor:
        with parametrize.cached():  # block_equalize: each parametrized weight computed once per forward
            out = self.layers[k](x, **self.kwargs[k])
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def advance(self, k: int, stream: torch.Tensor) -> None:
        """STREAM ← block k (as it is now) applied to it, one batch at a time, in place."""
        dev = self.kwargs_device()
        for i in range(0, stream.shape[0], self.batch):
            stream[i:i + self.batch] = self.block(k, stream[i:i + self.batch].to(dev)).to(stream.device)

    def kwargs_device(self):
        return next(self.layers[0].parameters()).device


def relative_error(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{t≥1} ‖out − target‖², Σ_{t≥1} ‖target‖²) in float32."""
    t = target[:, 1:].float()
    return (out[:, 1:].float() - t).pow(2).sum(), t.pow(2).sum()


def _batches(seed: int, k: int, step: int, n: int, b: int) -> torch.Tensor:
    """Indices of the batch of step STEP of block K: epoch e's seeded permutation of the N training sequences."""
    epoch, offset = divmod(step * b, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + k * 10_007 + epoch))
    return perm[offset:offset + b]


def _save(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def reconstruct(model, ids: torch.Tensor, cfg, args, preempt=None) -> dict:
    """Train the decoder blocks of MODEL (BitLinear at λ=1) one by one (module docstring); returns the summary.
    IDS: [n_train + n_heldout, T] calibration sequences; CFG: BlockwiseArguments; ARGS: TrainingArguments;
    PREEMPT: the run's PreemptionCallback (its handler records a signal here; the phase stops after the step).
    A finished phase (`phase_complete`) is loaded block by block instead, with no activation computed."""
    if phase_complete(args.output_dir):
        from bitft.train.feature_kd import decoder_layers

        folder = Path(args.output_dir) / "blockwise"
        for k, layer in enumerate(decoder_layers(model)):
            layer.load_state_dict(torch.load(folder / f"block_{k}.pt", weights_only=True, map_location="cpu"))
        logger.info("block-wise phase: finished before, its %d blocks loaded from %s", k + 1, folder)
        return json.loads((folder / "summary.json").read_text())
    if preempt is not None:
        preempt.phase = "blockwise"
    try:
        return _reconstruct(model, ids, cfg, args, preempt)
    finally:
        if preempt is not None:
            preempt.phase = "before"


def _reconstruct(model, ids, cfg, args, preempt) -> dict:
    from bitft.diagnose import available_memory
    from bitft.surgery import bit_linears, set_lambda

    t0 = time.perf_counter()
    device = getattr(args, "device", None)
    if device is not None and next(model.parameters()).device != device:
        model.to(device)  # on a GPU: where the Trainer would put it; the streams stay in host memory or files
    folder = Path(args.output_dir) / "blockwise"
    folder.mkdir(parents=True, exist_ok=True)
    n_val = cfg.block_heldout_blocks
    n_train = ids.shape[0] - n_val
    stream_bytes = 2 * ids.numel() * model.config.hidden_size * next(model.parameters()).element_size()
    disk = cfg.block_activations == "disk" or (cfg.block_activations == "auto" and stream_bytes > available_memory() / 2)
    summary_path = folder / "summary.json"
    was_training = model.training
    if cfg.block_equalize:  # before any stream: a model it cannot fold is refused in one line
        equalize.check(model)
    model.eval()  # no dropout; gradients flow all the same
    set_lambda(model, 1.0)
    streams = Streams(model, ids, cfg.block_batch_size, folder, disk)
    state = torch.load(folder / "state.pt", weights_only=False) if (folder / "state.pt").is_file() else None
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"blocks": []}
    logger.info("block-wise reconstruction: %d blocks, %d calibration + %d held-out sequences of %d tokens, "
                "streams %.1f MiB in %s%s", len(streams.layers), n_train, n_val, ids.shape[1], stream_bytes / 2**20,
                "files" if disk else "memory", f"; resuming at block {state['block']} step {state['step']}" if state else "")
    for k, layer in enumerate(streams.layers):
        bls = list(bit_linears(layer).values())
        for m in bls:
            m.lam = 0.0
        streams.advance(k, streams.x)  # targets y_k: the original block on the full-precision stream
        for m in bls:
            m.lam = 1.0
        done = folder / f"block_{k}.pt"
        if done.is_file():
            layer.load_state_dict(torch.load(done, weights_only=True))
        else:
            if state is not None and state["block"] != k:
                raise ConfigError(f"{folder}/state.pt is for block {state['block']} but block {k} is next: "
                                  "the folder is from another run; remove it to start the block phase again")
            if cfg.block_equalize:  # before the state's load: its keys include the scales
                equalize.attach(layer, model.config)
            record = _train_block(streams, k, n_train, n_val, cfg, args, state, folder, preempt)
            if cfg.block_equalize:
                record["equalize"] = equalize.fold(layer)  # s's range per vector; a plain block again
            state = None
            _save(done, {n: v.detach().clone() for n, v in layer.state_dict().items()})
            summary["blocks"].append(record)
            write_text_atomic(summary_path, json.dumps(summary, indent=1))
            (folder / "state.pt").unlink(missing_ok=True)
        streams.advance(k, streams.xq)
    summary["minutes_this_launch"] = round((time.perf_counter() - t0) / 60, 2)  # streams and training, all blocks
    summary["block_train_minutes"] = round(sum(r["minutes"] for r in summary["blocks"]), 2)
    summary["complete"] = True
    write_text_atomic(summary_path, json.dumps(summary, indent=1))
    for name in ("x.bin", "xq.bin"):
        (folder / name).unlink(missing_ok=True)
    model.train(was_training)
    return summary


def _held_out(streams, k, n_train, n_val) -> float:
    num = den = 0.0
    with torch.no_grad():
        dev = streams.kwargs_device()
        for i in range(n_train, n_train + n_val, streams.batch):
            e, d = relative_error(streams.block(k, streams.xq[i:i + streams.batch].to(dev)),
                                  streams.x[i:i + streams.batch].to(dev))
            num, den = num + e.item(), den + d.item()
    return num / den


def _train_block(streams, k, n_train, n_val, cfg, args, state, folder, preempt) -> dict:
    """Train block K on (x̂_k → y_k); restores its best held-out weights; returns the block's record."""
    from transformers import get_cosine_schedule_with_warmup

    layer, b = streams.layers[k], streams.batch
    params = [p.requires_grad_(True) for p in layer.parameters()]
    opt = torch.optim.AdamW(equalize.param_groups(layer, cfg.block_equalize_learning_rate), lr=cfg.block_learning_rate,
                            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, cfg.block_warmup_steps, cfg.block_steps)
    dev = streams.kwargs_device()
    t_start = time.perf_counter()
    if state is None:
        first = _held_out(streams, k, n_train, n_val)
        state = {"block": k, "step": 0, "losses": [], "held_out": [first], "best": first, "bad": 0, "minutes": 0.0,
                 "best_weights": {n: v.detach().clone() for n, v in layer.state_dict().items()}}
    else:
        if set(state["weights"]) != set(layer.state_dict()):
            raise ConfigError(f"{folder}/state.pt holds other tensors than block {k} has now (block_equalize changed?): "
                              "relaunch with the config it was written with, or remove the folder to start again")
        layer.load_state_dict(state["weights"])
        clear_weight_cache()  # parametrized weights (block_equalize) are new tensors: no version counter tells
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])

    base = state["minutes"]  # minutes spent on this block by earlier launches

    def save():
        state.update(weights=layer.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                     minutes=base + (time.perf_counter() - t_start) / 60)
        _save(folder / "state.pt", state)

    while state["step"] < cfg.block_steps and state["bad"] < cfg.block_patience:
        idx = _batches(args.seed, k, state["step"], n_train, b)
        err, den = relative_error(streams.block(k, streams.xq[idx].to(dev)), streams.x[idx].to(dev))
        loss = err / den
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["losses"].append(round(loss.item(), 6))
        if not math.isfinite(state["losses"][-1]):
            raise ConfigError(f"block {k}: the loss is {state['losses'][-1]} at step {state['step']}: "
                              "lower block_learning_rate")
        if state["step"] % cfg.block_eval_steps == 0 or state["step"] == cfg.block_steps:
            e = _held_out(streams, k, n_train, n_val)
            state["held_out"].append(e)
            if e < state["best"]:
                state["best"], state["bad"] = e, 0
                state["best_weights"] = {n: v.detach().clone() for n, v in layer.state_dict().items()}
            else:
                state["bad"] += 1
        if preempt is not None and preempt.received is not None:
            save()
            stop = Preempted(f"{preempt.received.name}: block-wise phase stopped after block {k} step {state['step']}, "
                             f"{folder}/state.pt written; exit status 75 (requeue): relaunch the same command to resume")
            stop.restore = preempt.restore
            raise stop
        if cfg.block_save_steps and state["step"] % cfg.block_save_steps == 0:
            save()
    layer.load_state_dict(state["best_weights"])
    clear_weight_cache()
    minutes = base + (time.perf_counter() - t_start) / 60
    logger.info("block %d: %d steps%s, held-out error %.4f -> %.4f (%.2f min)", k, state["step"],
                " (early stop)" if state["step"] < cfg.block_steps else "", state["held_out"][0], state["best"], minutes)
    return {"block": k, "steps": state["step"], "held_out_before": state["held_out"][0], "held_out_after": state["best"],
            "held_out": state["held_out"], "losses": state["losses"], "minutes": round(minutes, 3)}
