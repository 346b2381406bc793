"""The fine-tuning report: per optimizer the score at its default lr, its best lr and score and the width of its
good band (:func:`summarize`); results.json, results.md and plots (score vs lr, loss curves, memory)."""

from __future__ import annotations

import math
from pathlib import Path

from .report import _fmt, _mib, plot_losses, plot_memory, summary_line, write_json

#: a sweep point is "good" when its score is at most (1 + this) x the optimizer's best score
GOOD_BAND_TOLERANCE = 0.05
#: every optimizer's default is also compared with this optimizer's best (the issue's yardstick)
REFERENCE = "adamw"

__all__ = ["GOOD_BAND_TOLERANCE", "REFERENCE", "summarize", "run_line", "write_all", "write_json"]


def _score(r: dict) -> float:
    """A run's score (a perplexity: lower is better); a diverged run's is infinite."""
    s = r.get("score")
    return s if s is not None and math.isfinite(s) else math.inf


def _ratio(a, b):
    return a / b - 1 if a is not None and b and math.isfinite(a) and math.isfinite(b) else None


def good_band(lrs: list[float], scores: list[float]) -> dict | None:
    """The lrs (sorted) next to the best one whose scores are all within ``GOOD_BAND_TOLERANCE`` of the best:
    ``lr_min``, ``lr_max``, ``ratio`` = lr_max / lr_min, ``points`` inside it; ``open_low``/``open_high`` when it
    reaches an end of the sweep (the true band may be wider). None for fewer than 3 points or none finite."""
    finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
    if len(lrs) < 3 or not finite:
        return None
    best = min(finite, key=scores.__getitem__)
    bound = (1 + GOOD_BAND_TOLERANCE) * scores[best]
    lo = hi = best
    while lo > 0 and scores[lo - 1] <= bound:
        lo -= 1
    while hi < len(lrs) - 1 and scores[hi + 1] <= bound:
        hi += 1
    return {"lr_min": lrs[lo], "lr_max": lrs[hi], "ratio": lrs[hi] / lrs[lo], "points": hi - lo + 1,
            "sweep_points": len(lrs), "open_low": lo == 0, "open_high": hi == len(lrs) - 1}


def summarize(runs: dict, reference: str = REFERENCE) -> dict:
    """Per optimizer: its sweep (lrs, scores), the default lr and its score, the best lr and score, the good
    band, BLEU where the task has it, memory and speed at the default; ``default_vs_best`` and
    ``default_vs_reference_best`` are relative differences (score / best - 1: positive is worse)."""
    groups: dict[str, list[dict]] = {}
    for r in runs.values():
        groups.setdefault(r["optimizer"], []).append(r)
    out = {}
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["lr"])
        scores = [_score(r) for r in rs]
        default = next((r for r in rs if r.get("is_default")), None)
        best_i = min(range(len(rs)), key=scores.__getitem__)
        best = scores[best_i] if math.isfinite(scores[best_i]) else None
        s = {"lrs": [r["lr"] for r in rs], "scores": [x if math.isfinite(x) else None for x in scores],
             "default_lr": default["lr"] if default else None,
             "default_score": _score(default) if default and math.isfinite(_score(default)) else None,
             "best_lr": rs[best_i]["lr"] if best is not None else None, "best_score": best,
             "band": good_band([r["lr"] for r in rs], scores)}
        s["default_vs_best"] = _ratio(s["default_score"], best)
        if any(r.get("bleu") is not None for r in rs):
            top = max((r for r in rs if r.get("bleu") is not None), key=lambda r: r["bleu"])
            s.update(default_bleu=default.get("bleu") if default else None, best_bleu=top["bleu"],
                     best_bleu_lr=top["lr"])
        if default:
            s.update(default_source_ppl=default.get("source_ppl"), memory=default["memory"],
                     time_per_step_s=default["time_per_step_s"], tokens_per_s=default["tokens_per_s"])
        out[name] = s
    ref_best = out.get(reference, {}).get("best_score")
    for s in out.values():
        s["default_vs_reference_best"] = _ratio(s["default_score"], ref_best)
    return out


def _pct(x):
    return "–" if x is None else f"{100 * x:+.1f}%"


def _band(b):
    if b is None:
        return "–"
    if b["points"] == 1:
        edge = "+" if b["open_high"] else ("-" if b["open_low"] else "")
        return f"{b['lr_min']:g}{edge} only, 1/{b['sweep_points']} points"
    lo, hi = ("≤" if b["open_low"] else "") + f"{b['lr_min']:g}", f"{b['lr_max']:g}" + ("+" if b["open_high"] else "")
    width = ("≥" if b["open_low"] or b["open_high"] else "") + f"{b['ratio']:.3g}x"
    return f"{lo} .. {hi}: {width}, {b['points']}/{b['sweep_points']} points"


def run_line(label: str, r: dict) -> str:
    """The log line of a run: the other experiments' line (test loss is the score's), then forgetting."""
    line = summary_line(label, r)
    return line + (f", source ppl {_fmt(r['source_ppl'], '.1f')}" if r.get("source_ppl") is not None else "")


