"""The study report: Plotly figures from dashboards.data, in one self-contained HTML file.

    gmwae dashboard quickstart --out runs/quickstart/report.html

plotly.js is embedded once, so the file opens with no network. A figure that cannot be
drawn (one family, one trial, only failed trials) is replaced by a sentence saying why.
"""
from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any, Optional

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from gmwae_core.families import FAMILY_DEFS

from . import data as D

__all__ = ["build_report", "write_report"]

COLORS = {name: f.colour for name, f in FAMILY_DEFS.items()}
LABELS = {name: f.label for name, f in FAMILY_DEFS.items()}
PARAM_ORDER = ("lambda_mmd", "prior_overlap", "latent_dim", "K", "lr", "batch_size",
               "decoder_width")
LOG_PARAMS = {"lambda_mmd", "prior_overlap", "lr"}


class _Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n_figures = 0

    def h(self, level: int, text: str, anchor: Optional[str] = None) -> None:
        a = f' id="{anchor}"' if anchor else ""
        self.parts.append(f"<h{level}{a}>{html.escape(text)}</h{level}>")

    def p(self, text: str, cls: str = "") -> None:
        self.parts.append(f'<p class="{cls}">{html.escape(text)}</p>')

    def raw(self, fragment: str) -> None:
        self.parts.append(fragment)

    def fig(self, figure: go.Figure, height: int = 420) -> None:
        self.n_figures += 1
        figure.update_layout(height=height, margin=dict(l=60, r=30, t=50, b=50),
                             template="plotly_white")
        div = figure.to_html(full_html=False, include_plotlyjs=False,
                             div_id=f"fig{self.n_figures}", config={"displaylogo": False})
        self.parts.append(f'<div class="figure">{div}</div>')


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _family_name(f: str) -> str:
    return LABELS.get(f, f)


# ----------------------------------------------------------------------------- sections
def _overview(page: _Page, data: D.StudyData) -> None:
    page.h(2, "1. Overview", "overview")
    ov = D.overview(data)
    if not any(o["trials"] for o in ov.values()):
        page.p("This study has no trials yet: nothing to report. Run it with `gmwae study run`.",
               "note")
        return
    rows = [[_family_name(f) for f in ov], [o["trials"] for o in ov.values()],
            [o["completed"] for o in ov.values()], [o["stopped_early"] for o in ov.values()],
            [o["failed"] for o in ov.values()], [o["running"] for o in ov.values()],
            [_fmt(o["best"]) for o in ov.values()],
            ["" if o["wall_seconds"] is None else f"{o['wall_seconds'] / 60:.1f}"
             for o in ov.values()]]
    table = go.Figure(go.Table(
        header=dict(values=["family", "trials", "completed", "stopped early (ASHA)", "failed",
                            "running", f"best {data.metric}", "wall time (min)"]),
        cells=dict(values=rows)))
    table.update_layout(title="Trials per family")
    page.fig(table, height=90 + 40 * len(ov))
    winners = {f: o["best"] for f, o in ov.items() if o["best"] is not None}
    if len(winners) == 2:
        (a, va), (b, vb) = data.objective.ranked(winners.items(), lambda kv: kv[1])
        page.p(f"{_family_name(a)} leads: best {data.metric} {va:.3f} against "
               f"{_family_name(b)}'s {vb:.3f} ({va - vb:+.3f}).", "lead")
    fig = go.Figure()
    for f, o in ov.items():
        if o["best_so_far"]:
            xs, ys = zip(*o["best_so_far"])
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=_family_name(f),
                                     line=dict(shape="hv", color=COLORS.get(f))))
    if fig.data:
        fig.update_layout(title=f"Best {data.metric} so far ({data.mode})",
                          xaxis_title="trial (Optuna number)", yaxis_title=data.metric)
        page.fig(fig, 380)
    else:
        page.p("No trial has finished yet, so there is no best-so-far curve.", "note")


