"""AdaLomoTrainer on 2 processes (CPU, gloo): FSDP2 through the Trainer's fsdp_config and data parallelism (FSDP2 as
HSDP) against the single-process run of the same global batch; gradient accumulation; checkpoints and an exact
resume; a plain accelerate loop with FSDP2; the example under torchrun.

One spawn runs every scenario (the Trainer and accelerate set up per scenario); the single-process references are
trained in the test process first. Each rank gets half of the global batch: the Trainer shards consecutive
micro-batches of its sampler order over the ranks, so the union is the single process's batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.torch_version import TorchVersion

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from test_distributed import _free_port, batch, full_params, loss_fn, make_model, shard  # noqa: E402
from test_integrations import USE_CPU, ToyLM, _reset_accelerate, targs, tiny_model  # noqa: E402

from adalomo import AdaLomo  # noqa: E402
from adalomo.distributed import is_dtensor  # noqa: E402
from adalomo.integrations import accelerate as adalomo_accelerate  # noqa: E402
from adalomo.integrations.transformers import AdaLomoTrainer, fsdp2_on_cpu  # noqa: E402

pytestmark = [
    pytest.mark.skipif(TorchVersion(torch.__version__) < (2, 9),
                       reason="FSDP2 on gloo averages gradients correctly only from torch 2.9"),
    pytest.mark.skipif(not USE_CPU, reason="2 CPU processes (gloo)"),
]

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]
FSDP2 = dict(fsdp=True, fsdp_config={"version": 2})
STEPS = dict(max_steps=4, warmup_steps=1)
ADAPM = {"rank": 4, "update_proj_gap": 2}


def run(out, *, batch: int, ga: int = 1, optimizer: str = "adalomo", adalomo_kwargs=None, resume=None, seed=0,
        **kw) -> AdaLomoTrainer:
    """A Trainer run on the global batch 8 (``batch`` per rank and micro-batch, ``ga`` micro-batches)."""
    _reset_accelerate()
    os.environ.pop("ACCELERATE_USE_FSDP", None)  # set by the previous scenario's Accelerator
    args = targs(out, per_device_train_batch_size=batch, gradient_accumulation_steps=ga, **{**STEPS, **kw})
    trainer = AdaLomoTrainer(model=tiny_model(seed=seed), args=args, train_dataset=ToyLM(),
                             adalomo_optimizer=optimizer, adalomo_kwargs=adalomo_kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(trainer) -> dict[str, torch.Tensor]:
    model = getattr(trainer, "model", trainer)
    return {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()}


def accelerate_loop(fsdp: bool) -> torch.nn.Module:
    """4 optimizer steps of a plain accelerate loop, 2 micro-batches each (accelerator.accumulate), global batch 8;
    with ``fsdp`` accelerate's FSDP2, the optimizer built on the model sharded by ``shard_model``."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    _reset_accelerate()
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2) if fsdp else None
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2, fsdp_plugin=plugin)
    if fsdp:
        fsdp2_on_cpu(accelerator, plugin)
    model = adalomo_accelerate.shard_model(accelerator, tiny_model())
    opt = AdaLomo(model.parameters(), lr=1e-2, fused=True)
    loader = torch.utils.data.DataLoader(ToyLM(), batch_size=4 // accelerator.num_processes)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    steps = 0
    for inputs in loader:
        with accelerator.accumulate(model):
            adalomo_accelerate.backward(accelerator, opt, model(**inputs).loss)
            opt.step()
            opt.zero_grad()
        steps += accelerator.sync_gradients
        if steps == 4:
            break
    assert all(float(s["step"]) == 4 for s in opt.optimizer.state.values())
    return model


def assert_close(a: dict, b: dict, what: str, exact: bool = False) -> None:
    assert a.keys() == b.keys(), what
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), f"{what}: {n} differs by {(a[n] - b[n]).abs().max():.3g}"
        else:  # the reduction sums the ranks' gradients in another order than one process does
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{what}: {n}: {m}")