def _summary_table(task: dict, summary: dict) -> list[str]:
    sft = task["name"] == "sft"
    head = ["optimizer", "default lr", "score at default", "best lr", "best score", "default vs own best",
            f"default vs {REFERENCE} best", f"good band (within {100 * GOOD_BAND_TOLERANCE:g}% of best)"]
    head += ["BLEU at default", "best BLEU (lr)"] if sft else ["source ppl at default"]
    head += ["opt state MiB", "grads MiB", "ms/step"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, s in summary.items():
        mem = s.get("memory") or {}
        row = [name, _fmt(s["default_lr"], "g"), _fmt(s["default_score"], ".2f"), _fmt(s["best_lr"], "g"),
               _fmt(s["best_score"], ".2f"), _pct(s["default_vs_best"]), _pct(s["default_vs_reference_best"]),
               _band(s["band"])]
        if sft:
            row += [_fmt(s.get("default_bleu"), ".2f"),
                    f"{s['best_bleu']:.2f} ({s['best_bleu_lr']:g})" if s.get("best_bleu") is not None else "–"]
        else:
            row.append(_fmt(s.get("default_source_ppl"), ".1f"))
        row += [_mib(mem.get("optimizer_state")), _mib(mem.get("gradients")),
                _fmt(s["time_per_step_s"] * 1e3 if s.get("time_per_step_s") else None, ".1f")]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def _runs_table(task: dict) -> list[str]:
    sft = task["name"] == "sft"
    head = ["run", "lr", "steps", "train loss", "score", "BLEU" if sft else "source ppl", "tokens/s", "wall s"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, r in sorted(task["runs"].items(), key=lambda kv: (kv[1]["optimizer"], kv[1]["lr"])):
        name = label + (" (default)" if r.get("is_default") else "") + (" DIVERGED" if r.get("diverged") else "")
        other = _fmt(r.get("bleu"), ".2f") if sft else _fmt(r.get("source_ppl"), ".1f")
        rows.append("| " + " | ".join([name, f"{r['lr']:g}", str(r["steps"]), _fmt(r.get("final_train_loss")),
                                       _fmt(r.get("score"), ".2f"), other, f"{r['tokens_per_s']:,.0f}",
                                       f"{r['wall_time_s']:.1f}"]) + " |")
    return rows


def _goal_line(summary: dict) -> str | None:
    a, w = summary.get("adalomo"), summary.get(REFERENCE)
    if not a or not w:
        return None
    line = f"AdaLomo at its default lr vs {REFERENCE}'s best: {_pct(a['default_vs_reference_best'])} (goal: within 2%)"
    if a["band"] and w["band"]:
        line += f"; good band: AdaLomo {_band(a['band'])}, {REFERENCE} {_band(w['band'])}"
    return line + "."


def _base_lines(results: dict) -> list[str]:
    b = results["base"]
    m = b["model"]
    lines = [f"- base: {b['format']} from `{b['path']}`, {m.get('type')}, {m.get('n_params', 0):,} parameters; "
             f"tokenizer {b['tokenizer']['type']} ({b['tokenizer']['size']:,} tokens)"]
    p = b.get("pretraining")
    if p:
        lines.append(f"- pretrained on {p['corpus']} with {p['optimizer']} lr {p['lr']:g}: {p['steps']} steps "
                     f"(planned {p['planned_steps']}), {p['tokens']:,} tokens, batch {p['batch_size']} x "
                     f"{p['seq_len']}, test ppl {_fmt(p.get('test_ppl'), '.1f')}, {p['wall_time_s']:.0f}s on "
                     f"{p['device']}")
    return lines + [f"- note: {n}" for n in b.get("notes", [])]


def write_markdown(results: dict, path: Path, plots: dict) -> Path:
    cfg, env = results["config"], results["environment"]
    lines = ["# adalomo experiment: finetune", ""]
    if results.get("command"):
        lines.append(f"- command: `{results['command']}`")
    lines.append(f"- device: {env.get('device')} ({env.get('device_name')}), torch {env.get('torch')}, "
                 f"dtype {cfg.get('dtype')}, seed {cfg.get('seed')}, {cfg.get('max_steps')} steps per run, batch "
                 f"{cfg.get('batch_size')} x {cfg.get('seq_len')} tokens (domain), {cfg.get('sft_batch_size')} pairs "
                 f"(sft); created {results.get('created')}")
    if results.get("elapsed_s") is not None:
        lines.append(f"- elapsed: {results['elapsed_s']:.0f}s (data, pretraining and every run; the report excluded)")
    lines += _base_lines(results)
    if results.get("skipped"):
        lines.append(f"- not run (they would have ended after --budget-minutes): {', '.join(results['skipped'])}")
    for name, task in results["tasks"].items():
        summary = task.get("summary") or {}
        before = task["before"]
        lines += ["", f"## {name}: {task['description']}", "",
                  f"Score: {task['score_name']} (lower is better). Before fine-tuning: score "
                  f"{_fmt(before['score'], '.2f')}"
                  + (f", source ppl {_fmt(before.get('source_ppl'), '.1f')}" if "source_ppl" in before else "")
                  + (f", BLEU {_fmt(before.get('bleu'), '.2f')}" if "bleu" in before else "") + ".", ""]
        lines += [f"- note: {n}" for n in task.get("notes", [])] + ([""] if task.get("notes") else [])
        lines += _summary_table({**task, "name": name}, summary) + [""]
        goal = _goal_line(summary)
        if goal:
            lines += [goal, ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots.get(name, [])] + [""]
        lines += ["All runs:", ""] + _runs_table({**task, "name": name})
        samples = [(r["optimizer"], r["samples"]) for r in task["runs"].values()
                   if r.get("is_default") and r.get("samples")]
        if samples:
            lines += ["", "Greedy answers of the default-lr runs (first held-out pairs):", ""]
            for i, s in enumerate(samples[0][1][:3]):
                lines.append(f"{i + 1}. prompt: `{s['prompt']}`, reference: `{s['reference']}`  ")
                lines += [f"   {opt}: `{ss[i]['answer']}`  " for opt, ss in samples if i < len(ss)]
    lines += ["", "## Reading this report", "",
              "- score: a perplexity, lower is better (domain: the target corpus's test split; sft: the answer "
              "tokens of the held-out pairs). A diverged run counts as infinite.",
              f"- default vs own best, default vs {REFERENCE} best: score at the default lr / that best score - 1 "
              "(positive: the default is worse).",
              f"- good band: the lrs of the sweep, next to the best one, whose scores are all within "
              f"{100 * GOOD_BAND_TOLERANCE:g}% of the best (score <= {1 + GOOD_BAND_TOLERANCE:g} x best); its width "
              "is lr_max / lr_min (\u2265, and \u2264 / - / + at its lr, when the band reaches an end of the "
              "sweep: it may be wider), with the number of sweep points in it.",
              "- source ppl: the base's pretraining corpus after fine-tuning (forgetting); BLEU: sacrebleu corpus "
              "BLEU of greedy answers, one reference each.",
              "- memory, time: as in the other experiments (docs/experiments.md): exact tensor bytes; ms/step is "
              "the median step after the first few; lomo-clip and adalomo-clip run two backward passes a step."]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_sweep(name: str, task: dict, summary: dict, path: Path) -> Path:
    """Score (and BLEU for sft) vs lr, one line per optimizer, the default lr circled; log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("score", task["score_name"])] + ([("bleu", "BLEU (greedy)")] if name == "sft" else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), dpi=80, squeeze=False)
    runs = sorted(task["runs"].values(), key=lambda r: r["lr"])
    for ax, (key, label) in zip(axes[0], panels):
        top = max([r[key] for r in runs if r.get(key) is not None and math.isfinite(r[key])] or [1.0])
        for i, opt in enumerate(summary):
            rs = [r for r in runs if r["optimizer"] == opt]
            good = [r for r in rs if r.get(key) is not None and math.isfinite(r[key])]
            ax.plot([r["lr"] for r in good], [r[key] for r in good], "o-", color=f"C{i % 10}", label=opt, ms=4)
            ax.plot([r["lr"] for r in good if r.get("is_default")], [r[key] for r in good if r.get("is_default")],
                    "o", color=f"C{i % 10}", ms=11, mfc="none")
            bad = [r["lr"] for r in rs if r not in good]
            ax.plot(bad, [top] * len(bad), "x", color=f"C{i % 10}", ms=8)
        ax.set_xscale("log")
        finite = [r[key] for r in runs if r.get(key) is not None and math.isfinite(r[key]) and r[key] > 0]
        if key == "score" and finite and max(finite) > 4 * min(finite):  # log only where it spreads the lines
            ax.set_yscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"finetune {name}: score vs lr (circled: the default lr; x: diverged)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_all(results: dict, out: Path) -> dict:
    """Summaries into ``results``, then results.json, the plots per task and results.md."""
    out = Path(out)
    plots: dict[str, list[Path]] = {}
    for name, task in results["tasks"].items():
        task["summary"] = summarize(task["runs"])
        if not task["runs"]:
            continue
        shown = {label: r for label, r in task["runs"].items()
                 if r.get("is_default") or r["lr"] == task["summary"][r["optimizer"]]["best_lr"]}
        defaults = {label: r for label, r in task["runs"].items() if r.get("is_default")}
        corpus = task.get("target_corpus") or task["pairs"]["name"]
        plots[name] = [plot_sweep(name, task, task["summary"], out / f"lr_{name}.png"),
                       plot_losses({"task": f"finetune {name}", "corpus": {"name": corpus}, "runs": shown},
                                   out / f"loss_{name}.png")]
        if defaults:
            plots[name].append(plot_memory({"task": f"finetune {name}", "runs": defaults}, out / f"memory_{name}.png"))
    return {"json": write_json(results, out / "results.json"), "md": write_markdown(results, out / "results.md", plots),
            "plots": [p for ps in plots.values() for p in ps]}

