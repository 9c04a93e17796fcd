"""The study's outputs: results.csv (one row per run), report.md (per-LR table, ranking, how sure we are)
and curves.png (loss and gradient-norm curves per strategy), all written atomically into the study folder.

Ranking, within one learning rate: strategies whose runs were all 'ok' first (then by the share of seeds
that were unstable, diverged or failed, then by the share that diverged or failed), then by mean validation AP50 compared at 0.01 resolution (so
near-zero APs early in training tie), then by mean final loss (lower is better). Outcomes are defined in
pipeline/study/metrics.py.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import platform
import statistics
import warnings
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.files import atomic_path, atomic_write_json, atomic_write_text
from pipeline.study import metrics as m
from pipeline.study.plan import RunSpec, StudyPlan
from pipeline.study.runner import load_result, runs_dir

COLUMNS = (
    "run", "strategy", "lr", "seed", "status", "stop_reason", "steps_done", "skipped_steps",
    "first_nonfinite_step", "initial_loss", "target_loss", "steps_to_target", "peak_loss", "final_loss",
    "final_loss_sem",
    "val_ap50", "clip_fraction", "grad_norm_median", "grad_norm_p90", "grad_norm_max", "thresholds",
    "train_s", "wall_s", "device", "error",
)
_BAD = ("unstable", "diverged", "failed")


# ------------------------------------------------------------------------------------------ rows
def collect_rows(plan: StudyPlan, out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, m.Series]]:
    """One row per finished run of `plan` (runs without a result are left out), and each run's series."""
    found: list[tuple[RunSpec, dict[str, Any], m.Series]] = []
    for spec in plan.runs():
        result = load_result(out_dir, spec)
        if result is not None:
            found.append((spec, result, m.series(m.read_log(runs_dir(out_dir) / spec.run_id / "train_log.jsonl"))))
    initial = {spec.run_id: m.initial_loss(s, plan.window) for spec, _, s in found}
    reference = {
        seed: m.reference_loss([initial[sp.run_id] for sp, _, _ in found if sp.seed == seed]) for seed in plan.seeds
    }
    rows, curves = [], {}
    for spec, result, s in found:
        target = plan.target_loss if plan.target_loss is not None else plan.target_fraction * reference[spec.seed]
        final, sem = m.final_loss(s, plan.final_window)
        median, p90, top = m.norm_percentiles(s, (50, 90, 100))
        row = {k: result.get(k) for k in COLUMNS}
        if row["status"] == "ok" and m.blew_up(final, reference[spec.seed]):
            row["status"] = "unstable"
        row.update(
            first_nonfinite_step=m.first_nonfinite_step(s),
            initial_loss=initial[spec.run_id],
            target_loss=target,
            steps_to_target=m.steps_to_target(s, target, plan.window),
            peak_loss=m.peak_loss(s, plan.window),
            final_loss=final,
            final_loss_sem=sem,
            grad_norm_median=median,
            grad_norm_p90=p90,
            grad_norm_max=top,
        )
        rows.append(row)
        curves[spec.run_id] = s
    return rows, curves


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def render_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k), 6) for k in COLUMNS})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ aggregation
def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else math.nan


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else math.nan)