def plain_fsdp2_accumulation(rank: int | None, sync_each: bool = True, windows: int = 3) -> dict:
    """A plain loop on test_distributed's Net (uneven and empty shards): each window is the global batch of 4 rows,
    as 2 micro-batches of one row per rank (``rank=None``: the whole batch in one backward, one process).
    ``sync_each``: FSDP2 reduces every micro-batch into the sharded p.grad (accumulation_steps=2); else
    ``set_requires_gradient_sync(False)`` on the first (accumulation_steps=1: FSDP2 sums and fires the hooks once)."""
    model = make_model()
    if rank is not None:
        model = shard(model)
    k = 2 if rank is not None and sync_each else 1
    opt = AdaLomo(model.parameters(), lr=3e-2, weight_decay=0.1, fused=True, accumulation_steps=k)
    if rank is None:
        opt.allow_unsharded_distributed = True  # the one-process reference inside a 2-process run
    for w in range(windows):
        x, y = batch(w, rank)
        if rank is None:
            loss_fn(model, x, y).backward()
        else:
            for i in range(2):
                if not sync_each:
                    model.set_requires_gradient_sync(i == 1)
                (loss_fn(model, x[i:i + 1], y[i:i + 1]) / 2).backward()
        opt.step()
    return full_params(model)


# ------------------------------------------------------------------------------------------- the 2 ranks
def _scenarios(rank: int, tmp: str) -> None:
    # a plain FSDP2 loop: the sum formed in the sharded p.grad (every micro-batch reduced) or by FSDP2 (no_sync)
    ref = plain_fsdp2_accumulation(None)
    assert_close(plain_fsdp2_accumulation(rank), ref, "plain FSDP2 loop, accumulation_steps=2")
    assert_close(plain_fsdp2_accumulation(rank, sync_each=False), ref, "plain FSDP2 loop, set_requires_gradient_sync")

    refs = torch.load(os.path.join(tmp, "refs.pt"))
    out = lambda name: os.path.join(tmp, name)  # noqa: E731

    # FSDP2 through the Trainer (sharded on 2 ranks), fused AdaLomo; a checkpoint at step 2 and a resume from it
    fsdp = run(out("fsdp"), batch=4, save_strategy="steps", save_steps=2, **FSDP2)
    opt = fsdp.optimizer.optimizer
    assert opt.fused and fsdp.is_fsdp_enabled and not fsdp._adalomo_hsdp
    assert all(is_dtensor(p) for g in opt.param_groups for p in g["params"])  # built on the sharded model
    assert opt.state[fsdp.model.lm_head.weight]["exp_avg_sq_row"].to_local().shape == (64,)  # its half of 128 rows
    assert_close(weights(fsdp), refs["adalomo"], "FSDP2 fused")
    resumed = run(out("fsdp"), batch=4, seed=1, resume=out("fsdp/checkpoint-2"), **FSDP2)
    assert_close(weights(resumed), weights(fsdp), "FSDP2 resumed from step 2", exact=True)

    # FSDP2 with gradient accumulation (4 micro-batches of 1 per rank): the single process's step on batch 8;
    # classic mode under the same Trainer gives the same weights bit for bit
    acc = run(out("fsdp_acc"), batch=1, ga=4, **FSDP2)
    assert_close(weights(acc), refs["adalomo"], "FSDP2 fused, accumulation")
    classic = run(out("fsdp_acc_classic"), batch=1, ga=4, adalomo_kwargs={"fused": False}, **FSDP2)
    assert_close(weights(classic), weights(acc), "FSDP2 classic vs fused, accumulation", exact=True)

    # data parallelism without fsdp: fused mode runs FSDP2 as HSDP (full replicas), each optimizer, accumulation
    for name in ("adalomo", "adafactor", "lomo"):
        save = dict(save_strategy="steps", save_steps=2) if name == "adalomo" else {}
        hsdp = run(out(f"hsdp_{name}"), batch=1, ga=4, optimizer=name, **save)
        assert hsdp._adalomo_hsdp and hsdp.optimizer.optimizer.fused
        assert hsdp.model.lm_head.weight.to_local().shape == (128, 32)  # a full replica
        assert_close(weights(hsdp), refs[name], f"HSDP fused {name}, accumulation")
        if name == "adalomo":
            resumed = run(out("hsdp_adalomo"), batch=1, ga=4, seed=1, resume=out("hsdp_adalomo/checkpoint-2"))
            assert_close(weights(resumed), weights(hsdp), "HSDP resumed from step 2", exact=True)

    # exact clipping: two-pass without accumulation (HSDP), the window's sum clipped by step() with it (FSDP2)
    clip = dict(max_grad_norm=0.5, adalomo_kwargs={"clip_grad_norm": 0.5})
    assert_close(weights(run(out("hsdp_clip"), batch=4, **clip)), refs["adalomo_clip"], "HSDP two-pass clipping")
    assert_close(weights(run(out("fsdp_clip"), batch=1, ga=4, **clip, **FSDP2)), refs["adalomo_clip"],
                 "FSDP2 clipping with accumulation")

    # a plain accelerate loop with FSDP2 and accelerator.accumulate
    assert_close(weights(accelerate_loop(fsdp=True)), refs["accelerate"], "accelerate FSDP2, accumulation")

    # AdaPM (default policy by name, a basis refresh at steps 1 and 3): FSDP2 with a checkpoint at step 2 and a
    # resume from it, HSDP with accumulation
    adapm = dict(optimizer="adapm", adalomo_kwargs=ADAPM)
    fsdp = run(out("fsdp_adapm"), batch=4, save_strategy="steps", save_steps=2, **adapm, **FSDP2)
    opt = fsdp.optimizer.optimizer
    assert opt.momentum_kind(fsdp.model.model.layers[0].self_attn.q_proj.weight) == "low_rank"
    assert_close(weights(fsdp), refs["adapm"], "FSDP2 fused AdaPM")
    resumed = run(out("fsdp_adapm"), batch=4, seed=1, resume=out("fsdp_adapm/checkpoint-2"), **adapm, **FSDP2)
    assert_close(weights(resumed), weights(fsdp), "FSDP2 AdaPM resumed from step 2", exact=True)
    hsdp = run(out("hsdp_adapm"), batch=1, ga=4, **adapm)
    assert_close(weights(hsdp), refs["adapm"], "HSDP fused AdaPM, accumulation")


