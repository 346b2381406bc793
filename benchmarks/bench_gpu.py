"""End-to-end step time and peak memory of full-parameter training on one GPU, one process per optimizer.

    PYTHONPATH=src python3 benchmarks/bench_gpu.py --config 0.94b --out benchmarks/results/gpu_0.94b.json
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --config 6.7b --out benchmarks/results/gpu_6.7b.json
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --fit --out benchmarks/results/fit.json

A LLaMA-style causal LM (transformers ``LlamaForCausalLM``, random init, built in bf16 on the GPU, sdpa
attention), measured like ``../shared/bench/gpu_anchor_bench.py``: the *floor* is forward+backward with
every gradient dropped in a post-accumulate hook as soon as it is ready; each row runs in its own process
(memory figures are not contaminated); median step time after warm-up, peak allocated memory. Ratios are to the
mean of the floor rows of the same run (list the floor first and last); ``--rounds N`` runs the list N times, the
rows between the floors in another order each time, and reports each row's median ratio over the rounds with its
spread (the machine drifts during a run: 8% between the first and last floor of one 0.94B run).

Rows (``--only`` picks some): ``floor``; ours, for each of ``adalomo``/``adafactor``/``lomo``: ``*_fused``
(fused hooks, gradients bucketed into the grouped Triton kernels, default ``bucket_cap_mb``), ``*_classic``
(``step()`` after backward, grouped kernels); variants of a fused row by suffix: ``_b{MB}`` sets
``bucket_cap_mb`` (``_b0``: one update per tensor), ``_r{N}`` sets the kernel setting ``pipeline_depth``
(software-pipelined read loops), ``_timed`` adds up the host time inside the fused hooks and flushes
(``counters``), ``_three`` turns the kernel setting ``one_read`` off, e.g. ``adalomo_fused_b0_three``;
``adalomo_fused_torchpath`` (ADALOMO_DISABLE_TRITON=1); AdaPM (default momentum policy, rank 64, by parameter
name): ``adapm_fused`` / ``adapm_classic`` (factored second moment), ``adapm_adam_fused`` / ``adapm_adam_classic``
(Adam's), the same suffixes ``_b{MB}``, ``_timed`` and ``_torchpath`` (its torch path);
peers ``torch_adamw_fused`` (classic, ``fused=True``), ``torch_adafactor`` (foreach), ``lomo_optim_adalomo``,
``lomo_optim_lomo`` (skipped with a note when ``lomo_optim`` is not installed).

``--paired BLOCKS``: each row against the floor in one process, in alternating blocks of steps (no memory figures):
ratios free of what differs between processes (placement, the host's speed), which moves the table above.
With ``--together`` all rows share one process and its drift (rounds of floor + every row, rotated).

``--fit``: the largest model whose training step (batch 1x1024, gradient checkpointing, bf16) fits, with
our fused AdaLomo and with torch AdamW (fused), on a ladder of LLaMA shapes; ``--cap-gb 80`` caps the allocator
(``torch.cuda.set_per_process_memory_fraction``) to answer "on an 80 GB GPU" from a larger one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEV = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" only to dry-run the harness on a tiny config

CONFIGS = {
    "0.94b": dict(layers=16, hidden=2048, inter=5504, heads=16, batch=4, seq=1024, ckpt=False, warmup=3, steps=20),
    "tiny": dict(layers=2, hidden=64, inter=96, heads=2, batch=2, seq=32, ckpt=True, warmup=1, steps=2, vocab=256),
    "6.7b": dict(layers=32, hidden=4096, inter=11008, heads=32, batch=2, seq=1024, ckpt=True, warmup=2, steps=8),
}
FIT_LADDER = {  # name: (layers, hidden, inter, heads); batch 1 x 1024, checkpointing
    "6.7b": (32, 4096, 11008, 32),
    "10b": (40, 4608, 12288, 36),
    "13b": (40, 5120, 13824, 40),
    "20b": (48, 6144, 16384, 48),
    "25b": (52, 6656, 17920, 52),
    "30b": (60, 6656, 17920, 52),
    "34b": (68, 6656, 17920, 52),
}
ROWS = ["floor", "adalomo_fused", "adalomo_fused_b0", "adalomo_classic", "adafactor_fused",
        "adafactor_classic", "lomo_fused", "lomo_classic", "torch_adamw_fused", "torch_adafactor", "lomo_optim_adalomo",
        "lomo_optim_lomo", "adalomo_fused_torchpath", "adapm_fused", "adapm_classic", "adapm_adam_fused",
        "adapm_adam_classic"]


# ------------------------------------------------------------------------------------------- child
def kernel_settings(opts: list[str]) -> dict:
    """The kernel settings (``kernels.set_config``) that a row's suffixes ask for: ``r{N}`` (the read passes' row
    loops pipelined over N stages), ``three`` (the statistics and RMS(u) in three passes, kernel setting ``one_read``
    off)."""
    out = {}
    if "three" in opts:
        out["one_read"] = False
    for o in opts:
        if o[:1] == "r" and o[1:].isdigit():
            out["pipeline_depth"] = int(o[1:])
    return out


def _build(cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    lc = LlamaConfig(vocab_size=cfg.get("vocab", 32000), hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
                     num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                     num_key_value_heads=cfg["heads"], max_position_embeddings=cfg["seq"], tie_word_embeddings=False)
    lc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = LlamaForCausalLM(lc)
    finally:
        torch.set_default_dtype(prev)
    if cfg["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _loss(model, x):
    import torch.nn.functional as F
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))


def _host_probe_ms() -> float:
    """The fastest of five runs of a fixed pure-Python loop: the host's speed for this process (hooks and kernel
    launches are Python), to compare rows and runs on a shared or throttled machine."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        sum(i * i for i in range(200_000))
        best = min(best, time.perf_counter() - t0)
    return round(best * 1e3, 2)


