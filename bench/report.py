"""Targets, tables and the plot from the results JSON: `python -m bench.report` (`--runs`: the targets of every
run saved under bench/results/repeats/<n>/, side by side, and their medians).

Reads bench/results/{ceiling,ceiling_after,ceiling_stock,e2e,cold_start}.json (whichever exist), prints Markdown
(the tables of BENCHMARKS.md), writes bench/results/summary.json and bench/results/e2e.png (throughput and p99
latency against the number of concurrent clients).

Ceiling numbers used by the targets are the mean of the ceiling measured before the end-to-end run and the one
measured after it (ceiling_after.json, same batch sizes), so that a slow drift of the machine's speed during the
run (seen here: up to +-10% over minutes) does not land on one side of a ratio; both are reported.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench.common import RESULTS, table

TARGETS = {
    "e2e_vs_ceiling": 0.9,  # end-to-end reconstruct images/s >= 0.9 x the ceiling's best batch
    "vs_baseline_c8": 1.5,  # >= 1.5 x the baseline at 8 clients, reconstruct and embed
    "p50_c1_vs_batch1": 1.15,  # p50 with one client <= 1.15 x the ceiling's batch-1 latency
    "cold_start_s": 3.0,  # bundled model, process start -> /readyz 200
}


def _load(name: str) -> dict[str, Any] | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _ceiling_point(before: dict, after: dict | None, op: str, batch: int) -> dict[str, float]:
    """images/s and p50 latency at (op, batch): the mean of before/after where both exist."""
    rows = [r for r in before["rows"] if r["op"] == op and r["batch"] == batch]
    if after:
        rows += [r for r in after["rows"] if r["op"] == op and r["batch"] == batch]
    return {
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "latency_ms": sum(r["latency_ms_p50"] for r in rows) / len(rows),
        "values": [round(r["images_per_s"], 3) for r in rows],
        "latencies_ms": [round(r["latency_ms_p50"], 2) for r in rows],
    }


def summarize() -> dict[str, Any]:
    ceiling, after, stock = _load("ceiling"), _load("ceiling_after"), _load("ceiling_stock")
    e2e, cold = _load("e2e"), _load("cold_start")
    out: dict[str, Any] = {"targets": TARGETS, "checks": []}
    checks = out["checks"]
    if ceiling and e2e:
        rows = e2e["rows"]
        for op in ("reconstruct", "embed"):
            ours = [r for r in rows if r["server"] == "mae-serve" and r["endpoint"] == op]
            if not ours:
                continue
            best_b = max((r for r in ceiling["rows"] if r["op"] == op), key=lambda r: r["images_per_s"])["batch"]
            top = _ceiling_point(ceiling, after, op, best_b)
            b1 = _ceiling_point(ceiling, after, op, 1)
            e2e_best = max(ours, key=lambda r: r["images_per_s"])
            c1 = next((r for r in ours if r["concurrency"] == 1), None)
            saturated = [r for r in ours if r["concurrency"] >= 8 and r.get("vs_ceiling")]
            if saturated:  # side by side: each level against the bare model measured just before and after it
                ratios = sorted(r["vs_ceiling"] for r in saturated)
                ratio = statistics.median(ratios)
                detail = (
                    f"median over {len(ratios)} levels of 8+ clients, each / the best bare batch "
                    f"({'/'.join(str(b) for b in saturated[0]['ceiling_images_per_s_by_batch'])}) measured around "
                    f"it: {[round(x, 3) for x in ratios]}; best level {e2e_best['images_per_s']:.2f} img/s; "
                    f"sweep ceiling best {top['images_per_s']:.2f} img/s at batch {best_b} (runs {top['values']})"
                )
            else:
                ratio = e2e_best["images_per_s"] / top["images_per_s"]
                detail = (
                    f"{e2e_best['images_per_s']:.2f} img/s at {e2e_best['concurrency']} clients vs "
                    f"{top['images_per_s']:.2f} img/s at batch {best_b} (ceiling runs: {top['values']})"
                )
            checks.append({
                "target": f"{op}: end-to-end / ceiling best batch",
                "value": ratio,
                "goal": f">= {TARGETS['e2e_vs_ceiling']}",
                "met": ratio >= TARGETS["e2e_vs_ceiling"] if op == "reconstruct" else None,
                "detail": detail,
            })  # fmt: skip
            if c1:
                if c1.get("p50_vs_ceiling_b1"):
                    ratio, ref = c1["p50_vs_ceiling_b1"], c1["ceiling_b1_latency_ms"]
                    how = "the bare batch-1 latency measured around the level"
                else:
                    ratio, ref = c1["latency_ms_p50"] / b1["latency_ms"], b1["latency_ms"]
                    how = f"the sweep's batch-1 latency (runs {b1['latencies_ms']} ms)"
                checks.append({
                    "target": f"{op}: p50 with 1 client / ceiling batch-1 latency",
                    "value": ratio,
                    "goal": f"<= {TARGETS['p50_c1_vs_batch1']}",
                    "met": ratio <= TARGETS["p50_c1_vs_batch1"] if op == "reconstruct" else None,
                    "detail": f"{c1['latency_ms_p50']:.1f} ms vs {ref:.1f} ms, {how}",
                })  # fmt: skip
    if e2e:
        for r in e2e.get("ratios_vs_best_baseline", []):
            if r["concurrency"] == 8:
                others = ", ".join(f"{k}: {v:.2f}x" for k, v in r["ratio_by_baseline"].items())
                checks.append({
                    "target": f"{r['endpoint']}: mae-serve / best baseline at 8 clients",
                    "value": r["ratio"],
                    "goal": f">= {TARGETS['vs_baseline_c8']}",
                    "met": r["ratio"] >= TARGETS["vs_baseline_c8"],
                    "detail": f"{r['mae_images_per_s']:.2f} vs {r['baseline_images_per_s']:.2f} img/s ({others})",
                })  # fmt: skip
    if cold:
        demo = next((r for r in cold["rows"] if r["model"] == "demo"), None)
        if demo:
            checks.append({
                "target": "cold start, bundled model (s)",
                "value": demo["ready_s_median"],
                "goal": f"<= {TARGETS['cold_start_s']}",
                "met": demo["ready_s_median"] <= TARGETS["cold_start_s"],
                "detail": f"median of {len(demo['runs'])}: {[round(x['ready_s'], 2) for x in demo['runs']]}; "
                f"{demo['label']}",
            })  # fmt: skip
    if ceiling and stock:
        for op in ("reconstruct", "embed"):
            for b in sorted({r["batch"] for r in stock["rows"] if r["op"] == op}):
                s = next(r for r in stock["rows"] if r["op"] == op and r["batch"] == b)
                o = next((r for r in ceiling["rows"] if r["op"] == op and r["batch"] == b), None)
                if o:
                    out.setdefault("kernels", []).append({
                        "op": op, "batch": b, "stock_images_per_s": s["images_per_s"],
                        "onednn_images_per_s": o["images_per_s"], "speedup": o["images_per_s"] / s["images_per_s"],
                    })  # fmt: skip
    return out


def plot(path: Path) -> Path | None:
    e2e, ceiling = _load("e2e"), _load("ceiling")
    if not e2e:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    colors = {"reconstruct": "tab:blue", "embed": "tab:orange"}
    styles = {"mae-serve": "-o", "baseline-async": "--s", "baseline-sync": ":^"}
    for (server, endpoint), rows in _group(e2e["rows"]).items():
        xs = [r["concurrency"] for r in rows]
        kw = {"color": colors.get(endpoint), "label": f"{server} {endpoint}", "markersize": 4}
        ax1.plot(xs, [r["images_per_s"] for r in rows], styles.get(server, "-x"), **kw)
        ax2.plot(xs, [r["latency_ms_p99"] / 1e3 for r in rows], styles.get(server, "-x"), **kw)
    if ceiling:
        for op, color in colors.items():
            r = [x for x in ceiling["rows"] if x["op"] == op]
            if r:
                top = max(r, key=lambda x: x["images_per_s"])
                ax1.axhline(top["images_per_s"], color=color, lw=0.8, alpha=0.6)
                ax1.text(1, top["images_per_s"], f" ceiling {op} (batch {top['batch']})", color=color, fontsize=7,
                         va="bottom")  # fmt: skip
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("images / s")
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("p99 latency (s)")
    ax2.set_yscale("log")
    ax1.set_title("throughput")
    ax2.set_title("p99 latency")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    m = e2e["machine"]
    fig.suptitle(f"ViT-B/16 MAE, fp32, {m['cpu']} x{m['cores']} cores, {m['date'][:10]}", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["server"], r["endpoint"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["concurrency"]) for k, v in out.items()}


def markdown(summary: dict[str, Any]) -> str:
    parts = []
    for name, title, cols in (
        ("ceiling", "ceiling (bare model, engine kernels)", [
            ("op", "op", ""), ("batch", "batch", "d"), ("latency_ms_p50", "latency p50 ms", ".1f"),
            ("ms_per_image", "ms/image", ".1f"), ("images_per_s", "images/s", ".2f")]),
        ("ceiling_after", "ceiling, measured again after the end-to-end run", [
            ("op", "op", ""), ("batch", "batch", "d"), ("latency_ms_p50", "latency p50 ms", ".1f"),
            ("images_per_s", "images/s", ".2f")]),
        ("ceiling_stock", "bare model on stock PyTorch kernels (what the baseline's model runs on)", [
            ("op", "op", ""), ("batch", "batch", "d"), ("latency_ms_p50", "latency p50 ms", ".1f"),
            ("images_per_s", "images/s", ".2f")]),
    ):  # fmt: skip
        d = _load(name)
        if d:
            parts.append(table(d["rows"], cols, title))
    e2e = _load("e2e")
    if e2e:
        rows = []
        for r in e2e["rows"]:
            r = dict(r)
            r["dist"] = " ".join(f"{k}:{v}" for k, v in (r.get("batch_dist") or {}).items()) or None
            rows.append(r)
        parts.append(table(rows, [
            ("server", "server", ""), ("endpoint", "endpoint", ""), ("concurrency", "clients", "d"),
            ("images_per_s", "images/s", ".2f"), ("latency_ms_p50", "p50 ms", ".0f"),
            ("latency_ms_p95", "p95 ms", ".0f"), ("latency_ms_p99", "p99 ms", ".0f"), ("errors", "errors", "d"),
            ("dist", "batch sizes (count)", ""), ("model_ms_per_image", "model ms/img", ".1f"),
            ("rss_mib", "RSS MiB", ".0f"), ("server_cpu_pct", "server CPU %", ".0f"),
            ("foreign_cpu_pct", "other CPU %", ".0f"), ("vs_ceiling", "/ bare best", ".2f"),
            ("p50_vs_ceiling_b1", "p50 / bare b1", ".2f"),
        ], "end to end"))  # fmt: skip
        if e2e.get("ratios_vs_best_baseline"):
            rr = [
                {**r, "others": ", ".join(f"{k} {v:.2f}x" for k, v in r["ratio_by_baseline"].items())}
                for r in e2e["ratios_vs_best_baseline"]
            ]
            parts.append(table(rr, [
                ("endpoint", "endpoint", ""), ("concurrency", "clients", "d"),
                ("mae_images_per_s", "mae-serve img/s", ".2f"), ("baseline_images_per_s", "best baseline img/s", ".2f"),
                ("ratio", "ratio", ".2f"), ("others", "per baseline", ""),
            ], "mae-serve vs the baseline (same run)"))  # fmt: skip
    cold = _load("cold_start")
    if cold:
        parts.append(table(cold["rows"], [
            ("model", "model", ""), ("ready_s_median", "start -> ready s (median)", ".2f"),
            ("ready_s_min", "min", ".2f"), ("ready_s_max", "max", ".2f"), ("listening_s_median", "port open s", ".2f"),
            ("load_and_warmup_s_median", "load + warm-up s", ".2f"), ("label", "weights", ""),
        ], "cold start"))  # fmt: skip
    if summary.get("kernels"):
        parts.append(table(summary["kernels"], [
            ("op", "op", ""), ("batch", "batch", "d"), ("stock_images_per_s", "stock PyTorch img/s", ".2f"),
            ("onednn_images_per_s", "oneDNN linears img/s", ".2f"), ("speedup", "speed-up", ".2f"),
        ], "CPU kernels: the same bare model, stock vs the engine's oneDNN linears"))  # fmt: skip
    checks = [
        {**c, "status": {True: "met", False: "NOT met", None: "(info)"}[c["met"]]} for c in summary["checks"]
    ]  # fmt: skip
    parts.append(table(checks, [
        ("target", "target", ""), ("value", "measured", ".3f"), ("goal", "goal", ""), ("status", "", ""),
        ("detail", "detail", ""),
    ], "targets"))  # fmt: skip
    return "\n\n".join(parts)


def across_runs() -> str:
    """bench/results/repeats/<n>/summary.json (copies of run_all results) -> each target per run, and the median."""
    runs = sorted((RESULTS / "repeats").glob("*/summary.json"), key=lambda p: p.parent.name)
    if not runs:
        return ""
    per_run = [json.loads(p.read_text())["checks"] for p in runs]
    rows = []
    for i, check in enumerate(per_run[0]):
        values = [r[i]["value"] for r in per_run if i < len(r) and r[i]["target"] == check["target"]]
        med = (
            sorted(values)[len(values) // 2] if len(values) % 2 else sum(sorted(values)[len(values) // 2 - 1 :][:2]) / 2
        )
        goal = check["goal"]
        limit = float(goal.split()[-1])
        met = med >= limit if goal.startswith(">=") else med <= limit
        rows.append({
            "target": check["target"], "runs": " / ".join(f"{v:.3f}" for v in values), "median": med, "goal": goal,
            "status": ("met" if met else "NOT met") if check["met"] is not None else "(info)",
        })  # fmt: skip
    cols = [("target", "target", ""), ("runs", "each run", ""), ("median", "median", ".3f"), ("goal", "goal", ""),
            ("status", "", "")]  # fmt: skip
    return table(rows, cols, f"targets over {len(runs)} runs of run_all ({', '.join(p.parent.name for p in runs)})")


def main() -> dict[str, Any]:
    import sys

    if "--runs" in sys.argv[1:]:
        print(across_runs())
        return {}
    summary = summarize()
    png = plot(RESULTS / "e2e.png")
    summary["plot"] = str(png.relative_to(RESULTS.parent.parent)) if png else None
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