def aggregate(rows: list[dict[str, Any]], lr: float, strategies: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per strategy at one learning rate, over its seeds: counts, means and spreads; ranked (see module doc)."""
    out = []
    for strategy in strategies:
        group = [r for r in rows if r["strategy"] == strategy and r["lr"] == lr]
        if not group:
            continue
        ok = [r for r in group if r["status"] not in ("diverged", "failed")]  # unstable runs have a final loss
        ap, ap_sd = _mean_std([_num(r["val_ap50"]) for r in group])
        loss, loss_sd = _mean_std([_num(r["final_loss"]) for r in ok])
        reached = [r["steps_to_target"] for r in group if r["steps_to_target"] is not None]
        out.append({
            "strategy": strategy,
            "n": len(group),
            "bad": sum(r["status"] in _BAD for r in group),
            "lost": sum(r["status"] in ("diverged", "failed") for r in group),
            "outcome": _outcome(group),
            "ap50": ap, "ap50_sd": ap_sd,
            "loss": loss, "loss_sd": loss_sd,
            "loss_sem": _num(group[0]["final_loss_sem"]) if len(group) == 1 else math.nan,
            "reached": len(reached),
            "steps_to_target": statistics.median(reached) if reached else None,
            "clip_fraction": _mean_std([_num(r["clip_fraction"]) for r in group])[0],
            "grad_norm_median": _mean_std([_num(r["grad_norm_median"]) for r in group])[0],
            "wall_s": _mean_std([_num(r["wall_s"]) for r in group])[0],
            "thresholds": group[0].get("thresholds") or "",
        })
    out.sort(key=lambda a: (
        a["bad"] / a["n"],
        a["lost"] / a["n"],
        -round(a["ap50"], 2) if math.isfinite(a["ap50"]) else math.inf,
        a["loss"] if math.isfinite(a["loss"]) else math.inf,
    ))
    for above, below in itertools.pairwise(out):
        below["sure"] = _separated(above, below)
    if out:
        out[0]["sure"] = "—"
    return out


def _outcome(group: list[dict[str, Any]]) -> str:
    """'ok', or the counts of runs that were not, e.g. '1/3 diverged, 1/3 unstable'."""
    counts = [(s, sum(r["status"] == s for r in group)) for s in _BAD]
    return ", ".join(f"{n}/{len(group)} {s}" for s, n in counts if n) or "ok"


def _separated(above: dict[str, Any], below: dict[str, Any]) -> str:
    """Is `below` really behind `above`? 'yes', 'no' (within the spread) or 'untested' (one seed)."""
    if (above["bad"] / above["n"], above["lost"] / above["n"]) != (below["bad"] / below["n"], below["lost"] / below["n"]):
        return "yes"
    if math.isfinite(above["ap50"]) and math.isfinite(below["ap50"]) and round(above["ap50"], 2) != round(
            below["ap50"], 2):
        spread = max(_zero(above["ap50_sd"]), _zero(below["ap50_sd"]))
        if above["n"] == 1 and below["n"] == 1:
            return "untested (1 seed)"
        return "yes" if below["ap50"] < above["ap50"] - spread else "no"
    if not (math.isfinite(above["loss"]) and math.isfinite(below["loss"])):
        return "no"
    if above["n"] == 1 and below["n"] == 1:  # batch noise of the final window is all we can measure
        noise = 2 * math.hypot(_zero(above["loss_sem"]), _zero(below["loss_sem"]))
    else:
        noise = max(_zero(above["loss_sd"]), _zero(below["loss_sd"]))
    return "yes" if below["loss"] - above["loss"] > noise else "no"


def _zero(v: float) -> float:
    return v if math.isfinite(v) else 0.0


# ------------------------------------------------------------------------------------------ markdown
def _pm(mean: float, sd: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "—"
    spec = f".{digits}f" if abs(mean) < 1e3 else ".3g"
    return f"{mean:{spec}} ± {sd:{spec}}" if math.isfinite(sd) else f"{mean:{spec}}"


def _lr_table(agg: list[dict[str, Any]], several_seeds: bool) -> list[str]:
    lines = [
        ("| rank | strategy | outcome | val AP50 | final loss | steps to target | clip fraction "
         "| median ‖g‖ | wall s | behind the one above? | thresholds |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, a in enumerate(agg, 1):
        loss_sd = a["loss_sd"] if several_seeds else a["loss_sem"]
        stt = "not reached" if a["steps_to_target"] is None else f"{a['steps_to_target']:g}"
        if a["n"] > 1:
            stt += f" ({a['reached']}/{a['n']})"
        lines.append(
            f"| {i} | `{a['strategy']}` | {a['outcome']}"
            f" | {_pm(a['ap50'], a['ap50_sd'])} | {_pm(a['loss'], loss_sd)} | {stt} | {_fmt(a['clip_fraction'], 2)}"
            f" | {_fmt(a['grad_norm_median'], 3)} | {a['wall_s']:.0f} | {a.get('sure', '')} | {a['thresholds']} |"
        )
    return lines


def _threshold_guide(rows: list[dict[str, Any]], curves: dict[str, m.Series], lrs: tuple[float, ...]) -> list[str]:
    """Grad-norm percentiles of the unclipped runs: where a fixed global_norm threshold would cut."""
    lines = []
    for lr in lrs:
        for r in rows:
            if r["strategy"] == "none" and r["lr"] == lr and r["run"] in curves:
                p50, p90, p99 = m.norm_percentiles(curves[r["run"]], (50, 90, 99), skip_fraction=0.2)
                lines.append(f"| {lr:g} | {r['seed']} | {_fmt(p50, 3)} | {_fmt(p90, 3)} | {_fmt(p99, 3)} |")
    if not lines:
        return []
    return [
        "## Choosing a threshold from these runs",
        "",
        ("Global gradient norm of the unclipped (`none`) runs after their first 20 % of steps. A fixed "
         "`global_norm` threshold near the 90th–99th percentile cuts the spikes and leaves typical steps alone; "
         "one at the median clips every other step and acts as a step-length normaliser."),
        "",
        "| lr | seed | p50 | p90 | p99 |",
        "|---|---|---|---|---|",
        *lines,
        "",
    ]


def render_markdown(config: Config, plan: StudyPlan, rows: list[dict[str, Any]], curves: dict[str, m.Series],
                    study_wall_s: float | None = None) -> str:
    several = len(plan.seeds) > 1
    target_rule = (
        f"absolute target loss {plan.target_loss:g}" if plan.target_loss is not None else
        f"{plan.target_fraction:g} × the seed's reference initial loss (median over its runs of the mean loss of "
        f"the first {plan.window} steps)"
    )
    targets = sorted({round(r["target_loss"], 4) for r in rows if math.isfinite(_num(r["target_loss"]))})
    devices = sorted({r["device"] for r in rows if r.get("device")})
    lines = [
        f"# Clipping study: {config.name}",
        "",
        (f"- {len(rows)} of {len(plan.runs())} runs: strategies {', '.join(plan.strategies)}; learning rates "
         f"{', '.join(f'{x:g}' for x in plan.lrs)}; seeds {', '.join(map(str, plan.seeds))}; {plan.steps} steps "
         f"each (batch {config.data.batch_size}, backbone {config.model.backbone}, optimizer "
         f"{config.train.optimizer.name}, schedule {config.train.schedule.name}; the LR warmup and the "
         f"autoclip/zclip statistics warmup capped at {plan.warmup_fraction:.0%} of the budget)."),
        (f"- Target loss: {target_rule} = {', '.join(f'{t:g}' for t in targets) or '—'}; reached when the mean "
         f"of the last {plan.window} step losses is at or below it."),
        (f"- Outcome: *diverged* = a non-finite loss or gradient at any step (the trainer skipped the update; "
         f"{plan.max_consecutive_skips} in a row stop the run); *unstable* = finite, but the final loss (mean of "
         f"the last {plan.final_window} steps) is above {m.UNSTABLE_FACTOR:g} × the seed's reference initial loss; *failed* = training "
         "raised an error; else *ok*. Val AP50: the final weights on the val tiles."),
        (f"- Machine: {', '.join(devices) or 'unknown device'} ({platform.machine()}, {os.cpu_count()} CPU cores); "
         f"training time {sum(_zero(_num(r['wall_s'])) for r in rows) / 60:.1f} min over all runs"
         + (f" (this invocation: {study_wall_s / 60:.1f} min)." if study_wall_s is not None else ".")),
        "",
        "## How sure we are",
        "",
    ]
    if several:
        lines.append(
            f"± is the standard deviation across {len(plan.seeds)} seeds. *Behind the one above?* says whether the "
            "gap to the strategy ranked just above is larger than the larger of the two spreads (AP50 when it "
            "decides the order, else the final loss); 'no' means the order is not established.")
    else:
        lines.append(
            "One seed: run-to-run variation is **not** measured. Final loss ± is the standard error over the last "
            f"{plan.final_window} batches (batch noise only). A final-loss gap counts as real ('yes') when it exceeds "
            "twice the combined standard error; an AP50 gap cannot be tested with one seed ('untested'). Rerun "
            "with `--seeds 0,1,2` before trusting a close order.")
    lines.append("")
    for lr in plan.lrs:
        agg = aggregate(rows, lr, plan.strategies)
        if agg:
            lines += [f"## Learning rate {lr:g}", "", *_lr_table(agg, several), ""]
    lines += _threshold_guide(rows, curves, plan.lrs)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r['run']}`: {r['error']}" for r in failed] + [""]
    lines += [("Files: `results.csv` (one row per run), `curves.png`, `runs/<run>/train_log.jsonl` "
               "(per-step telemetry; `tensorboard --logdir runs`)."), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ figure
def plot_curves(plan: StudyPlan, rows: list[dict[str, Any]], curves: dict[str, m.Series], path: Path) -> Path:
    """Smoothed loss and pre-clipping global norm per step, one line per strategy (mean over seeds), one
    row of panels per learning rate; a dotted line marks the first non-finite step of a diverged run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(plan.lrs), 2, figsize=(12, 3.6 * len(plan.lrs)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for i, lr in enumerate(plan.lrs):
        ax_loss, ax_norm = axes[i]
        for j, strategy in enumerate(plan.strategies):
            runs = [r for r in rows if r["strategy"] == strategy and r["lr"] == lr and r["run"] in curves]
            if not runs:
                continue
            c = colors(j % 10)
            for key, ax, smooth in (("loss", ax_loss, plan.window), ("norm_before", ax_norm, 1)):
                grid = np.full((len(runs), plan.steps), np.nan)
                for k, r in enumerate(runs):
                    s = curves[r["run"]]
                    vals = getattr(s, key)
                    vals = m.trailing_mean(vals, smooth) if smooth > 1 else vals
                    idx = s.steps[(s.steps >= 1) & (s.steps <= plan.steps)] - 1
                    grid[k, idx] = vals[(s.steps >= 1) & (s.steps <= plan.steps)]
                with warnings.catch_warnings():  # all-NaN columns (after a run stopped) stay NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(grid, axis=0)
                bad = sum(r["status"] in _BAD for r in runs)
                label = strategy + (f" ({bad}/{len(runs)} not ok)" if bad else "")
                ax.plot(np.arange(1, plan.steps + 1), mean, color=c, lw=1.3, label=label)
            for r in runs:  # where a run first produced a non-finite loss or gradient
                if r["first_nonfinite_step"] is not None:
                    ax_loss.axvline(r["first_nonfinite_step"], color=c, ls=":", lw=1.0)
        targets = [r["target_loss"] for r in rows if r["lr"] == lr and math.isfinite(_num(r["target_loss"]))]
        if targets:
            ax_loss.axhline(statistics.fmean(targets), color="k", ls="--", lw=0.8, label="target")
        ax_loss.set(title=f"lr {lr:g}: training loss (mean of last {plan.window} steps; dotted: first non-finite)",
                    xlabel="step", ylabel="loss", yscale="log")
        ax_norm.set(title=f"lr {lr:g}: global gradient norm before clipping", xlabel="step", ylabel="‖g‖",
                    yscale="log")
        ax_loss.legend(fontsize=7, ncol=2)
        ax_norm.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ all outputs
def write_report(config: Config, plan: StudyPlan, out_dir: Path, study_wall_s: float | None = None) -> Path:
    """Write results.csv, report.md, curves.png and plan.json into `out_dir`; returns `out_dir`."""
    out_dir = Path(out_dir)
    rows, curves = collect_rows(plan, out_dir)
    atomic_write_text(out_dir / "results.csv", render_csv(rows))
    atomic_write_text(out_dir / "report.md", render_markdown(config, plan, rows, curves, study_wall_s))
    plot_curves(plan, rows, curves, out_dir / "curves.png")
    atomic_write_json(out_dir / "plan.json", json.loads(json.dumps(plan.as_dict())))
    return out_dir


def read_results(out_dir: Path) -> list[dict[str, str]]:
    """results.csv as a list of dicts (strings), e.g. for the Prefect table artifact."""
    with (Path(out_dir) / "results.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))