def _counters() -> dict:
    """What the process did besides running kernels, for telling a slow process from a fast one (a fused row at
    0.94B ran at 69.6 ms in some processes and 77-106 ms in others, same code, same machine): Python garbage
    collections, cudaMalloc calls and allocator retries, pinned host allocations, launch plans built, launches
    through Triton's Python path (a process whose direct launches were turned off takes it for every launch), Python
    threads (a busy one makes the backward's hooks wait for the GIL), and the CPU and NUMA node it runs on."""
    import gc
    import threading

    import torch
    out = {"gc": [st["collections"] for st in gc.get_stats()], "threads": threading.active_count()}
    if HOST_PATH_S["hook"]:  # rows with the suffix _timed (ms, summed over the steps; per step in the result)
        out["host_hook_ms"] = HOST_PATH_S["hook"] * 1e3
        out["host_flush_ms"] = HOST_PATH_S["flush"] * 1e3
    if torch.cuda.is_available() and DEV == "cuda":
        ms = torch.cuda.memory_stats()
        for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams"):
            if k in ms:
                out[k] = ms[k]
        host = getattr(torch.cuda, "host_memory_stats", None)
        try:
            hs = host() if host else {}
            for k in ("num_host_alloc", "num_host_free"):
                if k in hs:
                    out[k] = hs[k]
        except Exception:
            pass
    updates, launch = sys.modules.get("adalomo.kernels.updates"), sys.modules.get("adalomo.kernels.launch")
    if updates is not None:
        out["plans"] = len(updates._PLANS)
        out["fast_launch"] = bool(launch._DIRECT)
        out["jit_launches"] = launch.JIT_LAUNCHES[0]  # through Triton's Python launch path (0 after warm-up)
    try:
        with open("/proc/self/stat") as f:
            cpu = int(f.read().rsplit(")", 1)[1].split()[36])  # field 39: the CPU it last ran on
        out["cpu"] = cpu
        nodes = [d for d in os.listdir(f"/sys/devices/system/cpu/cpu{cpu}") if d.startswith("node")]
        if nodes:
            out["numa_node"] = int(nodes[0][4:])
    except Exception:
        pass
    return out


def _delta(before: dict, after: dict, steps: int) -> dict:
    """The counters' change over the ``steps`` timed steps (the state ones as they were at the end)."""
    out = {}
    for k, v in after.items():
        b = before.get(k)
        if k == "gc":
            out[k] = [a - c for a, c in zip(v, b)]
        elif k in ("host_hook_ms", "host_flush_ms"):
            out[k + "_per_step"] = round((v - (b or 0.0)) / steps, 3)
        elif k in ("threads", "fast_launch", "cpu", "numa_node") or not isinstance(v, int) or b is None:
            out[k] = v
        else:
            out[k] = v - b
    return out


HOST_PATH_S = {"hook": 0.0, "flush": 0.0}