def _comparison(page: _Page, data: D.StudyData) -> None:
    page.h(2, "2. Family comparison", "comparison")
    comp = D.family_comparison(data)
    if not any(v for c in comp.values() for v in c.values()):
        page.p("No trial ran its full budget, so the families cannot be compared yet "
               "(ASHA-stopped trials are left out of these distributions).", "note")
    else:
        titles = ["val cluster accuracy", "val AMI", "active components", "assignment entropy",
                  "MMD"]
        fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)
        for col, key in enumerate(D.COMPARED_METRICS, start=1):
            for f, c in comp.items():
                if c[key]:
                    fig.add_trace(go.Box(y=c[key], name=_family_name(f), boxpoints="all",
                                         marker_color=COLORS.get(f), showlegend=col == 1,
                                         legendgroup=f), row=1, col=col)
        fig.update_layout(title="Trials that ran their full budget")
        page.fig(fig, 420)
    if data.confirm:
        conf = data.confirm
        keys = [k for k in ("test/cluster_acc", "test/nmi", "test/ari", "test/active_components",
                            "test/assignment_entropy", "test/mmd")
                if any(k in r["summary"] for r in conf["families"].values())]
        cells = [[_family_name(f) for f in conf["families"]],
                 [f"{r['seeds_finished']}/{len(r['seeds'])}" for r in conf["families"].values()]]
        for k in keys:
            cells.append([f"{r['summary'][k]['mean']:.3f} ± {r['summary'][k]['std']:.3f}"
                          if k in r["summary"] else "" for r in conf["families"].values()])
        fig = go.Figure(go.Table(header=dict(values=["family", "seeds"] +
                                             [k.removeprefix("test/") for k in keys]),
                                 cells=dict(values=cells)))
        fig.update_layout(title=f"Confirmation on the test split: best configuration, new seeds "
                                f"(mean ± std, {conf.get('confirm_batch', '')})")
        page.fig(fig, 90 + 40 * len(conf["families"]))
    else:
        page.p("No confirmation yet: `gmwae study confirm NAME --seeds 5` re-trains each "
               "family's best configuration with new seeds and its table appears here.", "note")


def _collapse(page: _Page, data: D.StudyData) -> None:
    page.h(2, "3. Collapse: the best trial of each family", "collapse")
    col = D.collapse(data)
    with_history = {f: c for f, c in col.items() if c["history"]}
    if with_history:
        fig = make_subplots(rows=1, cols=2, subplot_titles=[
            "active components in the batch", "assignment entropy (batch, normalised)"])
        for f, c in with_history.items():
            h = c["history"]
            for i, key in enumerate(("active_components", "assignment_entropy"), start=1):
                fig.add_trace(go.Scatter(x=h["step"], y=h[key], mode="lines",
                                         name=f"{_family_name(f)} (trial {c['trial']})",
                                         line=dict(color=COLORS.get(f)), showlegend=i == 1,
                                         legendgroup=f), row=1, col=i)
        fig.update_xaxes(title_text="training step")
        fig.update_layout(title="Over training (paper Fig. 1)")
        page.fig(fig, 400)
    else:
        page.p("No finished trial has a step history, so collapse over training cannot be drawn.",
               "note")
    with_matrix = {f: c for f, c in col.items() if c["label_by_k"]}
    if with_matrix:
        fig = make_subplots(rows=1, cols=len(with_matrix), subplot_titles=[
            f"{_family_name(f)}, trial {c['trial']}" for f, c in with_matrix.items()])
        for i, (f, c) in enumerate(with_matrix.items(), start=1):
            m = c["label_by_k"]
            fig.add_trace(go.Heatmap(z=m, x=[str(k) for k in range(len(m[0]))],
                                     y=[str(lab) for lab in range(len(m))], colorscale="Blues",
                                     zmin=0, zmax=1, showscale=i == len(with_matrix)),
                          row=1, col=i)
            fig.update_xaxes(title_text="component k", row=1, col=i)
            fig.update_yaxes(title_text="label", row=1, col=i)
        fig.update_layout(title="E[q(k|x) | label] on the validation split (paper Fig. 5a)")
        page.fig(fig, 420)
    else:
        page.p("No finished trial has a label-by-k matrix to show.", "note")