def _entry(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        _scenarios(rank, tmp)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_trainer_fsdp2_and_hsdp_equal_the_single_process(tmp_path):
    """FSDP2 and HSDP under AdaLomoTrainer on 2 ranks (fused AdaLomo, Adafactor, Lomo, AdaPM; gradient accumulation 4;
    two-pass and accumulated clipping) equal the single-process run of the same global batch to fp32 rounding;
    classic and fused FSDP2 agree bit for bit; a checkpoint at step 2 resumes bit-identically on 2 ranks; a plain
    accelerate loop with FSDP2 and accumulation equals its single-process run."""
    refs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("adalomo", "adafactor", "lomo"):
            refs[name] = weights(run(tmp_path / f"ref_{name}", batch=8, optimizer=name))
        refs["adalomo_clip"] = weights(run(tmp_path / "ref_clip", batch=8, max_grad_norm=0.5,
                                           adalomo_kwargs={"clip_grad_norm": 0.5}))
        refs["accelerate"] = weights(accelerate_loop(fsdp=False))
        refs["adapm"] = weights(run(tmp_path / "ref_adapm", batch=8, optimizer="adapm", adalomo_kwargs=ADAPM))
    _reset_accelerate()
    torch.save(refs, tmp_path / "refs.pt")
    mp.spawn(_entry, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)


def test_example_under_torchrun(tmp_path):
    """examples/trainer_torchrun.py with 2 processes on CPU: FSDP2, gradient accumulation, activation checkpointing
    and a checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(ROOT / "examples" / "trainer_torchrun.py"), "--size", "tiny", "--fsdp", "--grad-accum", "2",
           "--batch-size", "2", "--seq-len", "32", "--max-steps", "4", "--save-steps", "2",
           "--gradient-checkpointing", "--output-dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '"parallel": "FSDP2"' in r.stdout and '"steps": 4' in r.stdout, r.stdout[-3000:]
    assert (tmp_path / "out" / "checkpoint-4" / "optimizer.bin").is_file()
