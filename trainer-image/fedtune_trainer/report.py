"""The run report: `report/report.html` and its PNG plots, rendered from what is in storage.

The aggregator calls `write` after every round it publishes, so a person can open the report while
the run is still going. The report is derived *only* from the per-round records the aggregator has
already committed (`rounds/<r>/metrics.json`), never from in-memory state, so a rerun of round r
renders the same report again, and `fedtune-trainer report` can render it on a laptop from the
bucket alone when no report was written (an older run, or a report that failed to render).

Files (committed like every other artifact: the data first, `manifest.json` last):

    report/report.html      one self-contained page: a summary, the per-round table, the rejections,
                            the last round's clients, and <img> tags for the plots next to it
    report/loss.png         train loss (sample-weighted over accepted clients) and eval loss
    report/bytes.png        bytes uploaded per client per round, encoded and as dense fp32
    report/compression.png  dense fp32 delta bytes / encoded bytes, per round

Plots use matplotlib's object API with the Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

import html
import io
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.layout import REPORT_PREFIX
from fedtune_trainer.wire.results import EvaluationSummary, RoundRecord

HTML_FILE = "report.html"
LOSS_PLOT = "loss.png"
BYTES_PLOT = "bytes.png"
COMPRESSION_PLOT = "compression.png"
PLOTS = (LOSS_PLOT, BYTES_PLOT, COMPRESSION_PLOT)
METRICS_KEY = re.compile(r"^rounds/(\d{6})/metrics\.json$")
EVALUATION_KEY = re.compile(r"^rounds/(\d{6})/evaluation\.json$")


# --------------------------------------------------------------------------------------------
# Reading what the aggregator committed
# --------------------------------------------------------------------------------------------


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_records(
    store: st.Store, through_round: int | None = None, log: Callable[[str], None] = _stderr
) -> list[RoundRecord]:
    """Every round's record (metrics.json) in storage, by round; rounds after `through_round` are
    left out (a rerun of round r must not show rounds a previous attempt wrote past r).

    A record this version cannot read (written by an older trainer, or damaged) is skipped with a
    log line rather than failing the report: the report is a view, the adapters are the product.
    """
    found: dict[int, RoundRecord] = {}
    losses: dict[int, float] = {}
    for key in store.list("rounds/"):
        record_match, eval_match = METRICS_KEY.match(key), EVALUATION_KEY.match(key)
        match = record_match or eval_match
        if not match:
            continue
        r = int(match.group(1))
        if through_round is not None and r > through_round:
            continue
        try:
            if record_match:
                found[r] = RoundRecord.model_validate_json(store.get_bytes(key))
            else:
                losses[r] = EvaluationSummary.model_validate_json(store.get_bytes(key)).eval_loss
        except ValidationError as e:
            log(f"report: skipping {key}: unreadable ({e.error_count()} problems)")
    # The evaluation Job writes its loss beside the round's record, after it.
    return [
        found[r].model_copy(update={"eval_loss": losses[r]}) if r in losses else found[r]
        for r in sorted(found)
    ]


def latest_round(store: st.Store) -> int | None:
    """The newest round with a record in storage (None before round 0 is written)."""
    rounds = [int(m.group(1)) for k in store.list("rounds/") if (m := METRICS_KEY.match(k))]
    return max(rounds, default=None)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _figure() -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No Software/date metadata: the same rounds render to the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _series(rows: Sequence[RoundRecord], attr: str) -> tuple[list[int], list[float]]:
    points = [(r.round, getattr(r, attr)) for r in rows if getattr(r, attr) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _round_axis(ax: Any, rows: Sequence[RoundRecord]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rows:
        ax.set_xlim(min(r.round for r in rows) - 0.5, max(r.round for r in rows) + 0.5)
    ax.grid(True, alpha=0.3)


def loss_plot(rows: Sequence[RoundRecord]) -> bytes:
    fig, ax = _figure()
    for attr, label, style in (("train_loss", "train", "o-"), ("eval_loss", "eval", "s-")):
        x, y = _series(rows, attr)
        if x:
            ax.plot(x, y, style, label=f"{label} loss", markersize=4)
    if ax.lines:
        ax.legend()
    else:
        _empty(ax, "no losses recorded yet")
    ax.set_ylabel("loss (mean per token)")
    ax.set_title("Loss per round")
    _round_axis(ax, rows)
    return _png(fig)


def bytes_plot(rows: Sequence[RoundRecord]) -> bytes:
    fig, ax = _figure()
    x, encoded = _series(rows, "bytes_per_client")
    _, raw = _series(rows, "raw_bytes_per_client")
    if x:
        ax.plot(x, raw, "s--", color="0.5", label="dense fp32 delta", markersize=4)
        ax.plot(x, encoded, "o-", label="uploaded (encoded)", markersize=4)
        ax.set_yscale("log")
        ax.legend()
    else:
        _empty(ax, "no client uploads yet")
    ax.set_ylabel("bytes per client")
    ax.set_title("Bytes uploaded per client per round")
    _round_axis(ax, rows)
    return _png(fig)


def compression_plot(rows: Sequence[RoundRecord]) -> bytes:
    fig, ax = _figure()
    x, ratio = _series(rows, "compression")
    if x:
        ax.plot(x, ratio, "o-", markersize=4)
        ax.set_ylim(bottom=0)
    else:
        _empty(ax, "no client uploads yet")
    ax.set_ylabel("dense fp32 / encoded")
    ax.set_title("Compression ratio per round")
    _round_axis(ax, rows)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


def fmt_loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def fmt_bytes(value: float | None) -> str:
    return "" if value is None else f"{round(value):,}"


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}x"


def fmt_seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.plots img { max-width: 32em; margin: 0.5em 1em 0.5em 0; border: 1px solid #eee; }
.muted { color: #666; }
"""


