"""Multi-process tests (CPU, gloo, 2 processes): FSDP2 / HSDP / DDP / DCP against single-process runs.

Each test spawns 2 processes with ``torch.multiprocessing`` (one spawn per test, several scenarios in it,
to keep the suite CI-sized); the reference single-process run happens inside each worker on the full
batch. FSDP2 on gloo averages gradients correctly only from torch 2.9 on, so everything is skipped below.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.torch_version import TorchVersion

import adalomo
from adalomo.distributed import UnshardedDistributedError, check_not_ddp, is_dtensor

pytestmark = [
    pytest.mark.skipif(TorchVersion(torch.__version__) < (2, 9),
                       reason="FSDP2 on gloo averages gradients correctly only from torch 2.9"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"),
]

WORLD = 2
STEPS = 10
BATCH = 4  # full batch; each of the 2 ranks gets 2 rows
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- model/data
class Net(nn.Module):
    """Odd shapes on purpose: 11- and 7-row matrices and a 3-row 3-D tensor (uneven over 2 ranks), a 1-row
    matrix and a 1-element bias (rank 1 holds an empty shard), 1-D weights."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.l1 = nn.Linear(8, 7)
        self.w3 = nn.Parameter(torch.randn(3, 7, 5) * 0.3)
        self.norm_w = nn.Parameter(torch.ones(5) + 0.1 * torch.randn(5))
        self.l2 = nn.Linear(5, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.l1(self.emb(x)))
        h = torch.einsum("btd,kde->btke", h, self.w3).mean(2) * self.norm_w
        return self.head(torch.tanh(self.l2(h))).sum(-1)  # not a view (FSDP2 warns on views)


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int, rank: int | None = None, bad: bool = False, world: int = WORLD):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 11, (BATCH, 3), generator=g)
    y = torch.randn(BATCH, 3, generator=g)
    if bad:  # an inf target: every gradient non-finite on every rank
        y[0, 0] = float("inf")
    if rank is None:
        return x, y
    per = BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def shard(model: Net, mesh=None) -> Net:
    from torch.distributed.fsdp import fully_shard

    for m in (model.l1, model.l2, model.head):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()}


# (name, factory(params), fused, two_pass_clipping)
OPTS = {
    "adalomo": (lambda ps, f: adalomo.AdaLomo(ps, lr=3e-2, weight_decay=0.1, fused=f), False),
    "adafactor": (lambda ps, f: adalomo.Adafactor(ps, beta1=0.9, weight_decay=0.01, fused=f), False),
    "adafactor_fixed_lr": (lambda ps, f: adalomo.Adafactor(ps, lr=1e-2, relative_step=False, scale_parameter=False,
                                                           fused=f), False),
    "lomo_clip": (lambda ps, f: adalomo.Lomo(ps, lr=5e-2, clip_grad_norm=0.5, fused=f), True),
    "adalomo_clip": (lambda ps, f: adalomo.AdaLomo(ps, lr=3e-2, clip_grad_norm=0.5, fused=f), True),
}


def local(opt):
    """The single-process reference run inside a worker: a plain model on every rank, on purpose."""
    opt.allow_unsharded_distributed = True
    return opt


def train(model, opt, steps, rank=None, fused=True, two_pass=False, start=0, bad_steps=(), world=WORLD):
    for s in range(start, start + steps):
        x, y = batch(s, rank, bad=s in bad_steps, world=world)
        loss = loss_fn(model, x, y)
        if fused:
            if two_pass:
                opt.grad_norm(loss)
            loss.backward()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def assert_close(a: dict, b: dict, what: str, exact: bool = False):
    assert a.keys() == b.keys()
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), f"{what}: {n} differs (max {(a[n] - b[n]).abs().max():.3g})"
        else:
            torch.testing.assert_close(a[n], b[n], rtol=2e-5, atol=2e-6, msg=lambda m, n=n: f"{what}: {n}: {m}")


# ----------------------------------------------------------------------------------------------- spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, module: str, scenario: str, tmp: str):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # Linear on 3-D input returns a view
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        importlib.import_module(module).SCENARIOS[scenario](rank, tmp)
        dist.barrier()  # every rank done before rank 0, which hosts the store, tears it down
    finally:
        dist.destroy_process_group()
    # a passing rank leaves without the interpreter's C++ teardown, where a joinable gloo thread can abort the process
    # ("terminate called without an active exception", SIGABRT: seen once in a 4-rank run, not reproduced)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(scenario: str, tmp_path, module: str = __name__, world: int = WORLD) -> None:
    """Run ``SCENARIOS[scenario](rank, tmp)`` of test module ``module`` on ``world`` gloo processes."""
    mp.spawn(_entry, args=(world, _free_port(), module, scenario, str(tmp_path)), nprocs=world, join=True)


