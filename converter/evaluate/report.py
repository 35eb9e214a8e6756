"""The evaluation report as a table (terminal and Markdown), report.json, and one PNG plot per metric.

Plots put bits/weight all-in (every byte of the bundle over every parameter) on x and the metric on y, one
point per bundle, so the size/quality trade-off of the schemes reads off one picture.
"""
from __future__ import annotations

import json
from pathlib import Path

from .data import EvalError

MC_TASKS = (("mmlu", "MMLU"), ("arc", "ARC"))


def _pct(acc: dict) -> str:
    lo, hi = acc["ci95"]
    return f"{100 * acc['acc']:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}]"


def _scheme(row: dict) -> str:
    s = row["scheme"]
    s = s if row["embed_scheme"] == s else f"{s} (emb {row['embed_scheme']})"
    return s + (f", smoothed {row['smoothing']}" if "smoothing" in row else "")


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """(column names, rows of cells) shared by the terminal table and report.md."""
    tasks = report["options"]["tasks"]
    cols = ["bundle", "scheme", "bits/weight"]
    if "kl" in tasks:
        cols += ["KL nats/token", "greedy agree"]
    if "ppl" in tasks:
        cols += ["perplexity"]
    for task, title in MC_TASKS:
        if task in tasks:
            cols += [f"{title} letter (95% CI)", f"{title} acc_norm (95% CI)"]
    cols += ["time"]
    rows = []
    for b in report["bundles"]:
        t = b["tasks"]
        graph = b.get("graph", "model.onnx")
        cells = [b["name"] + (" (baseline)" if b["role"] == "baseline" else "") +
                 (f" [{graph}]" if graph != "model.onnx" else ""), _scheme(b),
                 f"{b['bits_per_weight_all_in']:.3f}"]
        if "kl" in tasks:
            kl = t["kl"]
            if kl.get("reference"):
                cells += ["ref", "ref"]
            else:
                cells += [f"{kl['kl_mean']:.4f}", f"{100 * kl['top1_agreement']:.1f}%"]
        if "ppl" in tasks:
            cells.append(f"{t['ppl']['perplexity']:.3f}")
        for task, _ in MC_TASKS:
            if task in tasks:
                cells += [_pct(t[task]["letter"]), _pct(t[task]["cloze_norm"])]
        cells.append(f"{b['seconds']:.1f} s")
        rows.append(cells)
    return cols, rows


def data_lines(report: dict) -> list[str]:
    """One line per task saying what it was measured on."""
    d = report["data"]
    out = []
    if "kl" in d:
        out.append(f"kl: {d['kl']['texts']} fixed texts, {d['kl']['tokens']:,} positions")
    if "ppl" in d:
        p = d["ppl"]
        out.append(f"ppl: {p['corpus']}, {p['chunks']} chunks of {p['ctx']} tokens, {p['scored_tokens']:,} scored")
    for task, title in MC_TASKS:
        if task in d:
            m = d[task]
            skipped = f", {m['skipped_rows']} rows skipped" if m["skipped_rows"] else ""
            out.append(f"{task}: {m['questions']} of {m['available']:,} questions (seed {m['seed']}) "
                       f"from {m['file']}{skipped}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------------------

def _md_table(cols: list[str], rows: list[list[str]]) -> list[str]:
    right = [i > 1 for i in range(len(cols))]                # name and scheme left, numbers right
    return (["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"] +
            ["| " + " | ".join(r) + " |" for r in rows])


def to_markdown(report: dict) -> str:
    cols, rows = table_rows(report)
    lines = [f"# Evaluation ({report['created']})", ""]
    if report["baseline"]:
        lines += [f"Baseline: `{report['baseline']}`. KL is KL(baseline ‖ bundle) per token in nats; greedy "
                  "agreement is how often both pick the same next token.", ""]
    lines += [f"- {x}" for x in data_lines(report)] + [""]
    lines += _md_table(cols, rows) + [""]
    lines += ["MMLU/ARC: *letter* scores the letter after a prompt listing the choices; *acc_norm* scores each "
              "answer text's log-likelihood divided by its length in characters. Intervals are 95% Wilson.", ""]
    for task, title in MC_TASKS:
        if task not in report["data"]:
            continue
        bundles = report["bundles"]
        topics = sorted(bundles[0]["tasks"][task]["topics"])
        lines += [f"## {title} by topic (letter / acc_norm accuracy)", ""]
        tcols = ["topic", "questions"] + [b["name"] for b in bundles]
        trows = []
        for name in topics:
            per = [b["tasks"][task]["topics"][name] for b in bundles]
            trows.append([name, str(per[0]["questions"])] +
                         [f"{100 * p['letter']['acc']:.0f}% / {100 * p['cloze_norm']['acc']:.0f}%" for p in per])
        lines += _md_table(tcols, trows) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------

def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EvalError("the report's plots need matplotlib (pip install matplotlib)") from None


def _scatter(ax, xs, ys, names, **kw):
    ax.plot(xs, ys, "o", **kw)
    for x, y, n in zip(xs, ys, names):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)