def render_html(run: str, rows: Sequence[RoundRecord]) -> str:
    """The page: summary, per-round table, rejections, last round's clients, the plots."""
    title = f"fedtune run report: {run}"
    last = rows[-1] if rows else None
    evals = [r for r in rows if r.eval_loss is not None]
    uploads = [r for r in rows if r.accepted]
    total_sent = sum(r.bytes_received for r in rows)
    total_raw = sum(r.raw_bytes for r in rows)
    algorithm = rows[-1].algorithm if rows else ""
    summary = [
        ("rounds recorded", ", ".join(str(r.round) for r in rows) if rows else "none yet"),
        ("aggregation", algorithm),
        ("last eval loss", fmt_loss(evals[-1].eval_loss) if evals else ""),
        ("first eval loss", fmt_loss(evals[0].eval_loss) if evals else ""),
        ("bytes received, all rounds", fmt_bytes(total_sent)),
        ("as dense fp32 deltas", fmt_bytes(total_raw)),
        ("overall compression", fmt_ratio(total_raw / total_sent if total_sent else None)),
        ("client uploads", str(sum(r.accepted for r in uploads))),
    ]
    if private := [r for r in rows if r.epsilon is not None]:
        summary.append(("epsilon spent, at privacy.delta", f"{private[-1].epsilon:.4g}"))
    if exact := [r for r in rows if r.truncation_error is not None]:
        cut = exact[-1]
        summary.append(
            (
                "truncation error, last round",
                f"{cut.truncation_error:.3g} (largest layer {cut.truncation_error_max or 0:.3g})",
            )
        )
    per_round = _table(
        [
            "round",
            "train loss",
            "eval loss",
            "clients",
            "rejected",
            "bytes per client",
            "dense fp32 per client",
            "compression",
            "bytes received",
            "seconds",
        ],
        [
            [
                str(r.round),
                fmt_loss(r.train_loss),
                fmt_loss(r.eval_loss),
                str(r.accepted),
                str(r.rejected),
                fmt_bytes(r.bytes_per_client),
                fmt_bytes(r.raw_bytes_per_client),
                fmt_ratio(r.compression),
                fmt_bytes(r.bytes_received),
                fmt_seconds(r.seconds),
            ]
            for r in rows
        ],
    )
    rejections = [[str(r.round), x.client, x.reason] for r in rows for x in r.rejections]
    last_clients = next((r for r in reversed(rows) if r.contributions), None)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<p class="muted">Rendered from the rounds/&lt;r&gt;/metrics.json records in the run\'s '
        "storage. Bytes are what clients uploaded (encoded deltas); compression is dense fp32 "
        "delta bytes over uploaded bytes.</p>",
        "<h2>Summary</h2>",
        _table(["", "value"], summary),
        "<h2>Plots</h2>",
        '<div class="plots">',
        *(f'<img src="{name}" alt="{name.removesuffix(".png")} plot">' for name in PLOTS),
        "</div>",
        "<h2>Rounds</h2>",
        per_round,
    ]
    if rejections:
        parts += ["<h2>Rejected deltas</h2>", _table(["round", "client", "reason"], rejections)]
    if last_clients is not None:
        parts += [
            f"<h2>Clients of round {last_clients.round}</h2>",
            _table(
                [
                    "client",
                    "samples",
                    "weight",
                    "train loss",
                    "bytes",
                    "dense fp32 bytes",
                    "delta norm",
                ],
                [
                    [
                        c.client,
                        str(c.samples),
                        f"{c.weight:.4g}",
                        fmt_loss(c.train_loss),
                        fmt_bytes(c.encoded_bytes),
                        fmt_bytes(c.raw_bytes),
                        f"{c.norm:.4g}",
                    ]
                    for c in last_clients.contributions
                ],
            ),
        ]
    if last is None:
        parts.append("<p>No round has been aggregated yet.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def render(
    store: st.Store, run: str | None = None, through_round: int | None = None
) -> dict[str, bytes]:
    """The report's files (name -> bytes) for the rounds in storage up to `through_round`."""
    rows = read_records(store, through_round)
    name = run or next((r.run for r in rows if r.run), "") or store.uri
    return {
        HTML_FILE: render_html(name, rows).encode(),
        LOSS_PLOT: loss_plot(rows),
        BYTES_PLOT: bytes_plot(rows),
        COMPRESSION_PLOT: compression_plot(rows),
    }


def write(store: st.Store, run: str, through_round: int) -> str:
    """Render and commit report/ (manifest last); returns the URI of report.html."""
    files = render(store, run, through_round)
    st.commit(store, REPORT_PREFIX, files, {"kind": "report", "run": run, "round": through_round})
    return store.url(st.join(REPORT_PREFIX, HTML_FILE))


def save(files: Mapping[str, bytes], out: Path) -> list[Path]:
    """Write rendered files into a local directory; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in sorted(files.items()):
        (out / name).write_bytes(data)
        paths.append(out / name)
    return paths


def fetch(store: st.Store, out: Path, log: Callable[[str], None] = _stderr) -> list[Path]:
    """The run's committed report/ downloaded into `out` (each file verified against its
    manifest), or, when none is committed, one rendered here from the stored round records."""
    try:
        manifest = st.fetch_committed(store, REPORT_PREFIX, out)
    except st.ObjectNotFound:
        log(f"{store.url(REPORT_PREFIX)}: no committed report; rendering one")
        return save(render(store), out)
    return [out / name for name in sorted(manifest["files"])]