# ----------------------------------------------------------------------------------------------- scenarios
def _scenario_fsdp_exact(rank: int, tmp: str):
    from torch.distributed.tensor import Replicate, Shard

    from adalomo import functional as F

    _scenario_functional(rank)
    for name, (factory, two_pass) in OPTS.items():
        for fused in (True, False):
            if name.startswith("adafactor_fixed") and not fused:
                continue
            ref = make_model()
            ref_opt = local(factory(ref.parameters(), fused))
            train(ref, ref_opt, STEPS, None, fused, two_pass)
            model = shard(make_model())
            opt = factory(model.parameters(), fused)
            train(model, opt, STEPS, rank, fused, two_pass)
            assert_close(full_params(model), full_params(ref), f"{name} fused={fused}")
            assert int(opt.skipped_updates) == 0
    # the state layout that torch.distributed.checkpoint needs
    st = opt.state[model.l1.weight]
    assert is_dtensor(st["exp_avg_sq_row"]) and st["exp_avg_sq_row"].shape == (7,)
    assert st["exp_avg_sq_row"].placements == (Shard(0),)
    assert st["exp_avg_sq_col"].placements == (Replicate(),) and st["exp_avg_sq_col"].shape == (8,)
    assert st["exp_avg_sq_row"].to_local().shape == ((4,) if rank == 0 else (3,))
    st3 = opt.state[model.w3]  # 3-D: both statistics follow dim 0
    assert st3["exp_avg_sq_row"].placements == (Shard(0),) and st3["exp_avg_sq_row"].shape == (3, 7)
    assert st3["exp_avg_sq_col"].placements == (Shard(0),) and st3["exp_avg_sq_col"].shape == (3, 5)
    sb = opt.state[model.head.bias]
    assert sb["exp_avg_sq"].placements == (Shard(0),) and sb["exp_avg_sq"].to_local().numel() == (1 - rank)
    torch.testing.assert_close(st["exp_avg_sq_row"].full_tensor(), ref_opt.state[ref.l1.weight]["exp_avg_sq_row"])

    # a subclass composing functional pieces (local statistics only) is refused, not silently wrong
    class Piecewise(adalomo.LowMemoryOptimizer):
        def __init__(self, params):
            super().__init__(params, dict(lr=1e-2), fused=True)

        def _validate_group(self, group):
            pass

        def _init_state(self, p, group):
            return {"step": torch.tensor(0.0), **F.init_factored_state(p)}

        def _update(self, p, grad, group, state, grad_scale, sr, gen):
            ok = F.update_second_moment_(state, grad, beta2=0.9, eps1=1e-30)
            F.apply_update_(p, F.precondition(grad, F.preconditioner(state)), torch.tensor(1e-2), 0.0, ok)
            return ok

    model = shard(make_model())
    Piecewise(model.parameters())
    with pytest.raises(NotImplementedError, match="does not support FSDP2-sharded parameters"):
        train(model, None, 1, rank)

    # non-finite gradient at step 3: every rank skips every tensor together, then training goes on exactly
    ref = make_model()
    ref_opt = local(adalomo.AdaLomo(ref.parameters(), lr=3e-2, fused=True, nonfinite="count"))
    train(ref, ref_opt, 6, None, bad_steps=(3,))
    model = shard(make_model())
    opt = adalomo.AdaLomo(model.parameters(), lr=3e-2, fused=True, nonfinite="count")
    train(model, opt, 6, rank, bad_steps=(3,))
    assert int(opt.skipped_updates) == int(ref_opt.skipped_updates) == 1
    assert_close(full_params(model), full_params(ref), "nonfinite skip")


