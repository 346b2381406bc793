"""The Triton kernels compile for a Hopper GPU (sm_90) without one: Triton's own compiler and ptxas, run on CPU.

The interpreter (``test_kernels.py``) checks what the kernels compute, not that they compile: a kernel can run
interpreted and fail in the compiler (a dtype the lowering rejects, a constexpr branch the interpreter never
takes). This compiles every kernel, single-tensor and grouped, in the variants the optimizers launch, and reads
the machine code (``cuobjdump -sass``, shipped with Triton) for properties that only show there:

* no register spills (local-memory loads/stores) in the streaming kernels at the default launch geometry;
* the software-pipelined variants (kernel setting ``pipeline_depth``) really copy their tiles asynchronously
  (LDGSTS), which is what that setting is for;
* stochastic rounding's random bits stay cheap: at most 25 more instructions per element in the write kernels
  than the same kernels with round-to-nearest (the hash: ~12; Triton's Philox per element: ~55, which made the
  write kernels 2.5x slower on an H200; see docs/kernels.md).

It runs in a subprocess (``python tests/test_kernels_sm90.py`` prints one JSON verdict per kernel), so that
importing Triton in compiled mode does not leak into the pytest process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_FLOATS = {"eps1", "numel_f", "sqrt_numel", "rho", "eps2", "clip_threshold", "beta1", "one_minus_beta1", "beta2",
           "one_minus_beta2", "col_count", "lr", "weight_decay", "clip_value"}
_PTRS = {"g_ptr": "*bf16", "p_ptr": "*bf16", "meta_ptr": "*i64", "pmap_ptr": "*i32",
         "ok_ptr": "*i1", "oks_ptr": "*i1"}


def _variants(tl):
    """(name, kernel, constexprs, num_warps, streaming[, options]) for every kernel in the variants the optimizers
    launch: the grouped ones, and the single-tensor ones of the FSDP2 path."""
    from adalomo.kernels import factored, grouped, lomo, one_read, vector
    from adalomo.kernels.config import CONFIG as C
    from adalomo.kernels.config import VEC_BLOCK

    bm, bn = C["block_m"], C["block_n"]
    tile = dict(ALIGN=True, G_UNIT=True, BLOCK_M=bm, BLOCK_N=bn)
    bf = dict(G_DT=tl.bfloat16, P_DT=tl.bfloat16)
    wr = dict(HAS_SCALE=False, SCALE_PARAM=True, HAS_WD=True, HAS_M=False, P_UNIT=True)
    lw = dict(HAS_SCALE=False, HAS_WD=False, HAS_CLIP=False, P_UNIT=True)
    ws, wu, ww = C["warps_stats"], C["warps_usq"], C["warps_write"]
    rs = dict(DEPTH=C["pipeline_depth"])
    g_write = dict(tile, **bf, **wr, SR=True, RP_BLOCK=64)
    out = [
        ("factored_stats", factored.factored_stats_kernel, dict(tile, HAS_SCALE=True, SUM_P=True, P_UNIT=True), ws,
         True),
        ("factored_finalize", factored.factored_finalize_kernel, dict(BLOCK=128, PB=32), 4, False),
        ("factored_rms", factored.factored_rms_kernel, dict(tile, HAS_SCALE=False, RP_BLOCK=64, WEIGHTS=False), wu,
         True),
        ("factored_rms_weights", factored.factored_rms_kernel, dict(tile, HAS_SCALE=True, RP_BLOCK=2, WEIGHTS=True),
         wu, True),
        ("vector_stats", vector.vector_stats_kernel, dict(HAS_SCALE=False, SUM_P=True, G_UNIT=True, P_UNIT=True,
                                                          BLOCK=VEC_BLOCK), 4, True),
        ("vector_write", vector.vector_write_kernel, dict(wr, SR=True, G_UNIT=True, BLOCK=VEC_BLOCK), 4, True),
        ("lomo_sum", lomo.lomo_sum_kernel, dict(tile), wu, True),
        ("grouped_factored_stats", factored.grouped_factored_stats_kernel,
         dict(tile, **bf, HAS_SCALE=False, SUM_P=True, P_UNIT=True, **rs), ws, True),
        ("grouped_factored_finalize", factored.grouped_factored_finalize_kernel, dict(BLOCK=128, PB=32), 4, False),
        ("grouped_factored_rms", factored.grouped_factored_rms_kernel,
         dict(tile, G_DT=tl.bfloat16, HAS_SCALE=False, RP_BLOCK=64, **rs), wu, True),
        ("grouped_finish", grouped.grouped_finish_kernel,
         dict(FIN_SCALE=False, HAS_USQ=True, HAS_PSQ=True, BLOCK=1024), 4, False),
        ("grouped_vector_stats", vector.grouped_vector_stats_kernel,
         dict(**bf, HAS_SCALE=False, SUM_P=True, G_UNIT=True, P_UNIT=True, BLOCK=VEC_BLOCK), 4, True),
        ("grouped_vector_write", vector.grouped_vector_write_kernel,
         dict(**bf, **wr, SR=True, G_UNIT=True, BLOCK=VEC_BLOCK), 4, True),
        ("grouped_lomo_sum", lomo.grouped_lomo_sum_kernel, dict(tile, G_DT=tl.bfloat16, **rs), wu, True),
        # the read passes' row loops software-pipelined (kernel setting pipeline_depth > 1): their loads must become
        # asynchronous copies into shared memory (LDGSTS), else the setting changes nothing
        ("grouped_factored_stats_depth3", factored.grouped_factored_stats_kernel,
         dict(tile, **bf, HAS_SCALE=False, SUM_P=True, P_UNIT=True, DEPTH=3), ws, True),
        ("grouped_factored_rms_depth3", factored.grouped_factored_rms_kernel,
         dict(tile, G_DT=tl.bfloat16, HAS_SCALE=False, RP_BLOCK=64, DEPTH=3), wu, True),
        ("grouped_lomo_sum_depth3", lomo.grouped_lomo_sum_kernel, dict(tile, G_DT=tl.bfloat16, DEPTH=3), wu, True),
        # the one-read statistics (kernel setting one_read) at the row widths of LLaMA 0.94B/6.7B and the widest
        ("grouped_factored_finalize_one_read", one_read.grouped_factored_finalize_one_read_kernel,
         dict(BLOCK=128, PB=32), 4, False),
    ]
    for nb in (2048, 4096, C["one_read_max_n"]):
        for sum_p in (True, False):  # RMS(p) or not (scale_parameter)
            out.append((f"grouped_factored_stats_one_read_{nb}" + ("" if sum_p else "_nop"),
                        one_read.grouped_factored_stats_one_read_kernel,
                        dict(**bf, HAS_SCALE=False, SUM_P=sum_p, ALIGN=True, G_UNIT=True, P_UNIT=True,
                             BLOCK_M=one_read.tile_rows(nb), NB=nb), C["warps_one_read"], True))
    for sr in (True, False):
        tag = "" if sr else "_nosr"
        out += [
            ("factored_write" + tag, factored.factored_write_kernel, dict(tile, **wr, SR=sr, RP_BLOCK=64), ww, True),
            ("lomo_write" + tag, lomo.lomo_write_kernel, dict(tile, **lw, SR=sr), ww, True),
            ("grouped_factored_write" + tag, factored.grouped_factored_write_kernel,
             dict(g_write, SR=sr), ww, True),
            ("grouped_lomo_write" + tag, lomo.grouped_lomo_write_kernel, dict(tile, **bf, **lw, SR=sr), ww, True),
        ]
    return out


def _compile_all(variants=None, floats: tuple[str, ...] = ()) -> dict:
    """Compile ``variants(tl)`` (default: ``_variants``, the kernels of this file's docstring; ``floats``: more
    argument names that take Python floats) for sm_90: per kernel its instruction count, spills, registers and
    asynchronous copies."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, os.path.join(ROOT, "src"))
    from adalomo.kernels.config import CONFIG

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    target = GPUTarget("cuda", 90, 32)
    res = {"_elements_per_thread_write": CONFIG["block_m"] * CONFIG["block_n"] // (32 * CONFIG["warps_write"])}
    for name, fn, consts, warps, streaming, *opts in (variants or _variants)(tl):
        try:
            sig = {}
            for a in fn.arg_names:
                if a in consts:
                    sig[a] = "constexpr"
                elif a in _PTRS or a.endswith("_ptr"):
                    sig[a] = _PTRS.get(a, "*fp32")
                elif a == "seed":
                    sig[a] = "i64"
                else:
                    sig[a] = "fp32" if a in _FLOATS or a in floats else "i32"
            ptr_idx = [i for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")]
            src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                            attrs={(i,): [["tt.divisibility", 16]] for i in ptr_idx})
            ck = triton.compile(src, target=target, options={"num_warps": warps, **(opts[0] if opts else {})})
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"adalomo_{os.getpid()}_{name}.cubin")
            with open(path, "wb") as f:
                f.write(ck.asm["cubin"])
            sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, timeout=60).stdout
            usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
            regs = re.search(r"REG:(\d+)", usage)
            os.unlink(path)
            ins = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
            spills = sum(1 for ln in ins if re.search(r"\b(LDL|STL)(\.|\s)", ln))
            res[name] = {"ok": True, "instructions": len(ins), "spills": spills, "streaming": streaming,
                         "registers": int(regs.group(1)) if regs else None,
                         "async_copies": sum(1 for ln in ins if re.search(r"\bLDGSTS\b", ln))}
        except Exception as e:  # report every kernel
            res[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
    return res


def _toolchain_missing() -> str | None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as e:
        return f"triton is not importable: {e}"
    nvidia = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(os.path.join(nvidia, tool), os.X_OK):
            return f"triton ships no {tool}"
    return None


def test_kernels_compile_for_sm90():
    why = _toolchain_missing()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADALOMO_TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1])
    failed = {k: v["error"] for k, v in res.items() if not k.startswith("_") and not v["ok"]}
    assert not failed, failed
    spilled = {k: v["spills"] for k, v in res.items() if not k.startswith("_") and v["streaming"] and v["spills"]}
    assert not spilled, f"register spills (local memory) in streaming kernels: {spilled}"
    not_pipelined = [k for k, v in res.items() if k.endswith("_depth3") and not v["async_copies"]]
    assert not not_pipelined, f"DEPTH=3 left these loops unpipelined (no LDGSTS): {not_pipelined}"
    per_thread = res["_elements_per_thread_write"]
    for k in ("factored_write", "lomo_write", "grouped_factored_write", "grouped_lomo_write"):
        extra = (res[k]["instructions"] - res[k + "_nosr"]["instructions"]) / per_thread
        assert extra <= 25, f"{k}: stochastic rounding costs {extra:.1f} instructions per element"


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