def _insight(page: _Page, data: D.StudyData) -> None:
    page.h(2, "4. Search insight", "insight")
    for f, ins in D.search_insight(data).items():
        page.h(3, _family_name(f))
        rows, params = ins["rows"], [p for p in PARAM_ORDER if p in ins["params"]]
        params += [p for p in ins["params"] if p not in params]
        imp = ins["importances"]
        if isinstance(imp, dict) and imp:
            names = sorted(imp, key=imp.get)
            fig = go.Figure(go.Bar(x=[imp[n] for n in names], y=names, orientation="h",
                                   marker_color=COLORS.get(f)))
            fig.update_layout(title=f"Parameter importances for the best {data.metric} (Optuna)",
                              xaxis_title="importance")
            page.fig(fig, 120 + 30 * len(names))
        else:
            page.p(imp if isinstance(imp, str) else "No parameter importances: nothing was searched.",
                   "note")
        if len(rows) < 2 or not params:
            page.p(f"{len(rows)} finished trial(s) with searched parameters: the parallel "
                   f"coordinates, scatter plots, heatmap and Pareto front need at least 2.", "note")
            continue
        dims = [dict(label=p, values=[r.get(p) for r in rows],
                     **({"tickformat": ".2g"} if p in LOG_PARAMS else {})) for p in params]
        label = ins["score_label"]  # val acc, or the label-free objective without labels
        dims.append(dict(label=label, values=[r["acc"] for r in rows]))
        fig = go.Figure(go.Parcoords(line=dict(color=[r["acc"] for r in rows],
                                               colorscale="Viridis", showscale=True),
                                     dimensions=dims))
        fig.update_layout(title=f"Parallel coordinates (colour: {label})")
        page.fig(fig, 420)
        shown = [p for p in ("lambda_mmd", "prior_overlap", "latent_dim", "K") if p in params]
        fig = make_subplots(rows=1, cols=len(shown), subplot_titles=shown, shared_yaxes=True)
        for i, p in enumerate(shown, start=1):
            fig.add_trace(go.Scatter(
                x=[r[p] for r in rows], y=[r["acc"] for r in rows], mode="markers",
                marker=dict(color=COLORS.get(f), symbol=["x" if r["stopped_early"] else "circle"
                                                         for r in rows]),
                text=[f"trial {r['number']}" for r in rows], showlegend=False), row=1, col=i)
            if p in LOG_PARAMS:
                fig.update_xaxes(type="log", row=1, col=i)
        fig.update_yaxes(title_text=label, row=1, col=1)
        fig.update_layout(title=f"{label} against the paper's knobs (x: stopped early by ASHA)")
        page.fig(fig, 380)
        heat = ins["heatmap"]
        if heat["K"] and heat["d"]:
            fig = go.Figure(go.Heatmap(z=heat["active"], x=[str(k) for k in heat["K"]],
                                       y=[str(d) for d in heat["d"]], colorscale="Viridis",
                                       colorbar=dict(title="active")))
            fig.update_layout(title="Mean active components by K and latent dimension d",
                              xaxis_title="K", yaxis_title="d")
            page.fig(fig, 380)
        front = ins["pareto"]
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=[r["mmd"] for r in rows], y=[r["acc"] for r in rows],
                                 mode="markers", name="trials", marker=dict(color="#999"),
                                 text=[f"trial {r['number']}" for r in rows]))
        fig.add_trace(go.Scatter(x=[rows[i]["mmd"] for i in front],
                                 y=[rows[i]["acc"] for i in front], mode="lines+markers",
                                 name="Pareto front", marker=dict(color=COLORS.get(f), size=10),
                                 text=[f"trial {rows[i]['number']}" for i in front]))
        fig.update_layout(title=f"{label} / MMD trade-off (better {label}, lower MMD)",
                          xaxis_title="val MMD", yaxis_title=label)
        page.fig(fig, 380)


def _curves(page: _Page, data: D.StudyData) -> None:
    page.h(2, "5. Learning curves", "curves")
    curves = D.learning_curves(data)
    present = {f: c for f, c in curves.items() if c}
    if not present:
        page.p(f"No trial reported {data.metric} yet, so there are no learning curves.",
               "note")
        return
    fig = make_subplots(rows=1, cols=len(present),
                        subplot_titles=[_family_name(f) for f in present], shared_yaxes=True)
    for i, (f, trials) in enumerate(present.items(), start=1):
        for c in trials:
            stopped = c["stopped_early"]
            fig.add_trace(go.Scatter(
                x=c["iterations"], y=c["acc"], mode="lines+markers", showlegend=False,
                name=f"trial {c['number']}", line=dict(color=COLORS.get(f),
                                                       dash="dot" if stopped else "solid"),
                marker=dict(symbol=["circle"] * (len(c["acc"]) - 1) +
                            ["x" if stopped else "circle"], size=[5] * (len(c["acc"]) - 1) +
                            [11 if stopped else 5]),
                hovertext=f"trial {c['number']}" + (" (stopped by ASHA)" if stopped else "")),
                row=1, col=i)
        fig.update_xaxes(title_text="iteration", range=[0.8, data.max_iterations + 0.2], row=1, col=i)
    fig.update_yaxes(title_text=data.metric, row=1, col=1)
    fig.update_layout(title=f"{data.metric} per iteration (dotted, x: stopped by ASHA; "
                            "not comparable with finished trials)")
    page.fig(fig, 420)