def _time_host_path() -> None:
    """Row suffix ``_timed``: total host time inside the fused hooks and, of that, inside the bucket flushes (added
    up in ``HOST_PATH_S``; the wrappers add a little host time of their own to every call). A slow process whose
    hooks take the same time as a fast one's is slow elsewhere (the device, the allocator)."""
    from adalomo.optim.engine import FusedEngine as E
    if getattr(E, "_bench_timed", False):
        return
    def timed(fn, slot):
        def wrapper(self, arg):
            t = time.perf_counter()
            try:
                return fn(self, arg)
            finally:
                HOST_PATH_S[slot] += time.perf_counter() - t
        return wrapper

    E.hook, E.flush, E._bench_timed = timed(E.hook, "hook"), timed(E.flush, "flush"), True


def _optimizer(row: str, model, params: list, cuda: bool):
    """A row's optimizer on ``params``: (optimizer or None, fused, note, undo) where ``undo()`` detaches it (the
    floor's hooks, fused hooks) so that another row can run on the same model; None if the peer is missing."""
    import torch
    fused = "_fused" in row and not row.startswith("torch_")  # torch_adamw_fused is a classic step()
    opt = None
    note = ""
    undo = lambda: None  # noqa: E731
    if row == "floor":
        handles = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]
        undo = lambda: [h.remove() for h in handles]  # noqa: E731
    elif row.startswith(("adalomo_", "adafactor_", "lomo_")) and not row.startswith("lomo_optim"):
        import adalomo
        from adalomo import kernels
        kind, *opts = row.split("_")
        kw = dict(fused=fused)
        for o in opts:
            if o[:1] == "b" and o[1:].isdigit():
                kw["bucket_cap_mb"] = float(o[1:])
        if "timed" in opts:
            _time_host_path()
        settings = kernel_settings(opts)
        prev = {}
        if settings and (cuda or importlib.util.find_spec("triton") is not None):
            prev = kernels.set_config(**settings)
        if kind == "adalomo":
            opt = adalomo.AdaLomo(params, lr=1e-3, **kw)
        elif kind == "adafactor":
            opt = adalomo.Adafactor(params, **kw)
        else:
            opt = adalomo.Lomo(params, lr=1e-4, **kw)
        note = f"triton={kernels.use_triton(params[0], params[0])}, bucket_cap_mb={opt.bucket_cap_mb}"
        def undo(opt=opt):  # the row's settings end with its block (--together: later rows get the defaults)
            opt.remove_hooks()
            if prev:
                kernels.set_config(**prev)
    elif row.startswith("adapm_"):
        opt, note, undo = _adapm(row, model, params, fused)
    elif row == "torch_adamw_fused":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    elif row == "torch_adafactor":
        opt = torch.optim.Adafactor(params, lr=1e-2, foreach=True)
    elif row.startswith("lomo_optim"):
        try:
            from lomo_optim import AdaLomo, Lomo
        except ImportError:
            return None
        with _hooks_registered() as handles:  # lomo-optim keeps no handle of the hooks it registers
            opt = AdaLomo(model, lr=1e-3, loss_scale=None) if row.endswith("adalomo") else Lomo(model, lr=1e-4)
        undo = lambda: [h.remove() for h in handles]  # noqa: E731
    else:
        raise ValueError(row)
    return opt, fused, note, undo


def _adapm(row: str, model, params: list, fused: bool):
    """An AdaPM row: (optimizer, note, undo). ``adapm_adam_*``: Adam's second moment, else the factored one; the
    default momentum policy needs the parameters' names (LLaMA: q/k and MLP low-rank, v full, o and embeddings
    none)."""
    import adalomo
    from adalomo import kernels
    opts = row.split("_")[1:]
    kw = dict(fused=fused, second_moment="adam" if "adam" in opts else "factored")
    for o in opts:
        if o[:1] == "b" and o[1:].isdigit():
            kw["bucket_cap_mb"] = float(o[1:])
    if "timed" in opts:
        _time_host_path()
    ids = {id(p) for p in params}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    opt = adalomo.AdaPM(named, lr=1e-4, rank=64, **kw)
    kinds = {}
    for p in params:
        k = str(opt.momentum_kind(p))
        kinds[k] = kinds.get(k, 0) + p.numel()
    note = (f"triton={kernels.use_triton(params[0], params[0])}, bucket_cap_mb={opt.bucket_cap_mb}, "
            f"params by momentum kind (M): {', '.join(f'{k}={v / 1e6:.1f}' for k, v in sorted(kinds.items()))}")
    return opt, note, opt.remove_hooks


