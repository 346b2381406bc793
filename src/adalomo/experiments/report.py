"""results.json, results.md and PNG plots (matplotlib, Agg backend) for an experiment."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

MIB = 2**20


# a list that json.dumps(indent=...) spread over lines (never inside a string: strings hold no raw newline)
_NUM_LIST = re.compile(r"\[\n\s*((?:-?[\d.eE+-]+|NaN|-?Infinity|null)(?:,\n\s*(?:-?[\d.eE+-]+|NaN|-?Infinity|null))*)"
                       r"\n\s*\]")


def write_json(results: dict, path: Path) -> Path:
    """Indented JSON, but lists of numbers (the loss curves) on one line each: small and still readable."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    text = json.dumps(results, indent=1, allow_nan=True)
    text = _NUM_LIST.sub(lambda m: "[" + ",".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path


def _fmt(v, spec=".3f", none="–"):
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "nan"
    return format(v, spec)


def _mib(v):
    return "–" if v is None else f"{v / MIB:.2f}"


def summary_line(label: str, r: dict) -> str:
    parts = [f"{label}: train loss {_fmt(r.get('final_train_loss'))}", f"test loss {_fmt(r.get('eval_loss'))}"]
    if r.get("bleu") is not None:
        parts.append(f"BLEU {r['bleu']:.2f}")
    elif r.get("eval_ppl") is not None:
        parts.append(f"ppl {_fmt(r['eval_ppl'], '.1f')}")
    parts.append(f"{r['wall_time_s']:.1f}s ({r['time_per_step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s)")
    if r.get("diverged"):
        parts.append("DIVERGED")
    return ", ".join(parts)


def markdown_table(results: dict) -> str:
    runs = results["runs"]
    lm = results["task"] != "seq2seq"
    cuda = any(r["memory"].get("peak_total") is not None for r in runs.values())
    head = ["optimizer", "lr", "steps", "train loss", "test loss", "test ppl" if lm else "BLEU",
            "params MiB", "grads MiB", "opt state MiB", "saved act. MiB"]
    if cuda:
        head += ["act.+other MiB", "peak MiB"]
    head += ["wall s", "ms/step", "tokens/s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, r in runs.items():
        m = r["memory"]
        name = f"{label}{' (fused)' if r.get('fused') else ''}{' DIVERGED' if r.get('diverged') else ''}"
        metric = _fmt(r.get("eval_ppl"), ".1f") if lm else _fmt(r.get("bleu"), ".2f")
        row = [name, f"{r['lr']:g}", str(r["steps"]), _fmt(r.get("final_train_loss")), _fmt(r.get("eval_loss")),
               metric, _mib(m["parameters"]), _mib(m["gradients"]), _mib(m["optimizer_state"]),
               _mib(m.get("activations_saved"))]
        if cuda:
            row += [_mib(m.get("activations_and_other")), _mib(m.get("peak_total"))]
        row += [f"{r['wall_time_s']:.1f}", f"{r['time_per_step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}"]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def time_to_target(results: dict, reference: str = "adamw") -> dict | None:
    """The paper's way of counting GPU hours: the training wall time each run needs to reach the reference
    optimizer's final validation loss (the first run of ``reference``), from the validation curves
    (``--eval-every``), linearly interpolated between two evaluations. None without a reference run that has a
    validation curve. Per run: ``final_valid_loss``, ``time_s`` (None if never reached) and ``vs_reference``
    (time_s / the reference's time: below 1 saves time)."""
    runs = results["runs"]
    ref_label = next((k for k, r in runs.items() if r["optimizer"] == reference and r.get("eval_curve")), None)
    if ref_label is None:
        return None
    target = runs[ref_label]["eval_curve"][-1][2]
    out = {}
    for label, r in runs.items():
        curve = r.get("eval_curve") or []
        if not curve:
            continue
        t_hit, prev = None, (0.0, math.inf)
        for _, t, loss in curve:
            if loss <= target:
                t0, l0 = prev
                # linear between the previous evaluation and this one (the first one: its own time)
                t_hit = t if not math.isfinite(l0) else t0 + (t - t0) * (l0 - target) / max(l0 - loss, 1e-12)
                break
            prev = (t, loss)
        out[label] = {"final_valid_loss": curve[-1][2], "time_s": t_hit}
    ref_t = out[ref_label]["time_s"]
    for v in out.values():
        v["vs_reference"] = None if v["time_s"] is None or not ref_t else v["time_s"] / ref_t
    return {"reference": ref_label, "target_valid_loss": target, "runs": out}


def time_to_target_table(ttt: dict) -> str:
    rows = [f"Time to {ttt['reference']}'s final validation loss ({ttt['target_valid_loss']:.4f}), training wall "
            "time only, interpolated between evaluations:", "",
            "| run | final valid loss | time to target (s) | x reference |", "|---|---:|---:|---:|"]
    for label, v in ttt["runs"].items():
        t = "not reached" if v["time_s"] is None else f"{v['time_s']:.1f}"
        rows.append(f"| {label} | {v['final_valid_loss']:.4f} | {t} | {_fmt(v['vs_reference'], '.2f')} |")
    return "\n".join(rows)


def write_markdown(results: dict, path: Path, plots=()) -> Path:
    path = Path(path)
    c, env, model = results["corpus"], results["environment"], results.get("model") or {}
    cfg = results["config"]
    lines = [f"# adalomo experiment: {results['task']}", ""]
    lines.append(f"- corpus: **{c['description']}**")
    sizes = {k: v for k, v in c.items() if k.endswith(("tokens", "pairs", "vocab_size"))}
    lines.append("- corpus size: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
    for note in c.get("notes", []):
        lines.append(f"- note: {note}")
    if results.get("command"):
        lines.append(f"- command: `{results['command']}`")
    lines.append(f"- device: {env.get('device')} ({env.get('device_name')}), torch {env.get('torch')}, "
                 f"{env.get('threads')} threads, dtype {cfg.get('dtype')}, seed {cfg.get('seed')}, "
                 f"batch {cfg.get('batch_size')}" + (f", seq_len {cfg['seq_len']}" if cfg.get("seq_len") else ""))
    if model:
        desc = ", ".join(f"{k}={v}" for k, v in model.items() if k not in ("type", "n_params"))
        lines.append(f"- model: {model.get('type')} with {model.get('n_params', 0):,} parameters ({desc})")
    lines.append(f"- created {results.get('created')}")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", markdown_table(results), ""]
    ttt = results.get("time_to_target")
    if ttt:
        lines += [time_to_target_table(ttt), ""]
    lines += [
        "- train loss: mean training cross-entropy over the last "
        f"{next(iter(results['runs'].values()))['final_train_loss_window'] if results['runs'] else '?'} steps; "
        "test loss/ppl: on the test split after training"
        + ("; BLEU: sacrebleu corpus BLEU of greedy translations of the test split" if results["task"] == "seq2seq"
           else "") + ".",
        "- memory (exact byte counts): params = parameter tensors; grads = the most `.grad` bytes alive at "
        "once (a fused optimizer frees each gradient during backward); opt state = tensors in "
        "`optimizer.state`; saved act. = tensors saved for backward during one forward (parameters "
        "excluded)." + (" act.+other = `torch.cuda.max_memory_allocated` peak minus params, grads and "
                        "state (activations, temporaries, allocator slack)." if any(
                            r["memory"].get("peak_total") for r in results["runs"].values()) else
                        " On CPU the process peak is not attributable, so no total is reported."),
        "- wall s: the whole training loop (evaluation excluded); ms/step: the median step after the first "
        "min(10, steps/5) (one-off kernel compilation and warm-up), so that another job's burst on a shared "
        "machine does not count against one optimizer; tokens/s: tokens per step over that median.",
        "",
    ]
    for p in plots:
        lines.append(f"![{Path(p).stem}]({Path(p).name})")
    samples = [(label, r.get("samples")) for label, r in results["runs"].items() if r.get("samples")]
    if samples:
        lines += ["", "## Sample translations (test split, greedy)", ""]
        first = samples[0][1]
        for i, s in enumerate(first):
            lines.append(f"{i + 1}. source: `{s['source']}`  ")
            lines.append(f"   reference: `{s['reference']}`  ")
            for label, ss in samples:
                if i < len(ss):
                    lines.append(f"   {label}: `{ss[i]['hypothesis']}`  ")
    path.write_text("\n".join(lines) + "\n")
    return path


def _ema(xs, alpha):
    out, m = [], None
    for x in xs:
        if not math.isfinite(x):
            out.append(float("nan"))
            continue
        m = x if m is None else (1 - alpha) * m + alpha * x
        out.append(m)
    return out


def plot_losses(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=80)
    lo, hi, first = math.inf, -math.inf, -math.inf
    for i, (label, r) in enumerate(results["runs"].items()):
        curve = r["loss_curve"]
        if not curve["loss"]:
            continue
        n = len(curve["loss"])
        sm = _ema(curve["loss"], alpha=min(1.0, 20.0 / max(n, 1)))
        color = f"C{i % 10}"
        for ax, x in ((axes[0], curve["step"]), (axes[1], curve["time_s"])):
            ax.plot(x, curve["loss"], color=color, alpha=0.18, lw=0.7)
            ax.plot(x, sm, color=color, lw=1.6, label=f"{label} (lr {r['lr']:g})")
        tail = [v for v in sm[n // 10:] if math.isfinite(v)]
        if tail:
            lo, hi = min(lo, min(tail)), max(hi, max(tail))
        if math.isfinite(curve["loss"][0]):
            first = max(first, curve["loss"][0])
        for step, t, loss in r.get("eval_curve") or []:
            axes[0].plot(step, loss, "o", color=color, ms=3)
            axes[1].plot(t, loss, "o", color=color, ms=3)
    ttt = results.get("time_to_target")
    if ttt:
        axes[1].axhline(ttt["target_valid_loss"], color="gray", ls="--", lw=0.8,
                        label=f"{ttt['reference']}'s final validation loss")
    for ax, xl in ((axes[0], "step"), (axes[1], "wall time (s, training only)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("train loss (cross-entropy)")
        ax.grid(alpha=0.3)
        if math.isfinite(first):
            hi = min(hi, first)  # a diverging run must not squash the others
        if math.isfinite(lo) and hi > lo:
            pad = 0.08 * (hi - lo)
            ax.set_ylim(lo - pad, hi + 3 * pad)
    axes[0].legend(fontsize=8)
    if ttt:
        axes[1].legend(handles=axes[1].get_lines()[-1:], fontsize=8)
    fig.suptitle(f"{results['task']} on {results['corpus']['name']}: loss vs step and vs wall time "
                 "(faint: per step, solid: EMA)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_memory(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    cuda = any(r["memory"].get("peak_total") for r in runs.values())
    act_key = "activations_and_other" if cuda else "activations_saved"
    parts = [("parameters", "parameters"), ("gradients", "gradients (max live)"),
             ("optimizer_state", "optimizer state"),
             (act_key, "activations + other" if cuda else "saved activations")]
    labels = list(runs)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.6), dpi=90)
    left = [0.0] * len(labels)
    for i, (key, name) in enumerate(parts):
        vals = [(runs[lb]["memory"].get(key) or 0) / MIB for lb in labels]
        ax.barh(labels, vals, left=left, color=f"C{i}", label=name)
        left = [a + b for a, b in zip(left, vals)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.1f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title(f"{results['task']}: memory by component" + ("" if cuda else " (CPU: exact tensor sizes)"),
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, max(left + [1e-3]) * 1.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


_FREE_SETTINGS = {"optimizers", "lr", "out", "quiet", "log_every"}


def merge_results(parts: list[dict], sources: list[str] | None = None, notes: list[str] = ()) -> dict:
    """One experiment from the runs of several outputs of identical settings (e.g. split by a time limit).

    Every run starts from the same seed, weights and data order, so runs of the same configuration are
    comparable. Raises ValueError when task, corpus, model or any setting other than the optimizer list and
    the output directory differ, or when a run label repeats. Each source command is kept in the notes.
    """
    sources = list(sources or [f"part {i}" for i in range(len(parts))])
    first = parts[0]
    base = {k: v for k, v in first["config"].items() if k not in _FREE_SETTINGS}
    merged = {**first, "runs": {}, "command": "", "notes": list(first.get("notes", []))}
    for src, r in zip(sources, parts):
        cfg = {k: v for k, v in r["config"].items() if k not in _FREE_SETTINGS}
        diff = sorted(k for k in set(cfg) | set(base) if cfg.get(k) != base.get(k))
        if r["task"] != first["task"] or r["corpus"] != first["corpus"]:
            diff = diff or ["task/corpus"]
        if r.get("model") and first.get("model") and r["model"] != first["model"]:
            diff.append("model")
        if diff:
            raise ValueError(f"cannot merge {src} with {sources[0]}: they differ in {', '.join(diff)}")
        for label, run in r["runs"].items():
            if label in merged["runs"]:
                raise ValueError(f"cannot merge: run {label!r} appears twice")
            merged["runs"][label] = run
        merged["notes"].append(f"runs {', '.join(r['runs'])} from `{r.get('command') or '?'}` "
                               f"({r.get('created')}, {r['environment'].get('device_name')})")
    merged["notes"] += list(notes)
    return merged


def write_all(results: dict, out: Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if results["runs"]:
        results["time_to_target"] = time_to_target(results)
        plots = [plot_losses(results, out / "loss.png"), plot_memory(results, out / "memory.png")]
    return {"json": write_json(results, out / "results.json"),
            "md": write_markdown(results, out / "results.md", plots), "plots": plots}