def _links(page: _Page, data: D.StudyData) -> None:
    page.h(2, "6. Trials", "trials")
    rows = D.trial_links(data)
    if not rows:
        page.p("No trials.", "note")
        return
    if data.mlflow_url is None:
        page.p("Links to MLflow runs appear when the report is built with --mlflow-url (the "
               "address of `mlflow ui` or the tracking server).", "note")
    out = ['<table class="trials"><tr><th>family</th><th>trial</th><th>outcome</th>'
           f'<th>best {html.escape(data.metric)}</th><th>iterations</th><th>params</th>'
           '<th>MLflow run</th><th>export</th></tr>']
    for r in rows:
        run = (f'<a href="{html.escape(r["mlflow_url"])}">{html.escape(r["run_id"][:8])}</a>'
               if r["mlflow_url"] else html.escape((r["run_id"] or "")[:8]))
        export = (f'<a href="{html.escape(Path(r["exported_to"]).as_uri())}">'
                  f'{html.escape(r["exported_to"])}</a>' if r["exported_to"] else "")
        outcome = html.escape(r["outcome"])
        if r["failure_reason"]:
            outcome += f' <span class="reason">({html.escape(r["failure_reason"][:120])})</span>'
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r["params"].items()))
        out.append(f"<tr><td>{_family_name(r['family'])}</td><td>{r['number']}</td>"
                   f"<td>{outcome}</td><td>{_fmt(r['best_value'])}</td><td>{r['iterations']}</td>"
                   f"<td>{html.escape(params)}</td><td>{run}</td><td>{export}</td></tr>")
    page.raw("\n".join(out) + "</table>")


CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1400px;color:#222}
h1{margin-bottom:4px} .note{color:#666;font-style:italic} .lead{font-size:1.2em}
table.trials{border-collapse:collapse;font-size:13px} table.trials td,table.trials th{
border:1px solid #ddd;padding:3px 6px} .reason{color:#a00} nav a{margin-right:14px}"""


def build_report(data: D.StudyData) -> str:
    """The whole HTML page (plotly.js inline) for one study."""
    from plotly.offline import get_plotlyjs

    page = _Page()
    page.raw(f"<h1>Study {html.escape(data.name)}: GM-WAE vs GM-VAE</h1>")
    page.p(f"Families: {', '.join(_family_name(f) for f in data.families)}; up to "
           f"{data.max_iterations} iterations per trial. Built {time.strftime('%Y-%m-%d %H:%M')}.")
    page.raw('<nav><a href="#overview">overview</a><a href="#comparison">comparison</a>'
             '<a href="#collapse">collapse</a><a href="#insight">search insight</a>'
             '<a href="#curves">learning curves</a><a href="#trials">trials</a></nav>')
    for section in (_overview, _comparison, _collapse, _insight, _curves, _links):
        section(page, data)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>Study {html.escape(data.name)}</title><style>{CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            + "\n".join(page.parts) + "</body></html>")


def write_report(spec, out: Optional[str | Path] = None, mlflow_url: Optional[str] = None,
                 log_to_mlflow: bool = True) -> Path:
    """Build the report from the study's stores, write it (atomically) and log it to the
    study's parent MLflow run."""
    import os
    import tempfile

    from study.status import study_exists

    study_exists(spec)
    data = D.load_study_data(spec, mlflow_url)
    out = Path(out or Path("runs") / spec.name / "report.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(build_report(data))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if log_to_mlflow:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(spec.store("mlflow"))
        exp = client.get_experiment_by_name(spec.name)
        parents = client.search_runs([exp.experiment_id], "tags.role = 'study'",
                                     max_results=1) if exp else []
        if parents:
            client.log_artifact(parents[0].info.run_id, str(out), "dashboard")
    return out