@contextlib.contextmanager
def _hooks_registered():
    """The handles of the tensor hooks (``Tensor.register_hook``) registered inside the block, so that they can be
    removed: lomo-optim registers one per parameter and keeps none, and in one process (``--paired``) they would
    slow every later block severalfold and drop classic rows' gradients."""
    import torch
    handles, orig = [], torch.Tensor.register_hook

    def register(self, hook):
        h = orig(self, hook)
        handles.append(h)
        return h
    torch.Tensor.register_hook = register
    try:
        yield handles
    finally:
        torch.Tensor.register_hook = orig


def _left_hooks(params) -> int:
    """Gradient hooks still on ``params`` (a row's undo must leave none for the next block)."""
    return sum(len(getattr(p, "_backward_hooks", None) or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None)
                                                                      or {}) for p in params)


def _stepper(row: str, model, x, opt, fused: bool):
    def step():
        loss = _loss(model, x)
        if row.startswith("lomo_optim"):
            opt.fused_backward(loss, 1e-3 if row.endswith("adalomo") else 1e-4)
        else:
            loss.backward()
            if opt is not None and not fused:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return loss
    return step


def paired(row: str, cfg: dict) -> dict | list[dict]:
    """``row`` and the floor in one process on one model, in alternating blocks of steps (floor, row, row, floor,
    ...; each block after its own warm-up): the ratio then carries none of the differences between processes
    (where the OS placed the process, the host's speed at the time), which move the one-process-per-row table by
    several percent at 6.7B. Memory is not compared (both share the process's allocator).

    ``row`` may name several rows (comma-separated, ``--together``): then each round runs the floor and every row,
    the rows in a rotated order, and a final floor block closes the last round; each row's ratio in a round is its
    block's median over the mean of the floor blocks that open this round and the next. The rows are then compared
    with each other under the same drift of the host (seen: 1.08x to 1.36x for one row within one process)."""
    import torch
    cuda = DEV == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = _build(cfg)
    params = list(model.parameters())
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randint(0, cfg.get("vocab", 32000), (cfg["batch"], cfg["seq"]), device=DEV, generator=g)
    rows = row.split(",")
    together = len(rows) > 1
    import importlib.util
    missing = [n for n in rows if n.startswith("lomo_optim") and importlib.util.find_spec("lomo_optim") is None]
    if together and missing:  # the other rows still run
        rows = [n for n in rows if n not in missing]
    times: dict[str, list[list[float]]] = {n: [] for n in ["floor", *rows]}
    blocks = cfg.get("blocks", 4)
    if together:
        order = [n for k in range(blocks) for n in ["floor", *(rows[k % len(rows):] + rows[:k % len(rows)])]]
        order.append("floor")
    else:
        order = [n for k in range(blocks) for n in (("floor", row) if k % 2 == 0 else (row, "floor"))]
    notes = {}
    probe = min(params, key=lambda p: p.numel())  # a norm's weight
    counters = []
    for name in order:
        weights = probe.detach().clone()
        made = _optimizer(name, model, params, cuda)
        if made is None:
            return {"name": row, "skipped": "lomo_optim is not installed"}
        opt, fused, n, undo = made
        if n:
            notes[name] = n
        step = _stepper(name, model, x, opt, fused)
        block = []
        for i in range(cfg["warmup"] + cfg["steps"]):
            sync()
            if i == cfg["warmup"]:
                before = _counters()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= cfg["warmup"]:
                block.append(time.perf_counter() - t0)
        times[name].append(block)
        counters.append({"block": name, **_delta(before, _counters(), cfg["steps"])})
        # the other mode's hooks are gone: the floor changed nothing, our optimizers counted every step
        counted = (float(opt.state[probe]["step"]) if opt is not None and probe in opt.state
                   and "step" in opt.state[probe] else None)
        undo()
        model.zero_grad(set_to_none=True)
        del opt, step
        if _left_hooks(params):
            raise RuntimeError(f"paired: the {name} block left {_left_hooks(params)} gradient hooks behind")
        if name == "floor" and not torch.equal(weights, probe.detach()):
            raise RuntimeError("paired: a floor block changed the weights (hooks of the row left behind)")
        if counted is not None and counted != cfg["warmup"] + cfg["steps"]:
            raise RuntimeError(f"paired: the {name} block updated {counted:g} times in "
                               f"{cfg['warmup'] + cfg['steps']} steps")
    med = statistics.median
    fb = times["floor"]
    f = [t for b in fb for t in b]
    out = []
    for name in rows:
        rb = times[name]
        r = [t for b in rb for t in b]
        if together:  # the floor blocks that open this round and the next
            ratios = [med(rb[k]) / ((med(fb[k]) + med(fb[k + 1])) / 2) for k in range(blocks)]
        else:
            ratios = [med(rb[k]) / med(fb[k]) for k in range(blocks)]
        o = {"name": name, "paired": True, "blocks": blocks, "steps_per_block": cfg["steps"],
             "floor_ms": round(med(f) * 1e3, 1), "step_ms": round(med(r) * 1e3, 1),
             "time_vs_floor": round(med(ratios) if together else med(r) / med(f), 3),
             "fastest_vs_floor": round(min(r) / min(f), 3),
             # the ratio block by block: its spread says how far the host drifted within the process
             "block_ratios": [round(q, 3) for q in ratios],
             "floor_steps_ms": [round(t * 1e3, 1) for t in f], "steps_ms": [round(t * 1e3, 1) for t in r],
             "counters": [c for c in counters if c["block"] in ("floor", name)]}
        if together:
            o["together"] = rows
        if name in notes:
            o["note"] = notes[name]
        out.append(o)
    out += [{"name": n, "skipped": "lomo_optim is not installed"} for n in missing if together]
    return out if together else out[0]