def _scenario_functional(rank: int):
    """The sharded maths (adalomo.distributed.functional) with an explicit ShardInfo: equal to the full-tensor
    update; a NaN/inf in one rank's rows only makes every rank skip (the finite flag is global)."""
    from adalomo import functional as F
    from adalomo.distributed import ShardInfo
    from adalomo.distributed import functional as DF

    plain = dict(grad_scale=None, stochastic_rounding=False, generator=None)
    core = dict(eps=(1e-30, 1e-3), clip_threshold=1.0, scale_parameter=True, beta1=None, **plain)

    group = dist.group.WORLD
    for shape, block_numel in [((7, 5), None), ((9,), None), ((3, 4, 6), None), ((1, 5), None), ((31, 6), 40)]:
        if block_numel is not None:  # the row-block path of large matrices
            F.BLOCK_NUMEL, saved_block = block_numel, F.BLOCK_NUMEL
        g = torch.Generator().manual_seed(sum(shape))
        p_full, grads = torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(3)]
        rows = torch.chunk(torch.arange(shape[0]), WORLD)
        mine = rows[rank] if rank < len(rows) else torch.arange(0)
        sl = slice(int(mine[0]), int(mine[-1]) + 1) if len(mine) else slice(0, 0)
        info = ShardInfo(group, torch.Size(shape), sl.start, sl.stop - sl.start)
        for name in ("adalomo", "adafactor", "lomo"):
            ref_p, p = p_full.clone(), p_full[sl].clone()
            ref_st = {"step": torch.tensor(0.0), **F.init_factored_state(ref_p)}
            st = {"step": torch.tensor(0.0), **F.init_factored_state(p)}
            if F.is_factored(p):  # local state: rows local, columns whole
                st["exp_avg_sq_row"] = ref_st["exp_avg_sq_row"][sl].clone()
                st["exp_avg_sq_col"] = ref_st["exp_avg_sq_col"].clone() if p.dim() == 2 else \
                    ref_st["exp_avg_sq_col"][sl].clone()
            for i, gr in enumerate(grads):
                gl = gr[sl].clone()
                if i == 2 and rank == WORLD - 1 and gl.numel():
                    gl.view(-1)[0] = float("nan")  # only the last rank sees it
                t = float(i + 1)
                if name == "adalomo":
                    ok = DF.scaled_rms_update_(p, gl, st, rho=1e-2, beta2=F.beta2_at(t, -0.8), weight_decay=0.1,
                                               **core, shard=info)
                    ref_ok = F.adalomo_update_(ref_p, gr, ref_st, lr=1e-2, weight_decay=0.1) if i < 2 else None
                elif name == "adafactor":
                    ok = DF.scaled_rms_update_(p, gl, st, rho=F.relative_step_size(t, False, 1e-2),
                                               beta2=F.beta2_at(t, -0.8), weight_decay=0.0, **core, shard=info)
                    ref_ok = F.adafactor_update_(ref_p, gr, ref_st, lr=1e-2, relative_step=True) if i < 2 else None
                else:
                    ok = DF.lomo_update_(p, gl, lr=1e-2, weight_decay=0.1, clip_grad_value=None, **plain, shard=info)
                    ref_ok = F.lomo_update_(ref_p, gr, lr=1e-2, weight_decay=0.1) if i < 2 else None
                if i < 2:
                    assert bool(ok) and bool(ref_ok)
                    torch.testing.assert_close(p, ref_p[sl], rtol=1e-5, atol=1e-6)
                elif shape[0] >= WORLD:
                    assert not bool(ok), f"{name} {shape}: rank {rank} did not see the other rank's NaN"
                    torch.testing.assert_close(p, ref_p[sl], rtol=1e-5, atol=1e-6)  # unchanged
        if block_numel is not None:
            F.BLOCK_NUMEL = saved_block


