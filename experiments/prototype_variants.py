"""Prototype variants of the MicroAdam step for the quality-gap experiments (issue 8, docs/results.md).

A research script, not library code: it replaces the step that ``MicroAdam`` calls with a simple
one-chunk torch version (float32 parameters, nearest error rounding) that has three extra switches,
trains a built-in task at 3 seeds, prints the metric's mean and standard deviation and appends them
to ``experiments/results.jsonl`` (not committed):

- ``"bc": "window"``: bias correction over the truncated window (divide the moment sums by the sum
  of the window's weights, ``sum(b^age)``, instead of ``(1 - b^t) / (1 - b)``);
- ``"alpha"``, ``"gamma"``: release a fraction ``gamma`` of the residual error as a dense move of
  per-quantization-block RMS ``alpha * lr``: what became ``MicroAdam(release=gamma,
  release_scale=alpha)``, where the sum of squares is taken in a fixed order, so its numbers differ
  from these in the last digits;
- ``"norm": "max"``: scale that move by the block's largest magnitude instead of its RMS.

Usage, from the repository root after ``bash setup.sh``::

    .venv/bin/python experiments/prototype_variants.py \\
        '{"task": "fashion", "steps": 400, "bs": 64, "opt": "microadam", "lr": 1e-2, "cfg": {"bc": "window"}}'

Fashion runs use 25,600 training and 2,000 test images, as the plans do; other tasks their default
sizes (charlm: a larger evaluation set than the plans' 256 sequences, so its losses differ a little
from the plans').
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import torch

import microadam.optimizer as optimizer_module
from microadam.bench.optimizers import build_optimizer
from microadam.bench.tasks import TaskSize, get_task
from microadam.functional import _pad_rows, step_scalars
from microadam.ops.quant import dequantize_blocks, pack_nibbles, quantize_blocks, unpack_nibbles
from microadam.ops.topk import block_topk

CFG: dict[str, Any] = {}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")


def prototype_step(param: torch.Tensor, grad: torch.Tensor, **kw: Any) -> None:
    """One step of the variant in ``CFG`` (the keyword arguments of ``functional.microadam_step``)."""
    lay, lr, cd = kw["layout"], kw["lr"], torch.float32
    n, B, k, q = lay.numel, lay.block, lay.k, lay.quant_block
    sc = step_scalars(
        step=kw["step"],
        window=lay.window,
        beta1=kw["beta1"],
        beta2=kw["beta2"],
        lr=lr,
        weight_decay=kw["weight_decay"],
        seed=kw["seed"],
        param_index=kw["param_index"],
    )
    c1, c2 = sc.c1, sc.c2
    if CFG.get("bc") == "window":
        c1, c2 = 1.0 / sum(sc.w1), 1.0 / sum(sc.w2)
    nb, nq = -(-n // B), -(-n // q)
    codes, bounds = kw["error_codes"], kw["error_bounds"]
    err = dequantize_blocks(_pad_rows(unpack_nibbles(codes, n), nq, q, 0), bounds[:, 0], bounds[:, 1], cd)
    a = grad.reshape(-1).to(cd) + err.view(-1)[:n]
    blocks = _pad_rows(a, nb, B, 0.0)
    mag = blocks.abs()
    if nb * B != n:
        mag.view(-1)[n:] = -1.0
    idx = block_topk(mag, k)
    vals = blocks.gather(1, idx)
    blocks.scatter_(1, idx, 0.0)
    if nb * B != n:
        padded = (idx + (torch.arange(nb) * B)[:, None]) >= n
        idx, vals = idx.masked_fill(padded, 0), vals.masked_fill(padded, 0.0)
    kw["window_indices"][sc.write_slot] = idx.to(torch.int16)
    kw["window_values"][sc.write_slot] = vals.to(torch.bfloat16)
    rest = blocks.view(-1)[:n]
    dense = None
    if CFG.get("alpha"):
        r = _pad_rows(rest, nq, q, 0.0)
        count = torch.full((nq,), float(q))
        count[-1] = n - (nq - 1) * q
        s = r.abs().amax(1) if CFG.get("norm") == "max" else (r.square().sum(1) / count).sqrt()
        dense = (CFG["alpha"] * r / torch.where(s > 0, s, 1.0)[:, None]).view(-1)[:n]
        rest = rest * (1 - CFG.get("gamma", 0.0))
    new_codes, lo, hi = quantize_blocks(_pad_rows(rest, nq, q, None), None)
    codes.copy_(pack_nibbles(new_codes.view(-1)[:n]))
    bounds[:, 0], bounds[:, 1] = lo, hi
    slots = torch.tensor(sc.slots)
    w1, w2 = torch.tensor(sc.w1, dtype=cd), torch.tensor(sc.w2, dtype=cd)
    win_val = kw["window_values"][slots].to(cd)
    pos = (kw["window_indices"][slots].to(torch.int64) + (torch.arange(nb) * B)[None, :, None]).view(-1)
    sm, ss = torch.zeros(nb * B), torch.zeros(nb * B)
    sm.scatter_add_(0, pos, (win_val * w1[:, None, None]).view(-1))
    ss.scatter_add_(0, pos, (win_val * win_val * w2[:, None, None]).view(-1))
    den = (c2 * ss[pos]).sqrt() + kw["eps"]
    u = torch.where(den > 0, c1 * sm[pos] / den, 0.0)
    flat = param.view(-1)
    full = flat.to(cd) * sc.decay
    if dense is not None:
        full = full - lr * dense
    full[pos] = full[pos] - lr * u
    flat.copy_(full)


def run(task_name: str, steps: int, batch: int, seed: int, opt: str, lr: float, overrides: dict[str, Any]) -> float:
    task = get_task(task_name)
    size = TaskSize(steps, batch, 25600, 2000, 0) if task_name == "fashion" else TaskSize(steps, batch)
    work = task.build(seed=seed, size=size, device=torch.device("cpu"))
    if opt == "microadam":
        overrides = {**overrides, "impl": "torch"}
    o = build_optimizer(opt, work.model, lr, **overrides)
    for _ in range(steps):
        o.zero_grad(set_to_none=True)
        work.loss(work.model, next(work.batches)).backward()
        o.step()
    return work.evaluate(work.model)[task.metric]


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print((__doc__ or "").strip() or "usage: python experiments/prototype_variants.py '<JSON spec>'")
        sys.exit(0 if len(sys.argv) == 2 else 2)
    spec = json.loads(sys.argv[1])
    CFG.clear()
    CFG.update(spec.get("cfg", {}))
    optimizer_module.microadam_step = prototype_step
    t0 = time.time()
    vals = [
        run(spec["task"], spec["steps"], spec["bs"], s, spec["opt"], spec["lr"], spec.get("ovr", {}))
        for s in spec.get("seeds", [0, 1, 2])
    ]
    out = dict(spec, vals=vals, mean=statistics.mean(vals), sd=statistics.stdev(vals) if len(vals) > 1 else 0.0)
    out["secs"] = round(time.time() - t0, 1)
    print(json.dumps(out))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