def child(row: str, cfg: dict) -> dict:
    import torch
    host_probe_ms = _host_probe_ms()
    if row.endswith("_torchpath"):
        os.environ["ADALOMO_DISABLE_TRITON"] = "1"
    cuda = DEV == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cap = float(os.environ.get("BENCH_CAP_GB", "0"))
        if cap:  # emulate a smaller GPU (the 80 GB fit ladder on a 141 GB H200): the allocator refuses beyond it
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 1e9 / total))
    model = _build(cfg)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randint(0, cfg.get("vocab", 32000), (cfg["batch"], cfg["seq"]), device=DEV, generator=g)
    made = _optimizer(row, model, params, cuda)
    if made is None:
        return {"name": row, "skipped": "lomo_optim is not installed"}
    opt, fused, note, _ = made
    step = _stepper(row, model, x, opt, fused)

    times, issued, losses = [], [], []
    counters = None
    for i in range(cfg["warmup"] + cfg["steps"]):
        sync()
        if i == cfg["warmup"]:
            counters = _counters()
        t0 = time.perf_counter()
        loss = step()
        t_issued = time.perf_counter()
        sync()
        t1 = time.perf_counter()
        losses.append(float(loss.detach()))
        if i >= cfg["warmup"]:
            times.append(t1 - t0)
            issued.append(t_issued - t0)
    ms = statistics.median(times) * 1e3
    out = {"name": row, "params_M": round(n_params / 1e6, 1), "step_ms": round(ms, 1),
           "step_ms_min": round(min(times) * 1e3, 1),
           # the host's time to issue a step (step() returned, the device not waited for): near step_ms = the
           # step is host-bound; and the host's speed on a fixed Python loop, to tell a slow or busy host
           "host_issue_ms": round(statistics.median(issued) * 1e3, 1), "host_probe_ms": host_probe_ms,
           "steps_ms": [round(t * 1e3, 1) for t in times], "counters": _delta(counters, _counters(), cfg["steps"]),
           "peak_GB": round(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, 2),
           "tokens_per_s": round(cfg["batch"] * cfg["seq"] / (ms / 1e3)), "loss_first": round(losses[0], 4),
           "loss_last": round(losses[-1], 4)}
    if note:
        out["note"] = note
    if isinstance(getattr(opt, "state", None), dict):  # optimizer state, step counters aside
        out["state_MB"] = round(sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                                    if isinstance(v, torch.Tensor) and v.dim()) / 2**20, 1)
    model = opt = step = None
    gc.collect()
    return out


# ------------------------------------------------------------------------------------------ parent
def _run_child(row: str, cfg: dict, timeout: int) -> dict | list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", row, "--cfg", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"name": row, "error": f"timeout after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            warned = [ln.strip() for ln in proc.stderr.splitlines()
                      if "Warning" in ln and ("src/adalomo/" in ln or "site-packages/adalomo/" in ln)]
            if warned:  # e.g. a kernel setting turned off during the run: the row measured something else
                for one in r if isinstance(r, list) else [r]:
                    one["warnings"] = list(dict.fromkeys(warned))[:5]
            return r
    err = (proc.stderr or proc.stdout).strip().splitlines()
    oom = any("OutOfMemoryError" in ln or "out of memory" in ln for ln in err)
    return {"name": row, "error": "out of memory" if oom else " | ".join(err[-3:])[-400:]}