def _scenario_dcp(rank: int, tmp: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_state_dict,
    )

    ck = os.path.join(tmp, "ckpt")
    model = shard(make_model())
    opt = adalomo.AdaLomo(model.parameters(), lr=3e-2, weight_decay=0.1, fused=True)
    train(model, opt, 4, rank)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ck)
    train(model, opt, 4, rank, start=4)
    uninterrupted = full_params(model)
    row = opt.state[model.l1.weight]["exp_avg_sq_row"].full_tensor()
    # the gathered full optimizer state dict has the global shapes and values
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.testing.assert_close(full["state"]["l1.weight"]["exp_avg_sq_row"], row, rtol=0, atol=0)
        assert full["state"]["w3"]["exp_avg_sq_col"].shape == (3, 5)
        assert full["state"]["head.bias"]["exp_avg_sq"].shape == (1,)

    model2 = shard(make_model(seed=1))  # different weights: everything must come from the checkpoint
    opt2 = adalomo.AdaLomo(model2.parameters(), lr=3e-2, weight_decay=0.1, fused=True)
    msd, osd = get_state_dict(model2, opt2)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ck)
    set_state_dict(model2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    assert float(opt2.state[model2.l1.weight]["step"]) == 4
    assert is_dtensor(opt2.state[model2.l1.weight]["exp_avg_sq_row"])
    train(model2, opt2, 4, rank, start=4)
    assert_close(full_params(model2), uninterrupted, "DCP resume on 2 ranks", exact=True)
    torch.testing.assert_close(opt2.state[model2.l1.weight]["exp_avg_sq_row"].full_tensor(), row, rtol=0, atol=0)

    # a plain full state_dict (as an unsharded run saves) loads into the sharded optimizer too
    ref = make_model()
    ref_opt = local(adalomo.AdaLomo(ref.parameters(), lr=3e-2, weight_decay=0.1, fused=True))
    train(ref, ref_opt, 4, None)
    model3 = shard(make_model())
    opt3 = adalomo.AdaLomo(model3.parameters(), lr=3e-2, weight_decay=0.1, fused=True)
    train(model3, opt3, 4, rank)
    opt3.load_state_dict(ref_opt.state_dict())
    assert is_dtensor(opt3.state[model3.l1.weight]["exp_avg_sq_row"])
    torch.testing.assert_close(opt3.state[model3.w3]["exp_avg_sq_col"].full_tensor(),
                               ref_opt.state[ref.w3]["exp_avg_sq_col"])
    if rank == 0:
        torch.save(uninterrupted, os.path.join(tmp, "uninterrupted.pt"))


def _scenario_dp(rank: int, tmp: str):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from adalomo.distributed import hsdp_mesh

    ref = make_model()
    ref_opt = local(adalomo.AdaLomo(ref.parameters(), lr=3e-2, weight_decay=0.1, fused=True))
    train(ref, ref_opt, STEPS, None)
    expected = full_params(ref)

    # DDP + fused: a clear error at the first backward, and from check_not_ddp
    ddp = DDP(make_model())
    opt = adalomo.AdaLomo(ddp.parameters(), lr=3e-2, fused=True)
    with pytest.raises(UnshardedDistributedError, match="DistributedDataParallel"):
        check_not_ddp(ddp, opt)
    x, y = batch(0, rank)
    with pytest.raises(UnshardedDistributedError, match="HSDP"):
        loss_fn(ddp, x, y).backward()
    opt.remove_hooks()
    check_not_ddp(ddp, adalomo.AdaLomo(make_model().parameters()))  # classic: fine

    # DDP + classic: exact
    ddp = DDP(make_model())
    opt = adalomo.AdaLomo(ddp.parameters(), lr=3e-2, weight_decay=0.1)
    train(ddp, opt, STEPS, rank, fused=False)
    assert_close({n.removeprefix("module."): p for n, p in full_params(ddp).items()}, expected, "DDP classic")

    # HSDP (replicate=2, shard=1): fused data parallelism with full replicas, exact
    model = shard(make_model(), mesh=hsdp_mesh(WORLD, 1, "cpu"))
    opt = adalomo.AdaLomo(model.parameters(), lr=3e-2, weight_decay=0.1, fused=True)
    train(model, opt, STEPS, rank)
    assert_close(full_params(model), expected, "HSDP (2, 1) fused")
    assert model.l1.weight.to_local().shape == (7, 8)

    # explicit opt-out for model-parallel setups where each rank owns its parameters
    own = make_model(seed=10 + rank)
    opt = adalomo.AdaLomo(own.parameters(), lr=3e-2, fused=True)
    opt.allow_unsharded_distributed = True
    train(own, opt, 1, rank)


def _scenario_fsdp_kernels(rank: int, tmp: str):
    """The grouped sharded Triton path (through the interpreter on CPU) against the single-process torch path;
    the collectives it makes (one all-reduce per bucket) counted; no host synchronisation."""
    os.environ["ADALOMO_TRITON_INTERPRET"] = "1"
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (nothing has, in this process)
    from adalomo import kernels
    from adalomo.kernels import sharded as _sharded

    assert kernels.triton_available()
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    calls, reduces, seen = [], [], []  # (function, tensors) per sharded call; all-reduces; ATen ops per call
    names = ("scaled_rms_update_sharded_", "lomo_update_sharded_")
    originals, orig_reduce = {n: getattr(_sharded, n) for n in names}, dist.all_reduce

    def wrap(n):
        def counted(ps, *a, **k):
            calls.append((n, len(ps)))
            with Ops() as rec:
                out = originals[n](ps, *a, **k)
            seen.append(rec.names)
            return out
        return counted

    def counted_reduce(*a, **k):
        reduces.append(1)
        return orig_reduce(*a, **k)

    for n in names:
        setattr(_sharded, n, wrap(n))
    dist.all_reduce = counted_reduce
    opt_lomo_wd = (lambda ps, f: adalomo.Lomo(ps, lr=5e-2, weight_decay=0.1, clip_grad_value=0.05, fused=f), False)
    try:
        for name, (factory, two_pass) in [*((n, OPTS[n]) for n in ("adalomo", "adafactor", "adalomo_clip",
                                                                   "lomo_clip")), ("lomo_wd", opt_lomo_wd)]:
            for fused in (True, False):
                os.environ["ADALOMO_DISABLE_TRITON"] = "1"  # the reference: the torch path, one process
                ref = make_model()
                ref_opt = local(factory(ref.parameters(), fused))
                train(ref, ref_opt, STEPS, None, fused, two_pass)
                del os.environ["ADALOMO_DISABLE_TRITON"]
                model = shard(make_model())
                opt = factory(model.parameters(), fused)
                calls.clear()
                reduces.clear()
                train(model, opt, STEPS, rank, fused, two_pass)
                assert_close(full_params(model), full_params(ref), f"{name} fused={fused} (sharded kernels)")
                assert int(opt.skipped_updates) == 0
                # per step one call with all 9 tensors, the 3-D one included (the bucket cap is far above this
                # model's size); per call one all-reduce; two-pass clipping's norm
                fn = names[1] if name.startswith("lomo") else names[0]
                assert calls == [(fn, 9)] * STEPS, (name, fused, calls)
                per_step = len(reduces) / STEPS
                assert per_step == 1 + (1 if two_pass else 0), (name, fused, per_step)
                # no host synchronisation in a steady-state call: nothing made from Python numbers (on CUDA a copy
                # from the host, e.g. ``ws[-1] = 0.0``, which waits for the device) and no scalar read back
                assert "c10d.allreduce_.default" in seen[-1]
                syncing = {"aten.lift_fresh.default", "aten._local_scalar_dense.default"} & seen[-1]
                assert not syncing, f"{name}: a sharded call makes tensors from host data or reads scalars: {syncing}"
                seen.clear()
        # a NaN in one rank's rows only: every rank skips that call's tensors (the verdict is global)
        from adalomo.distributed import ShardInfo

        for fn in names:
            ps, gs, sts, infos = [], [], [], []
            for shape in ((7, 5), (1, 5), (9,), (3, 4, 5), (1, 3, 4)):  # the last: rank 1 holds no matrix
                rows = torch.chunk(torch.arange(shape[0]), WORLD)
                mine = rows[rank] if rank < len(rows) else torch.arange(0)
                lo = int(mine[0]) if len(mine) else shape[0]
                local_shape = (len(mine),) + shape[1:]
                ps.append(torch.randn(local_shape))
                gs.append(torch.randn(local_shape))
                sts.append({"exp_avg_sq_row": torch.ones(local_shape[0]), "exp_avg_sq_col": torch.ones(shape[1])}
                           if len(shape) == 2 else {"exp_avg_sq": torch.ones(local_shape)} if len(shape) == 1 else
                           {"exp_avg_sq_row": torch.ones(local_shape[:-1]),
                            "exp_avg_sq_col": torch.ones(local_shape[:-2] + shape[-1:])})
                infos.append(ShardInfo(dist.group.WORLD, torch.Size(shape), lo, len(mine)))
            if rank == WORLD - 1:  # the NaNs on one rank only (its shard of the 3-D tensor: one of 3 matrices)
                gs[0].view(-1)[0] = float("nan")
                gs[3].view(-1)[-1] = float("nan")
            before = [p.clone() for p in ps]
            common = dict(grad_scale=None, stochastic_rounding=False, seeds=[0] * len(ps))
            if fn == names[0]:
                ok = originals[fn](ps, gs, sts, infos, rhos=[1e-2] * 5, beta2s=[0.9] * 5, eps=(1e-30, 1e-3),
                                   clip_threshold=1.0, weight_decay=0.0, scale_parameter=True, beta1=None, **common)
            else:
                ok = originals[fn](ps, gs, infos, lr=1e-2, weight_decay=0.0, clip_grad_value=None, **common)
            assert not bool(ok), f"{fn}: rank {rank} did not see the other rank's NaN"
            assert torch.equal(ps[0], before[0]), f"{fn}: the tensor with the NaN was updated"
            assert torch.equal(ps[3], before[3]), f"{fn}: the 3-D tensor with the NaN was updated"
            assert not torch.equal(ps[2], before[2]), f"{fn}: a finite tensor was not updated"
            assert rank == 1 or not torch.equal(ps[4], before[4]), f"{fn}: the one-matrix 3-D tensor was not updated"
        # one tensor per bucket (a tiny cap): the same result, one call per tensor
        os.environ["ADALOMO_DISABLE_TRITON"] = "1"
        ref = make_model()
        train(ref, local(adalomo.AdaLomo(ref.parameters(), lr=3e-2, fused=True)), 3, None)
        del os.environ["ADALOMO_DISABLE_TRITON"]
        model = shard(make_model())
        calls.clear()
        train(model, adalomo.AdaLomo(model.parameters(), lr=3e-2, fused=True, bucket_cap_mb=1e-9), 3, rank)
        assert calls == [(names[0], 1)] * 9 * 3, calls
        assert_close(full_params(model), full_params(ref), "one tensor per bucket (sharded kernels)")
        # HSDP (replicate=2, shard=1): the local tensors are whole, so the single-process grouped kernels run
        from adalomo.distributed import hsdp_mesh
        from adalomo.kernels import updates

        grouped, orig_grouped = [], updates.scaled_rms_update_many_

        def counted_grouped(ps, *a, **k):
            grouped.append(len(ps))
            return orig_grouped(ps, *a, **k)

        updates.scaled_rms_update_many_ = counted_grouped
        try:
            for fused in (True, False):
                os.environ["ADALOMO_DISABLE_TRITON"] = "1"
                ref = make_model()
                train(ref, local(adalomo.AdaLomo(ref.parameters(), lr=3e-2, weight_decay=0.1, fused=fused)), 3,
                      None, fused)
                del os.environ["ADALOMO_DISABLE_TRITON"]
                model = shard(make_model(), mesh=hsdp_mesh(WORLD, 1, "cpu"))
                grouped.clear()
                calls.clear()
                train(model, adalomo.AdaLomo(model.parameters(), lr=3e-2, weight_decay=0.1, fused=fused), 3, rank,
                      fused)
                assert_close(full_params(model), full_params(ref), f"HSDP (2, 1) fused={fused} (grouped kernels)")
                assert grouped == [9] * 3 and not calls, (fused, grouped, calls)
        finally:
            updates.scaled_rms_update_many_ = orig_grouped
        # a non-finite step: every rank skips every tensor together, then training goes on exactly
        os.environ["ADALOMO_DISABLE_TRITON"] = "1"
        ref = make_model()
        ref_opt = local(adalomo.AdaLomo(ref.parameters(), lr=3e-2, fused=True, nonfinite="count"))
        train(ref, ref_opt, 6, None, bad_steps=(3,))
        del os.environ["ADALOMO_DISABLE_TRITON"]
        model = shard(make_model())
        opt = adalomo.AdaLomo(model.parameters(), lr=3e-2, fused=True, nonfinite="count")
        train(model, opt, 6, rank, bad_steps=(3,))
        assert int(opt.skipped_updates) == int(ref_opt.skipped_updates) == 1
        assert_close(full_params(model), full_params(ref), "nonfinite skip (sharded kernels)")
        # the replicated column statistics stay identical on every rank (also where a rank holds no rows)
        for p in (model.l1.weight, model.head.weight, model.emb.weight):
            col = opt.state[p]["exp_avg_sq_col"].to_local()
            other = [torch.empty_like(col) for _ in range(WORLD)]
            orig_gather = dist.all_gather
            orig_gather(other, col)
            assert all(torch.equal(other[0], o) for o in other[1:]), "replicated column state differs across ranks"
    finally:
        for n in names:
            setattr(_sharded, n, originals[n])
        dist.all_reduce = orig_reduce


def _scenario_four_ranks(rank: int, tmp: str):
    """Net over 4 ranks: shards of 3, 3, 3, 2 rows (11), of 2, 2, 2, 1 (7), of 2, 2, 2, 0 (6) and 1, 1, 1, 0 (the
    3-D tensor's 3 matrices), and the head's 1 row on rank 0 only. The sharded kernels (one all-reduce per bucket)
    and the sharded torch maths (one per tensor) against the single-process torch path."""
    os.environ["ADALOMO_TRITON_INTERPRET"] = "1"
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    reduces, orig_reduce = [], dist.all_reduce

    def counted_reduce(*a, **k):
        reduces.append(1)
        return orig_reduce(*a, **k)

    dist.all_reduce = counted_reduce
    try:
        # (optimizer, fused, sharded torch maths instead of the kernels, all-reduces per step: LOMO's two-pass
        # clipping adds the norm's)
        for name, fused, torch_path, per_step in (("adalomo", True, False, 1), ("adafactor", False, False, 1),
                                                  ("adafactor", True, True, 9), ("lomo_clip", True, False, 2)):
            factory, two_pass = OPTS[name]
            os.environ["ADALOMO_DISABLE_TRITON"] = "1"  # the reference: the torch path, one process
            ref = make_model()
            train(ref, local(factory(ref.parameters(), fused)), STEPS, None, fused, two_pass)
            if not torch_path:
                del os.environ["ADALOMO_DISABLE_TRITON"]
            model = shard(make_model())
            opt = factory(model.parameters(), fused)
            reduces.clear()
            train(model, opt, STEPS, rank, fused, two_pass, world=4)
            os.environ.pop("ADALOMO_DISABLE_TRITON", None)
            assert_close(full_params(model), full_params(ref), f"{name} fused={fused} torch={torch_path} on 4 ranks")
            assert int(opt.skipped_updates) == 0
            assert len(reduces) == per_step * STEPS, (name, fused, torch_path, len(reduces) / STEPS)
        assert model.l1.weight.to_local().shape[0] == (1 if rank == 3 else 2)
        assert model.w3.to_local().shape[0] == (0 if rank == 3 else 1)
        _sharded_kernel_clipping(rank, reduces)
    finally:
        dist.all_reduce = orig_reduce


def _sharded_kernel_clipping(rank: int, reduces: list):
    """The sharded kernel called directly, with a loss scale and clipping at RMS(u) = 0.1 (sum u^2 decides every
    update), against the single-process torch update of the full tensors over 3 steps."""
    from adalomo import functional as F
    from adalomo.distributed import ShardInfo
    from adalomo.kernels import sharded

    world = dist.get_world_size()
    shapes = ((7, 5), (3, 4, 6), (9,), (2, 3))  # rows over 4 ranks: 2 2 2 1; 1 1 1 0; 3 3 3 0; 1 1 0 0
    g = torch.Generator().manual_seed(7)
    full_p = [torch.randn(sh, generator=g) for sh in shapes]
    full_st = [{**F.init_factored_state(p), "exp_avg": torch.zeros_like(p)} for p in full_p]
    rows = [torch.arange(sh[0]).chunk(world) for sh in shapes]
    mine = [slice(int(r[rank][0]), int(r[rank][-1]) + 1) if rank < len(r) else slice(sh[0], sh[0])
            for r, sh in zip(rows, shapes)]
    ps = [p[sl].clone() for p, sl in zip(full_p, mine)]
    sts = [{k: (v[sl] if k == "exp_avg" or len(sh) != 2 or k == "exp_avg_sq_row" else v).clone()
            for k, v in st.items()} for st, sl, sh in zip(full_st, mine, shapes)]
    infos = [ShardInfo(dist.group.WORLD, torch.Size(sh), sl.start, sl.stop - sl.start) for sh, sl in zip(shapes, mine)]
    hyper = dict(eps=(1e-30, 1e-3), clip_threshold=0.1, weight_decay=0.1, scale_parameter=True, beta1=0.9)
    scale = torch.tensor(0.5)
    for step in range(1, 4):
        beta2 = F.beta2_at(step, -0.8)
        full_g = [torch.randn(sh, generator=g) * 4 for sh in shapes]
        for p, gr, st in zip(full_p, full_g, full_st):
            assert bool(F.scaled_rms_update_(p, gr, st, rho=0.1, beta2=beta2, grad_scale=scale, **hyper))
        reduces.clear()
        ok = sharded.scaled_rms_update_sharded_(ps, [gr[sl].clone() for gr, sl in zip(full_g, mine)], sts, infos,
                                                rhos=[0.1] * 4, beta2s=[beta2] * 4, grad_scale=scale,
                                                stochastic_rounding=False, seeds=[0] * 4, **hyper)
        assert bool(ok) and len(reduces) == 1
        for p, ref, sl, sh in zip(ps, full_p, mine, shapes):
            torch.testing.assert_close(p, ref[sl], rtol=1e-5, atol=1e-6, msg=lambda m, sh=sh, t=step: f"{sh} {t}: {m}")


SCENARIOS = {"fsdp_exact": _scenario_fsdp_exact, "dcp": _scenario_dcp, "dp": _scenario_dp,
             "fsdp_kernels": _scenario_fsdp_kernels, "four_ranks": _scenario_four_ranks}


# ----------------------------------------------------------------------------------------------- tests
def test_fsdp2_fused_and_classic_match_single_process(tmp_path):
    """AdaLomo/Adafactor/Lomo (fused and classic, incl. two-pass clipping) under FSDP2 over 10 steps equal
    the single-process run; uneven and empty shards; DTensor state layout; a non-finite step is skipped on
    every rank; the functional API with an explicit ShardInfo."""
    spawn("fsdp_exact", tmp_path)


def test_fsdp2_sharded_kernels_match_single_process(tmp_path):
    """The grouped Triton path for FSDP2 shards (AdaLomo, Adafactor with beta1, two-pass clipping; fused and
    classic; uneven and empty shards; a skipped non-finite step), run by Triton's interpreter on CPU, equals
    the single-process torch path, with one all-reduce per bucket."""
    pytest.importorskip("triton")
    spawn("fsdp_kernels", tmp_path)


def test_fsdp2_on_4_ranks_short_and_empty_shards(tmp_path):
    """4 processes: the sharded kernels (AdaLomo fused, Adafactor with beta1 classic, LOMO with two-pass clipping)
    and the sharded torch maths equal the single-process run over 10 steps, with shards of 2, 2, 2, 1 rows and empty
    ones; one all-reduce per bucket (the kernels) or per tensor (the torch maths), plus the norm's for LOMO. The
    sharded kernel with a loss scale and every update clipped by RMS(u) equals the single-process update."""
    pytest.importorskip("triton")
    spawn("four_ranks", tmp_path, world=4)


def test_dcp_resume_exact_on_2_ranks_and_on_1(tmp_path):
    """Save with DCP on 2 ranks, resume on 2 ranks: bit-identical to the uninterrupted run. Resume the same
    checkpoint in a single process (a different number of ranks): equal to fp32 tolerance."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    spawn("dcp", tmp_path)
    uninterrupted = torch.load(tmp_path / "uninterrupted.pt")
    model = make_model(seed=1)
    opt = adalomo.AdaLomo(model.parameters(), lr=3e-2, weight_decay=0.1, fused=True)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(sd, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    assert float(opt.state[model.l1.weight]["step"]) == 4
    assert opt.state[model.l1.weight]["exp_avg_sq_row"].shape == (7,)
    train(model, opt, 4, None, start=4)
    assert_close(full_params(model), uninterrupted, "DCP resume on 1 rank")


def test_ddp_refused_in_fused_mode_classic_and_hsdp_exact(tmp_path):
    """DDP + fused raises a clear error; DDP + classic and HSDP (2, 1) + fused equal the single process."""
    spawn("dp", tmp_path)


def test_plain_tensors_unaffected_without_process_group():
    """No process group: fused mode on plain tensors does not complain (single-process path)."""
    model = make_model()
    opt = adalomo.AdaLomo(model.parameters(), lr=3e-2, fused=True)
    train(model, opt, 1)
    assert not opt._shard_layouts


def test_example_runs_under_torchrun(tmp_path):
    """examples/fsdp_train.py on the CPU (gloo, 2 processes, tiny model, 3 steps)."""
    pytest.importorskip("adalomo.experiments.models")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(ROOT / "examples" / "fsdp_train.py"), "--size", "tiny", "--steps", "3", "--batch-size", "2",
           "--seq-len", "32", "--device", "cpu", "--dtype", "fp32", "--checkpoint-dir", str(tmp_path / "ck")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 3" in r.stdout, r.stdout[-3000:]
