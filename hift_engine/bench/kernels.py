"""Fused optimizer kernels vs torch.optim and a device-to-device copy of the same bytes (the ceiling).

For a group shaped like one LLaMA-2-7B block (4 x 4096^2 + 3 x 4096*11008 = 202 M params) and for a whole
7B model's worth of parameters (when the card holds it: ~108 GB for AdamW), measures in one run:
  hift-kernel   our Triton update, one launch for the whole group (no gradient check)
  hift-step     HiFTOptimizer.step() on that group: norm/non-finite reduction + step counts + the kernel
  torch-fused   torch.optim.<Opt>(fused=True).step()   (AdamW, SGD)
  torch-foreach torch.optim.<Opt>(foreach=True).step()
  copy          the time dst.copy_(src) takes to move the same number of bytes (read + write), from the
                bandwidth of a 2 GiB device-to-device copy measured in the same run
Effective bandwidth counts the bytes an update must move: AdamW 28 B/param in fp32, AdaGrad/SGD 20.
With --dtype bf16-mixed the parameters and gradients are bf16 and the fp32 masters sit in the state (AdamW 30
B/param): the hift rows are the mixed-precision kernels, and torch-fused/foreach run torch.optim on fp32
masters with fp32 gradients (28 B/param, their GB/s counts those; a hand-written mixed loop also casts the
gradients up and the masters down, which these rows leave out), beside the same-bytes copy.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from .common import median_ms, print_table, require_cuda, write_result

LLAMA_BLOCK = [(4096, 4096)] * 4 + [(11008, 4096)] * 3


def shapes_for(name: str) -> list[tuple[int, ...]]:
    if name == "block":
        return list(LLAMA_BLOCK)
    if name == "7b":  # LLaMA-2-7B: embedding, 32 blocks (+2 norms each), final norm, LM head = 6.738 B params
        return [(32000, 4096)] + (LLAMA_BLOCK + [(4096,), (4096,)]) * 32 + [(4096,), (32000, 4096)]
    raise ValueError(name)


TORCH = {"adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
HPARAMS = {
    "adamw": dict(lr=1e-4, weight_decay=0.01),
    "adagrad": dict(lr=1e-3, weight_decay=0.01),
    "sgd": dict(lr=1e-3, momentum=0.9, weight_decay=0.01),
}


def bytes_per_param(optimizer: str, esize: int, master: bool = False, bf16_state: bool = False) -> int:
    from ..optim import FUSED_SPECS

    spec = FUSED_SPECS[optimizer]()
    hyper = spec.normalize({k: v for k, v in HPARAMS[optimizer].items() if k not in ("lr", "weight_decay")})
    return spec.bytes_per_param(hyper, esize, master, state_size=2 if bf16_state else 4)


def add_arguments(p) -> None:
    p.add_argument("--shape", choices=("block", "7b", "all"), default="all")
    p.add_argument("--optimizers", default="adamw,adagrad,sgd", help="comma-separated subset of adamw,adagrad,sgd")
    p.add_argument("--dtype", choices=("fp32", "bf16", "bf16-mixed"), default="fp32",
                   help="parameter dtype (state is fp32); bf16-mixed: bf16 parameters with fp32 masters in the state")
    p.add_argument("--state-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: AdamW's moments in bf16 with stochastic rounding (adamw only)")
    p.add_argument("--rep-ms", type=int, default=400, help="timing budget per provider (ms)")


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _params(shapes, dtype, dev, seed=0, grads=True):
    g = torch.Generator(device=dev).manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s, generator=g, device=dev, dtype=torch.float32).mul_(0.02).to(dtype)) for s in shapes]
    if grads:
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(1e-3).to(dtype)
    return ps


class _Holder(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.ps = nn.ParameterList(params)


def _time_kernel(opt_name, shapes, dtype, dev, rep_ms, master=False, bf16_state=False) -> float:
    """The kernel alone, on a group laid out exactly as the engine lays it out (flat state and gradients; with
    ``master``, the fp32 masters as state vector 0, equal to the rounded weights as in training)."""
    from ..layout import GroupLayout
    from ..optim import FUSED_SPECS

    spec = FUSED_SPECS[opt_name]()
    hyper = {**spec.normalize({k: v for k, v in HPARAMS[opt_name].items() if k not in ("lr", "weight_decay")}), **HPARAMS[opt_name]}
    ps = _params(shapes, dtype, dev, grads=False)
    lay = GroupLayout(0, [str(i) for i in range(len(ps))], ps, [0] * len(ps), len(spec.state_names(hyper)) + master, dev,
                      half_from=master if bf16_state else None)
    state = torch.zeros(lay.state_numel, dtype=torch.float32, device=dev)
    if master:
        for view, p in zip(lay.state_views(state, 0), ps):
            view.copy_(p.detach())
    grads = torch.randn(max(lay.grad_numel.values()), device=dev).mul_(1e-3).to(dtype)
    lay.steps.fill_(1)
    table = lay.table(lay.buckets[0])
    extra = {"moment_bf16": True, "seed": 1 << 32} if bf16_state else {}
    return median_ms(lambda: spec.kernel(table, lay.steps, grads, state, lay.state_stride, None, hyper, master=master, **extra),
                     rep_ms=rep_ms)


def _time_hift(opt_name, shapes, dtype, dev, rep_ms, master=False, bf16_state=False):
    """(kernel-only ms, HiFTOptimizer.step() ms) for one group of ``shapes``, through public interfaces only."""
    from ..optimizer import HiFTOptimizer

    t_kernel = _time_kernel(opt_name, shapes, dtype, dev, rep_ms, master, bf16_state)
    _free()
    # The whole step: gradients set by hand are applied by step(), as in torch.optim.
    model = _Holder(_params(shapes, dtype, dev, grads=False))
    opt = HiFTOptimizer(
        model, opt_name, groups=[[".*"]], no_decay=[], state_store="resident", kernels="triton",
        precision="bf16-mixed" if master else "fp32", state_dtype="bf16" if bf16_state else "fp32", **HPARAMS[opt_name]
    )
    gen = torch.Generator(device=dev).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=dev).mul_(1e-3).to(dtype)
    opt.step()  # first step: state allocation + compilation; the gradients stay (no zero_grad), as in torch
    t_step = median_ms(opt.step, rep_ms=rep_ms)
    opt.close()
    return t_kernel, t_step


def _time_torch(opt_name, shapes, dtype, dev, rep_ms, mode):
    params = _params(shapes, dtype, dev)
    kw = dict(HPARAMS[opt_name])
    try:
        opt = TORCH[opt_name](params, **kw, **{mode: True})
        opt.step()
    except (RuntimeError, ValueError, TypeError) as e:
        return None, str(e).splitlines()[0][:80]
    return median_ms(opt.step, rep_ms=rep_ms), None


COPY_BYTES = 2 << 30  # the ceiling is measured on a 2 GiB copy: far beyond L2, and size-independent here


def _copy_GBps(dev, rep_ms) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / median_ms(lambda: dst.copy_(src), rep_ms=rep_ms) / 1e6


def run(args) -> int:
    dev = require_cuda("kernels")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    master = args.dtype == "bf16-mixed"
    bf16_state = args.state_dtype == "bf16"
    esize = torch.tensor([], dtype=dtype).element_size()
    shapes_list = ["block", "7b"] if args.shape == "all" else [args.shape]
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for o in optimizers:
        if o not in TORCH:
            raise SystemExit(f"hift bench kernels: unknown optimizer {o!r}; use adamw, adagrad, sgd")
        if bf16_state and o != "adamw":
            raise SystemExit(f"hift bench kernels: --state-dtype bf16 is AdamW's (bf16 moments); drop {o!r}")
    rows, skipped = [], []
    copy_GBps = _copy_GBps(dev, args.rep_ms)
    _free()
    for shape in shapes_list:
        shapes = shapes_for(shape)
        n = sum(int(torch.Size(s).numel()) for s in shapes)
        free, _ = torch.cuda.mem_get_info(dev)
        for opt_name in optimizers:
            bpp = bytes_per_param(opt_name, esize, master, bf16_state)
            need = n * (2 * esize + bpp - 3 * esize) + (n * 12 if master else 0)  # params + grads + state (+ torch's fp32 copy)
            if need > 0.92 * free:
                skipped.append(f"{shape}/{opt_name}: needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
                continue
            moved = n * bpp
            t_copy = moved / copy_GBps / 1e6  # the time a copy moving the same bytes takes
            base = dict(shape=shape, optimizer=opt_name, dtype=args.dtype, state_dtype=args.state_dtype, params=n,
                        bytes_per_param=bpp)
            rows.append({**base, "provider": "copy", "ms": t_copy, "note": f"{COPY_BYTES >> 30} GiB d2d copy"})
            t_kernel, t_step = _time_hift(opt_name, shapes, dtype, dev, args.rep_ms, master, bf16_state)
            _free()
            rows.append({**base, "provider": "hift-kernel", "ms": t_kernel})
            rows.append({**base, "provider": "hift-step", "ms": t_step})
            if dtype == torch.float32 or master:  # under bf16-mixed torch runs on fp32 masters
                for mode in ("fused", "foreach"):
                    t, err = _time_torch(opt_name, shapes, torch.float32, dev, args.rep_ms, mode)
                    _free()
                    rows.append({**base, "provider": f"torch-{mode}", "ms": t, "note": err})
            torch_moved = n * bytes_per_param(opt_name, 4)  # torch.optim runs on fp32 (masters, under bf16-mixed)
            for r in rows:
                if r["shape"] == shape and r["optimizer"] == opt_name and r.get("ms"):
                    r["GB/s"] = (torch_moved if r["provider"].startswith("torch") else moved) / r["ms"] / 1e6
                    r["of_copy"] = t_copy / r["ms"]  # time against a copy of the hift bytes
            fused = next((r["ms"] for r in rows if r["shape"] == shape and r["optimizer"] == opt_name and r["provider"] == "torch-fused" and r.get("ms")), None)
            for r in rows:
                if r["shape"] == shape and r["optimizer"] == opt_name and fused and r.get("ms"):
                    r["vs_torch_fused"] = fused / r["ms"]
    cols = ["shape", "optimizer", "provider", "params", "ms", "GB/s", "of_copy", "vs_torch_fused", "note"]
    print_table(rows, cols, title=f"hift bench kernels ({args.dtype} params, {args.state_dtype} state)")
    for s in skipped:
        print(f"skipped {s}")
    summary = {}
    for r in rows:
        if r["provider"] == "hift-kernel" and r.get("ms"):
            key = f"{r['shape']}/{r['optimizer']}"
            summary[key] = {"of_copy": r.get("of_copy"), "vs_torch_fused": r.get("vs_torch_fused")}
    write_result(args.out, "kernels", rows, summary, skipped=skipped, dtype=args.dtype, state_dtype=args.state_dtype,
                 copy_GBps=copy_GBps)
    return 0