def _device() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out or "unknown"
    except Exception:
        return "unknown"


def _versions() -> dict:
    code = "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
    try:
        v = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
        return dict(zip(("torch", "triton", "transformers"), v))
    except Exception:
        return {}


def _round_order(names: list[str], k: int) -> list[str]:
    """Round k: the floor rows where they were, the other rows rotated by k (each row early in some rounds)."""
    others = [n for n in names if n != "floor"]
    if not others:
        return list(names)
    k %= len(others)
    rotated = iter(others[k:] + others[:k])
    return [n if n == "floor" else next(rotated) for n in names]


def _ratios(rows: list[dict]) -> None:
    """Time and memory of each row against the floor: the mean of the floors measured in the same round."""
    floors = [r for r in rows if r["name"] == "floor" and "step_ms" in r]
    if not floors:
        return
    f_ms = statistics.mean(r["step_ms"] for r in floors)
    f_gb = max(r["peak_GB"] for r in floors)
    mins = [r["step_ms_min"] for r in floors if "step_ms_min" in r]
    f_min = statistics.mean(mins) if mins else None
    for r in rows:
        if "step_ms" in r:
            r["time_vs_floor"] = round(r["step_ms"] / f_ms, 3)
            r["mem_vs_floor"] = round(r["peak_GB"] / f_gb, 3) if f_gb > 0 else float("nan")
            if f_min and "step_ms_min" in r:  # fastest step against the floor's fastest: what slow steps do not move
                r["fastest_vs_floor"] = round(r["step_ms_min"] / f_min, 3)


def _summarise(rounds: list[list[dict]], names: list[str]) -> list[dict]:
    """One row per name: medians over the rounds of step time, ratio to the floor and tokens/s; the ratios'
    spread; the largest peak."""
    out = []
    for name in dict.fromkeys(names):
        got = [r for rows in rounds for r in rows if r["name"] == name and "time_vs_floor" in r]
        if not got:
            errs = [r for rows in rounds for r in rows if r["name"] == name]
            out.append(errs[0] if errs else {"name": name, "error": "no result"})
            continue
        ratios = [r["time_vs_floor"] for r in got]
        out.append({"name": name, "rounds": len(got), "params_M": got[0].get("params_M"),
                    "step_ms": round(statistics.median(r["step_ms"] for r in got), 1),
                    "time_vs_floor": round(statistics.median(ratios), 3),
                    "time_vs_floor_min": min(ratios), "time_vs_floor_max": max(ratios),
                    "fastest_vs_floor": (round(statistics.median(r["fastest_vs_floor"] for r in got), 3)
                                         if all("fastest_vs_floor" in r for r in got) else None),
                    "peak_GB": max(r["peak_GB"] for r in got),
                    "mem_vs_floor": max(r["mem_vs_floor"] for r in got),
                    "tokens_per_s": int(statistics.median(r["tokens_per_s"] for r in got)),
                    **({"host_issue_ms": round(statistics.median(r["host_issue_ms"] for r in got), 1)}
                       if all("host_issue_ms" in r for r in got) else {}),
                    **({"state_MB": got[0]["state_MB"]} if "state_MB" in got[0] else {}),
                    "note": got[0].get("note", "")})
    return out


def _print_table(rows: list[dict]) -> None:
    """The short table: median step, its ratio to the floor [spread over rounds], the fastest step's ratio to the
    floor's fastest, peak memory and its ratio, tokens/s, the host's time to issue a step, the optimizer state."""
    print(f"{'optimizer':26s} {'step ms':>8s} {'x floor':>8s} {'fastest':>8s} {'peak GB':>8s} {'x floor':>8s} "
          f"{'tokens/s':>9s} {'host ms':>8s} {'state MB':>9s}")
    nan = float("nan")
    for r in rows:
        if "step_ms" in r:
            spread = f"  [{r['time_vs_floor_min']:.3f}-{r['time_vs_floor_max']:.3f}]" if "time_vs_floor_min" in r \
                else ""
            fastest = r.get("fastest_vs_floor")
            print(f"{r['name']:26s} {r['step_ms']:8.1f} {r.get('time_vs_floor', nan):8.3f} "
                  f"{nan if fastest is None else fastest:8.3f} {r['peak_GB']:8.2f} {r.get('mem_vs_floor', nan):8.3f} "
                  f"{r['tokens_per_s']:9d} {r.get('host_issue_ms', nan):8.1f} {r.get('state_MB', nan):9.1f}{spread}")
        else:
            print(f"{r['name']:26s} {r.get('skipped') or r.get('error')}")


