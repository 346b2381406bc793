"""AdaPM under FSDP2 / HSDP (CPU, gloo, 2 processes) against the single-process run of the same global batch.

One spawn per test (several scenarios in it) to keep the suite CI-sized. The model is test_distributed's Net:
uneven rows over 2 ranks (11, 7, 3 and 1 rows: rank 1 holds no row of the head), low-rank bases on both sides
(``left``: l1 7x8, w3 3x35, head 1x6; ``right``: emb 11x8, l2 6x5), refreshes at steps 1, 4, 7 and 10.
"""

from __future__ import annotations

import copy
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from test_distributed import (  # noqa: E402
    STEPS,
    WORLD,
    full_params,
    local,
    make_model,
    shard,
    train,
)
from test_distributed import spawn as distributed_spawn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode

import adalomo
from adalomo import SplitMomentum
from adalomo.distributed import is_dtensor

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"),
]

#: the brief's bound on the relative difference from the single-process run over 10 steps
REL_TOL = 1e-6
GAP = 3  # basis refreshes at steps 1, 4, 7, 10

POLICIES = {
    "low_rank": "low_rank",
    "full": "full",
    "none": "none",
    # a split along the columns (chunks of every row) on both sides of the basis, and the other kinds beside it
    "split": {r"^l1\.weight": SplitMomentum(-1, ("low_rank", "full")),
              r"^emb": SplitMomentum(1, ("none", "low_rank")), r"^l2\.weight": "full", r"\.bias": "none",
              ".*": "low_rank"},
}
SECOND = {
    "adam": dict(lr=1e-2, weight_decay=0.1),
    "factored": dict(lr=1e-2, weight_decay=0.1, second_moment="factored", relative_lr=True, clip_threshold=0.5),
}


def adapm(model, policy: str, second: str, fused: bool, **kw):
    return adalomo.AdaPM(model.named_parameters(), rank=2, update_proj_gap=GAP, momentum_policy=POLICIES[policy],
                         fused=fused, **SECOND[second], **kw)


def max_rel_diff(a: dict, b: dict) -> float:
    """max over tensors of max |a - b| / max |b|."""
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in b)


def close(a: dict, b: dict, what: str) -> None:
    d = max_rel_diff(a, b)
    assert d <= REL_TOL, f"{what}: max relative difference {d:.3g} > {REL_TOL}"


def reference(policy: str, second: str, fused: bool, steps: int = STEPS, two_pass: bool = False, world: int = WORLD,
              **kw) -> dict:
    ref = make_model()
    train(ref, local(adapm(ref, policy, second, fused, **kw)), steps, None, fused, two_pass, world=world)
    return full_params(ref)


# ----------------------------------------------------------------------------------------------- spawning
def spawn(scenario: str, tmp_path, world: int = WORLD) -> None:
    distributed_spawn(scenario, tmp_path, __name__, world)


#: functions of adalomo/functional.py that read a flag or a sum back on the CPU only (free there; not on accelerators)
CPU_ONLY_READS = {"step_size_of", "on_host", "masked_ema_", "apply_update_"}


def _cpu_only_read() -> bool:
    """The innermost adalomo frame of this read is one of the torch path's CPU-only reads."""
    for frame in reversed(traceback.extract_stack()):
        if "/adalomo/" in frame.filename.replace("\\", "/"):
            return frame.filename.endswith("functional.py") and "distributed" not in frame.filename \
                and frame.name in CPU_ONLY_READS
    return False


class HostReads(TorchDispatchMode):
    """Records the ATen ops that make a tensor from host data or read a scalar back to the host, except the reads
    that are host-side by design: the 0-d CPU step counters and the torch path's CPU-only reads."""

    def __init__(self, counters):
        super().__init__()
        self.counters = {id(c) for c in counters}
        self.found, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops.add(name)
        if name == "aten.lift_fresh.default" or (
                name == "aten._local_scalar_dense.default" and id(args[0]) not in self.counters
                and not _cpu_only_read()):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------------- scenarios