def _short_names(names: list[str]) -> list[str]:
    """Drop the model name every bundle shares ("smollm2-int8" -> "int8") so the point labels do not overlap."""
    model = names[0].split("-")[0] + "-"
    if len(names) < 2 or not all(n.startswith(model) and len(n) > len(model) for n in names):
        return names
    return [n[len(model):] for n in names]


def _plot(folder: Path, report: dict) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bundles = report["bundles"]
    tasks = report["options"]["tasks"]
    bits = [b["bits_per_weight_all_in"] for b in bundles]
    names = _short_names([b["name"] for b in bundles])
    written = []

    def save(fig, ax, name, ylabel, title):
        ax.set_xlabel("bits/weight (all-in)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(folder / name)

    if "kl" in tasks:
        cand = [i for i, b in enumerate(bundles) if not b["tasks"]["kl"].get("reference")]
        fig, ax = plt.subplots(figsize=(6, 4))
        _scatter(ax, [bits[i] for i in cand], [bundles[i]["tasks"]["kl"]["kl_mean"] for i in cand],
                 [names[i] for i in cand])
        save(fig, ax, "kl.png", "KL(baseline ‖ bundle), nats/token", "KL divergence vs size")
    if "ppl" in tasks:
        fig, ax = plt.subplots(figsize=(6, 4))
        _scatter(ax, bits, [b["tasks"]["ppl"]["perplexity"] for b in bundles], names)
        save(fig, ax, "ppl.png", "perplexity", f"perplexity vs size ({report['data']['ppl']['corpus']})")
    for task, title in MC_TASKS:
        if task not in tasks:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        dodge = 0.01 * (max(bits) - min(bits) or 1)        # the two scorings side by side, not on top
        for key, label, marker, dx in (("letter", "letter", "o", -dodge), ("cloze_norm", "acc_norm", "s", dodge)):
            accs = [b["tasks"][task][key] for b in bundles]
            ys = [100 * a["acc"] for a in accs]
            err = [[y - 100 * a["ci95"][0] for y, a in zip(ys, accs)],             # below, above each point
                   [100 * a["ci95"][1] - y for y, a in zip(ys, accs)]]
            ax.errorbar([x + dx for x in bits], ys, yerr=err, fmt=marker, capsize=3, label=label)
        for x, y, n in zip(bits, [100 * b["tasks"][task]["letter"]["acc"] for b in bundles], names):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.axhline(100 * bundles[0]["tasks"][task]["chance"], ls="--", color="grey", lw=1, label="chance")
        ax.legend(fontsize=8)
        save(fig, ax, f"{task}.png", "accuracy, % (95% Wilson)",
             f"{title} accuracy vs size ({bundles[0]['tasks'][task]['questions']} questions)")
    return written


def write_report(report: dict, folder: str | Path) -> list[Path]:
    """report.json, report.md and the PNG plots into folder (created if needed); returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(to_markdown(report), encoding="utf-8")
    return [folder / "report.json", folder / "report.md"] + _plot(folder, report)