def _print_paired(rows: list[dict]) -> None:
    print(f"{'optimizer':26s} {'floor ms':>9s} {'step ms':>8s} {'x floor':>8s} {'fastest':>8s}  per block")
    for r in rows:
        if "step_ms" in r:
            print(f"{r['name']:26s} {r['floor_ms']:9.1f} {r['step_ms']:8.1f} {r['time_vs_floor']:8.3f} "
                  f"{r['fastest_vs_floor']:8.3f}  {' '.join(f'{b:.3f}' for b in r['block_ratios'])}")
        else:
            print(f"{r['name']:26s} {r.get('skipped') or r.get('error')}")


def resummarise(path: str) -> list[dict]:
    """The table of a stored results file, its ratios recomputed from the raw rows (``--summarise``)."""
    with open(path) as f:
        res = json.load(f)
    if res.get("config", {}).get("paired"):
        print(f"{path}: rows against the floor in one process; {res.get('device', '')}")
        _print_paired(res["rows"])
        return res["rows"]
    rounds = res.get("rounds") or [res["rows"]]
    for rows in rounds:
        _ratios(rows)
    names = [r["name"] for r in rounds[0]]
    rows = rounds[0] if len(rounds) == 1 else _summarise(rounds, names)
    print(f"{path}: {len(rounds)} round(s); {res.get('device', '')}")
    _print_table(rows)
    return rows


def _parse_constants(spec: str) -> dict:
    """'A=1;B=(2, 3)' -> {'A': 1, 'B': [2, 3]} (JSON-safe: the child process gets it in its config)."""
    import ast
    out = {}
    for kv in filter(None, spec.split(";")):
        k, _, v = kv.partition("=")
        out[k.strip()] = ast.literal_eval(v.strip())
    return out