def _scenario_exact(rank: int, tmp: str):
    from adalomo.optim.adapm import AdaPM

    counts = {}
    orig_reduce, orig_gather = dist.all_reduce, dist.all_gather_into_tensor

    def count(name, fn):
        def counted(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            return fn(*a, **k)
        return counted

    dist.all_reduce, dist.all_gather_into_tensor = count("reduce", orig_reduce), count("gather", orig_gather)
    try:
        for policy in POLICIES:
            for second in SECOND:
                results = {}
                for fused in (True, False):
                    expected = reference(policy, second, fused)
                    model = shard(make_model())
                    opt = adapm(model, policy, second, fused)
                    counts.clear()
                    train(model, opt, STEPS, rank, fused)
                    got = full_params(model)
                    close(got, expected, f"{policy} {second} fused={fused}")
                    assert int(opt.skipped_updates) == 0
                    results[fused] = got
                    # low-rank: one all-gather per low-rank tensor per refresh step (4 of 10), none otherwise
                    lows = sum(1 for g in opt.param_groups for p in g["params"]
                               if p.dim() >= 2 and opt.momentum_kind(p) != "full" and opt.momentum_kind(p) != "none")
                    assert counts.get("gather", 0) == lows * 4, (policy, second, counts, lows)
                for n in results[True]:  # fused and classic: the same code on the same tensors
                    assert torch.equal(results[True][n], results[False][n]), f"{policy} {second}: {n} fused != classic"
    finally:
        dist.all_reduce, dist.all_gather_into_tensor = orig_reduce, orig_gather

    # the state layout: row-following state sharded like the parameter, the rest whole on every rank
    from torch.distributed.tensor import Replicate, Shard

    model = shard(make_model())
    opt = adapm(model, "low_rank", "factored", True)
    left, right = opt.state[model.l1.weight], opt.state[model.emb.weight]  # l1: 7 x 8 (left), emb: 11 x 8 (right)
    assert left["proj"].placements == (Shard(0),) and left["proj"].shape == (7, 2)
    assert left["proj"].to_local().shape == ((4, 2) if rank == 0 else (3, 2))
    assert left["exp_avg_lr"].placements == (Replicate(),) and left["exp_avg_lr"].shape == (2, 8)
    assert right["proj"].placements == (Replicate(),) and right["proj"].shape == (8, 2)
    assert right["exp_avg_lr"].placements == (Shard(0),) and right["exp_avg_lr"].shape == (11, 2)

    # no host synchronisation in a sharded AdaPM update, a refresh step included
    counters = [st["step"] for st in opt.state.values()]
    recorders = []
    orig_update = AdaPM._update_sharded

    def recorded(self, *a, **k):
        with HostReads(counters) as rec:
            out = orig_update(self, *a, **k)
        recorders.append(rec)
        return out

    AdaPM._update_sharded = recorded
    try:
        train(model, opt, 4, rank)  # steps 1..4: refreshes at 1 and 4
    finally:
        AdaPM._update_sharded = orig_update
    assert recorders and all("c10d.allreduce_.default" in r.ops for r in recorders)
    assert any("c10d._allgather_base_.default" in r.ops for r in recorders), set().union(*(r.ops for r in recorders))
    found = sorted({f for r in recorders for f in r.found})
    assert not found, f"a sharded AdaPM update makes tensors from host data or reads scalars: {found}"

    # a non-finite gradient at a refresh step: every rank skips every tensor, then training goes on exactly
    bad = (4,)
    ref = make_model()
    ref_opt = local(adapm(ref, "split", "factored", True, nonfinite="count"))
    train(ref, ref_opt, 6, None, bad_steps=bad)
    model = shard(make_model())
    opt = adapm(model, "split", "factored", True, nonfinite="count")
    train(model, opt, 6, rank, bad_steps=bad)
    assert int(opt.skipped_updates) == int(ref_opt.skipped_updates) == 1
    close(full_params(model), full_params(ref), "non-finite step")

    # global-norm clipping (two passes in fused mode): the sharded maths sees the scaled gradient
    for fused in (True, False):
        expected = reference("low_rank", "adam", fused, 5, clip_grad_norm=0.05, two_pass=fused)
        model = shard(make_model())
        train(model, adapm(model, "low_rank", "adam", fused, clip_grad_norm=0.05), 5, rank, fused, two_pass=fused)
        close(full_params(model), expected, f"clip_grad_norm fused={fused}")

    # a split along dim 0 of a row-sharded tensor: refused with what to do
    model = shard(make_model())
    with pytest.raises(NotImplementedError, match="SplitMomentum along dim 0"):
        adalomo.AdaPM(model.named_parameters(), momentum_policy={"l2.weight": SplitMomentum(0, ("low_rank", "full"))})


def _scenario_hsdp_dcp(rank: int, tmp: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from adalomo.distributed import hsdp_mesh

    # HSDP (replicate=2, shard=1): whole local tensors, the single-process maths; a split along dim 0 allowed
    policy = {r"^l2\.weight": SplitMomentum(0, ("low_rank", "full")), ".*": "low_rank"}
    POLICIES["split0"] = policy
    for second in SECOND:
        for fused in (True, False):
            expected = reference("split0", second, fused)
            model = shard(make_model(), mesh=hsdp_mesh(WORLD, 1, "cpu"))
            opt = adapm(model, "split0", second, fused)
            train(model, opt, STEPS, rank, fused)
            close(full_params(model), expected, f"HSDP {second} fused={fused}")
            assert model.l1.weight.to_local().shape == (7, 8)

    # DCP: save after step 5 (between refreshes), resume on 2 ranks == uninterrupted, bit for bit
    for second in SECOND:
        ck = os.path.join(tmp, f"ckpt_{second}")
        model = shard(make_model())
        opt = adapm(model, "split", second, True)
        train(model, opt, 5, rank)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ck)
        train(model, opt, STEPS - 5, rank, start=5)
        uninterrupted = full_params(model)
        model2 = shard(make_model(seed=1))
        opt2 = adapm(model2, "split", second, True)
        msd, osd = get_state_dict(model2, opt2)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=ck)
        set_state_dict(model2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        st = opt2.state[model2.l1.weight]
        assert float(st["step"]) == 5 and is_dtensor(st["0.proj"]) and is_dtensor(st["1.exp_avg"])
        train(model2, opt2, STEPS - 5, rank, start=5)
        got = full_params(model2)
        for n in uninterrupted:
            assert torch.equal(got[n], uninterrupted[n]), f"DCP resume ({second}): {n} differs"


    # a plain state dict of a one-process run loads into the sharded optimizer: its rows, or the whole of the rest
    ref = make_model()
    ref_opt = local(adapm(ref, "split", "factored", True))
    train(ref, ref_opt, 5, None)
    model = shard(make_model())
    opt = adapm(model, "split", "factored", True)
    train(model, opt, 5, rank)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # torch would share the step counters
    for name, p in model.named_parameters():
        want = ref_opt.state[dict(ref.named_parameters())[name]]
        for k, v in opt.state[p].items():
            got = v.full_tensor() if is_dtensor(v) else v
            assert is_dtensor(v) or k == "step", (name, k)
            assert torch.equal(got, want[k]), f"plain state dict: {name} {k}"
    train(ref, ref_opt, 5, None, start=5)
    train(model, opt, 5, rank, start=5)
    close(full_params(model), full_params(ref), "after loading a plain state dict")


def _scenario_four_ranks(rank: int, tmp: str):
    """Over 4 ranks (shards of 3, 3, 3, 2 rows; 2, 2, 2, 1; the head's one row on rank 0 only): every kind and both
    second moments, fused, within 1e-6 of the single-process run over 10 steps with basis refreshes."""
    for policy in ("split", "low_rank"):
        for second in SECOND:
            expected = reference(policy, second, True, world=4)
            model = shard(make_model())
            opt = adapm(model, policy, second, True)
            train(model, opt, STEPS, rank, True, world=4)
            close(full_params(model), expected, f"{policy} {second} on 4 ranks")
            assert int(opt.skipped_updates) == 0
    assert model.l1.weight.to_local().shape[0] == (1 if rank == 3 else 2)


SCENARIOS = {"exact": _scenario_exact, "hsdp_dcp": _scenario_hsdp_dcp, "four_ranks": _scenario_four_ranks}


# ----------------------------------------------------------------------------------------------- tests
def test_adapm_fsdp2_matches_single_process(tmp_path):
    """Every momentum kind (none, full, low-rank on both sides, a column split) x both second moments (clipping,
    relative lr, weight decay), fused and classic, on uneven and empty shards with basis refreshes: within 1e-6 of
    the single-process run over 10 steps; one all-gather per low-rank tensor and refresh; DTensor state layout;
    no host reads in the sharded update; a non-finite refresh step skipped on every rank; dim-0 splits refused."""
    spawn("exact", tmp_path)


def test_adapm_fsdp2_on_4_ranks(tmp_path):
    """4 processes, short and empty shards: every momentum kind and both second moments within 1e-6 of one process."""
    spawn("four_ranks", tmp_path, world=4)


def test_adapm_hsdp_and_dcp_resume(tmp_path):
    """HSDP (2, 1) with a dim-0 split equals the single process; a DCP save at step 5 and a resume on 2 ranks equal
    the uninterrupted run bit for bit (both second moments); a one-process state dict loads into the sharded
    optimizer."""
    spawn("hsdp_dcp", tmp_path)