def _set_adapm_constants(constants: dict) -> dict:
    """Set module constants of adalomo.kernels.adapm; returns their previous values."""
    from adalomo.kernels import adapm as KA
    old = {}
    for k, v in constants.items():
        if not hasattr(KA, k):
            raise ValueError(f"adalomo.kernels.adapm has no constant {k}")
        old[k] = getattr(KA, k)
        setattr(KA, k, tuple(v) if isinstance(v, list) else v)
    KA._PLANS.clear()  # the cached launch plans hold geometry derived from them
    return old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarise", metavar="JSON", help="print the table of a stored results file (ratios recomputed, "
                                                        "fastest-step ratios added) and exit")
    ap.add_argument("--config", default="0.94b", choices=sorted(CONFIGS))
    ap.add_argument("--only", default=",".join(ROWS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=None, help="seconds per row")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the rows this many times (the rows between the floors in another order each time) and "
                         "report each row's median ratio to the floors of its own round: drift of the machine "
                         "during a run (seen: 8%%) then biases no row")
    ap.add_argument("--paired", type=int, default=0, metavar="BLOCKS",
                    help="each row of --only against the floor in one process, in BLOCKS alternating blocks of "
                         "--steps steps (floor, row, row, floor, ...): ratios free of the differences between "
                         "processes; no memory figures")
    ap.add_argument("--together", action="store_true",
                    help="with --paired: every row of --only and the floor in ONE process, each round in a rotated "
                         "order (the rows compared under the same drift of the host)")
    ap.add_argument("--fit", action="store_true", help="largest model that fits: adalomo_fused vs torch_adamw_fused")
    ap.add_argument("--fit-sizes", default=",".join(FIT_LADDER))
    ap.add_argument("--cap-gb", type=float, default=None,
                    help="cap each child's CUDA allocator at this many GB (1e9 bytes), e.g. 80 on a 141 GB H200")
    ap.add_argument("--adapm-constants", default="", metavar="'NAME=VALUE;...'",
                    help="module constants of adalomo.kernels.adapm (tiles, warps) set in every row's "
                         "process: AdaPM kernel variants compared end to end, each against its own floor")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.summarise:
        resummarise(args.summarise)
        return

    if args.child:
        try:
            cfg = json.loads(args.cfg)
            _set_adapm_constants(cfg.get("adapm_constants", {}))
            r = (paired if cfg.get("paired") else child)(args.child, cfg)
        except Exception as e:  # the parent reports it
            import traceback
            traceback.print_exc()
            oom = "out of memory" in repr(e).lower()
            r = {"name": args.child, "error": "out of memory" if oom else repr(e)[:300]}
        print("RESULT " + json.dumps(r), flush=True)
        return

    if args.cap_gb:
        os.environ["BENCH_CAP_GB"] = str(args.cap_gb)
    res = {"command": " ".join(["python3"] + sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": _device(), "cap_GB": args.cap_gb, **_versions()}
    constants = _parse_constants(args.adapm_constants)
    print(res, flush=True)
    if args.fit:
        fits = []
        for size in args.fit_sizes.split(","):
            layers, hidden, inter, heads = FIT_LADDER[size]
            cfg = dict(layers=layers, hidden=hidden, inter=inter, heads=heads, batch=1, seq=1024, ckpt=True,
                       warmup=1, steps=2)
            for row in ("adalomo_fused", "torch_adamw_fused"):
                r = _run_child(row, cfg, args.timeout or 420)
                r.update(size=size, fits="error" not in r)
                fits.append(r)
                print(json.dumps(r), flush=True)
        res["fit"] = fits
        print("\nlargest model that fits (batch 1x1024, gradient checkpointing, bf16):")
        for row in ("adalomo_fused", "torch_adamw_fused"):
            ok = [r for r in fits if r["name"] == row and r["fits"]]
            best = max(ok, key=lambda r: r["params_M"]) if ok else None
            what = f"{best['size']} ({best['params_M']}M params, peak {best['peak_GB']} GB)" if best else "none"
            print(f"  {row:20s} {what}")
    elif args.paired:
        cfg = dict(CONFIGS[args.config], paired=True, blocks=args.paired, adapm_constants=constants)
        if args.steps:
            cfg["steps"] = args.steps
        if args.warmup is not None:
            cfg["warmup"] = args.warmup
        res["config"] = {"name": args.config, **cfg}
        rows = []
        names = [n for n in args.only.split(",") if n != "floor"]
        for row in [",".join(names)] if args.together else names:
            r = _run_child(row, cfg, args.timeout or (300 if args.config == "0.94b" else 600))
            rows.extend(r if isinstance(r, list) else [r])
            print(json.dumps(r), flush=True)
            _write(args.out, {**res, "rows": rows, "complete": False})
        res["rows"], res["complete"] = rows, True
        what = (f"all rows and the floor in one process, {args.paired} rounds of blocks of" if args.together else
                f"each row against the floor in one process, {args.paired} alternating blocks of")
        print(f"\n{args.config}: {what} {cfg['steps']} steps after {cfg['warmup']} each; {res['device']}")
        _print_paired(rows)
    else:
        cfg = dict(CONFIGS[args.config], adapm_constants=constants)
        if args.steps:
            cfg["steps"] = args.steps
        if args.warmup is not None:
            cfg["warmup"] = args.warmup
        res["config"] = {"name": args.config, **cfg}
        names = args.only.split(",")
        if args.rounds > 1 and "floor" not in names:
            raise SystemExit("--rounds needs a floor row to take the ratios against")
        rounds = []
        for k in range(args.rounds):
            order = _round_order(names, k)
            rows = []
            for row in order:
                r = _run_child(row, cfg, args.timeout or (300 if args.config == "0.94b" else 600))
                r["round"] = k
                rows.append(r)
                print(json.dumps(r), flush=True)
                _write(args.out, {**res, "rounds": rounds + [rows], "complete": False})  # kept if a limit kills us
            _ratios(rows)
            rounds.append(rows)
        rows = rounds[0] if args.rounds == 1 else _summarise(rounds, names)
        res["rows"] = rows
        if args.rounds > 1:
            res["rounds"] = rounds
        res["complete"] = True
        print(f"\n{args.config}: batch {cfg['batch']}x{cfg['seq']}, ckpt={cfg['ckpt']}, median of {cfg['steps']} "
              f"steps after {cfg['warmup']}" + (f"; median over {args.rounds} rounds of the ratio to the floors of "
                                                 "the same round [min-max]" if args.rounds > 1 else "")
              + f"; {res['device']}")
        _print_table(rows)
    _write(args.out, res)


def _write(path: str | None, res: dict) -> None:
    """The results file, replaced whole (a reader never sees half of one); written after every row too, so that a
    run stopped by its time limit keeps the rows it finished (``--summarise`` reads either)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
