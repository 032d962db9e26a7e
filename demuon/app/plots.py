"""PNG plots of runs (matplotlib, headless Agg backend; layer 6).

Every plot reads the one schema of :mod:`demuon.results`: :func:`demuon.results.run_series` rows
for a run (simulate and launch alike) and per-peer ``metrics.jsonl`` rows. The conventions, alike
in every figure (``demuon report``, ``demuon simulate``, the benchmarks):

* a quantity measured on every peer is drawn as its mean over the peers with a min–max band (each
  peer's own line only thin and faint, where asked for);
* one colour per algorithm (:data:`ALGORITHM_COLOURS`, keyed by
  :data:`demuon.node.algorithms.NAMES`), whatever else is in the figure;
* units in the axis labels (MB, MB/s, s), integer round ticks, and a log axis, said in the label,
  where the values span more than a decade or so (:data:`LOG_RATIO`);
* events on the train-loss axes: ``|`` at the foot where messages went missing, ``v`` where a
  peer saw a neighbour down, and a grey span where fewer peers reported than at other rounds.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from demuon import results
from demuon.node.algorithms import NAMES

Rows = Sequence[Mapping[str, Any]]

#: The colour of each algorithm, the same in every plot.
ALGORITHM_COLOURS: dict[str, str] = {
    "demuon": "tab:blue",
    "dsgd": "tab:orange",
    "dsgd_clip": "tab:brown",
    "gt_dsgd": "tab:green",
    "gt_nsgdm": "tab:purple",
}
if set(ALGORITHM_COLOURS) != set(NAMES):  # a new algorithm needs its colour here
    raise ImportError(f"ALGORITHM_COLOURS {sorted(ALGORITHM_COLOURS)} != algorithms.NAMES {sorted(NAMES)}")
#: Colours of runs whose algorithm is not known, in turn (none is an algorithm's).
OTHER_COLOURS = ("tab:gray", "tab:olive", "tab:cyan", "tab:pink")
#: Events on the train-loss axes: row key → (marker, height in axes fraction, legend text).
EVENTS: dict[str, tuple[str, float, str]] = {
    "missing": ("|", 0.03, "messages missing"),
    "down": ("v", 0.08, "a neighbour down"),
}
#: The colour of the event markers in a figure of one run (several: each run's own colour).
EVENT_COLOUR = "tab:red"
#: A value axis is logarithmic when its largest positive value is this many times its smallest.
LOG_RATIO = 20.0
MB = 1e6


def colour_of(name: str, algorithm: str | None = None, index: int = 0) -> str:
    """The colour of run ``name``: its algorithm's (given, or ``name``'s first word, as in
    ``"dsgd"`` or ``"gt_dsgd (lr 0.1)"``), else the ``index``-th of :data:`OTHER_COLOURS`."""
    for candidate in (algorithm, re.split(r"[\s(/:,]", name.strip(), maxsplit=1)[0]):
        if candidate in ALGORITHM_COLOURS:
            return ALGORITHM_COLOURS[candidate]
    return OTHER_COLOURS[index % len(OTHER_COLOURS)]


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value == value else None


def _series(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = _num(r.get(key))
        if v is not None:
            xs.append(float(r["round"]))
            ys.append(v)
    return xs, ys


def _band(rows: Rows, key: str) -> tuple[list[float], list[float], list[float]]:
    """Rounds where ``key``, ``key_min`` and ``key_max`` are all numbers: (rounds, min, max)."""
    xs, lo, hi = [], [], []
    for r in rows:
        a, b = _num(r.get(f"{key}_min")), _num(r.get(f"{key}_max"))
        if a is not None and b is not None:
            xs.append(float(r["round"]))
            lo.append(a)
            hi.append(b)
    return xs, lo, hi


def wants_log(values: Sequence[float]) -> bool:
    """Whether ``values`` span enough (:data:`LOG_RATIO`) to be drawn on a log axis."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) >= LOG_RATIO * min(positive)


def _value_axis(
    ax: Axes, label: str, values: Sequence[float], log: bool | None = None, unit: str | None = None
) -> None:
    """The y axis: ``label (unit)``, log (``(unit, log)`` in the label) when ``log`` or, for None,
    :func:`wants_log`; a linear axis shows plain numbers (no offset, no 1e8 factor)."""
    if log is None:
        log = wants_log(values)
    notes = [unit] if unit else []
    if log and any(v > 0 for v in values):
        ax.set_yscale("log", nonpositive="mask")
        notes.append("log")
    else:
        fmt = ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        ax.yaxis.set_major_formatter(fmt)
    ax.set_ylabel(f"{label} ({', '.join(notes)})" if notes else label)


def _round_axis(ax: Axes) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _mean_and_band(
    ax: Axes,
    rows: Rows,
    key: str,
    colour: str,
    label: str,
    *,
    linestyle: str = "-",
    marker: str | None = None,
    band: bool = True,
    band_label: str | None = None,
) -> list[float]:
    """``key`` (a mean over peers) as a line and ``key_min``..``key_max`` as a band around it
    (in the legend as ``band_label``, if given); returns every value drawn."""
    xs, ys = _series(rows, key)
    if not xs:
        return []
    ax.plot(
        xs, ys, color=colour, label=label, linestyle=linestyle, marker=marker, markersize=3, linewidth=1.6
    )
    if not band:
        return ys
    bx, lo, hi = _band(rows, key)
    if len(bx) > 1:
        ax.fill_between(bx, lo, hi, color=colour, alpha=0.18, linewidth=0, label=band_label)
    elif len(bx) == 1 and lo[0] != hi[0]:  # one round: a bar instead of a band
        ax.vlines(bx, lo, hi, colors=colour, alpha=0.5)
    return ys + lo + hi


def _events(ax: Axes, rows: Rows, colour: str, labelled: set[str] | None = None) -> None:
    """Markers at the foot of ``ax`` (x in data, y in axes fraction) at the rounds where messages
    went missing or a neighbour was down (:data:`EVENTS`), and a grey span over the rounds where
    fewer peers reported than the most that ever did (``reporting``). Each kind is named in the
    legend once: ``labelled`` (shared by the runs of one axes) collects the kinds already named."""
    labelled = set() if labelled is None else labelled
    transform = ax.get_xaxis_transform()
    for key, (marker, height, text) in EVENTS.items():
        xs = [float(r["round"]) for r in rows if (_num(r.get(key)) or 0) > 0]
        if xs:
            ax.plot(
                xs,
                [height] * len(xs),
                transform=transform,
                linestyle="none",
                marker=marker,
                markersize=6 if marker == "|" else 4,
                color=colour,
                label=None if key in labelled else text,
                gid=f"event-{key}",
                zorder=4,
            )
            labelled.add(key)
    counts = [(int(r["round"]), int(r.get("reporting") or 0)) for r in rows if "reporting" in r]
    most = max((n for _, n in counts), default=0)
    short = [k for k, n in counts if n < most]
    for _, group in itertools.groupby(enumerate(short), key=lambda item: item[1] - item[0]):
        ks = [k for _, k in group]
        ax.axvspan(
            ks[0] - 0.5,
            ks[-1] + 0.5,
            color="0.5",
            alpha=0.12,
            linewidth=0,
            label=None if "silent" in labelled else "fewer peers reporting",
            gid="event-silent",
        )
        labelled.add("silent")


def _panel_key(rows: Rows) -> str:
    """A launch has no consensus error: show the mean local disagreement instead."""
    return "consensus_error" if _series(rows, "consensus_error")[0] else "local_disagreement"


def figure_runs(
    runs: Mapping[str, Rows], title: str, *, algorithms: Mapping[str, str] | None = None
) -> Figure:
    """Four panels, each run (``run_series`` rows, by name) in its algorithm's colour (by
    ``algorithms[name]``, else by name): train loss (mean over peers, min–max band, events),
    validation loss (the averaged model, and the peers' own models with their band), consensus
    error (simulator) or mean local disagreement (cluster), MB sent per round by all peers."""
    algorithms = algorithms or {}
    colours = {name: colour_of(name, algorithms.get(name), i) for i, name in enumerate(runs)}
    several = len(runs) > 1
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax_loss, ax_val, ax_cons, ax_bytes = axes.flat

    def named(name: str, text: str | None) -> str | None:
        """A legend entry: the run's name first when there are several (bands then unnamed)."""
        if not several:
            return text
        return None if text is None else f"{name}: {text}" if text else name

    drawn: list[float] = []
    labelled: set[str] = set()  # event kinds already in the legend
    for name, rows in runs.items():
        drawn += _mean_and_band(
            ax_loss,
            rows,
            "train_loss",
            colours[name],
            named(name, "") or "mean over peers",
            band_label=None if several else "min–max over peers",
        )
        _events(ax_loss, rows, colours[name] if several else EVENT_COLOUR, labelled)
    ax_loss.set_title("train loss (each peer on its own batch)", fontsize=10)
    _value_axis(ax_loss, "train loss, mean over peers", drawn)

    drawn = []
    for name, rows in runs.items():
        xs, ys = _series(rows, "val_loss")
        if xs:
            ax_val.plot(
                xs, ys, color=colours[name], marker="o", markersize=5, label=named(name, "averaged model")
            )
            if len(xs) <= 2:  # a launch measures the averaged model once, at the end: say its value
                for x, y in zip(xs, ys, strict=True):
                    ax_val.annotate(
                        f"{y:.4g}", (x, y), textcoords="offset points", xytext=(-6, 6), ha="right", fontsize=8
                    )
            drawn += ys
        drawn += _mean_and_band(
            ax_val,
            rows,
            "peer_val_loss",
            colours[name],
            named(name, "each peer's own model, mean") or "",
            linestyle="--",
            marker=".",
            band_label=None if several else "each peer's own model, min–max",
        )
    ax_val.set_title("validation loss (held-out data)", fontsize=10)
    _value_axis(ax_val, "validation loss", drawn)
    if not drawn:
        _empty(ax_val, "not measured in this run")

    drawn = []
    shown: set[str] = set()
    for name, rows in runs.items():
        key = _panel_key(rows)
        xs, ys = _series(rows, key)
        if xs:
            shown.add(key)
            ax_cons.plot(xs, ys, color=colours[name], label=named(name, None), linewidth=1.6)
            drawn += ys
    labels = {
        "consensus_error": "consensus error ‖X − X̄‖",
        "local_disagreement": "mean local disagreement ‖Y_i − X_i‖",
    }
    ax_cons.set_title(
        " / ".join(
            {
                "consensus_error": "consensus error (simulator)",
                "local_disagreement": "local disagreement (cluster)",
            }[k]
            for k in sorted(shown)
        )
        or "consensus",
        fontsize=10,
    )
    _value_axis(ax_cons, " / ".join(labels[k] for k in sorted(shown)) or "consensus", drawn)
    if not drawn:
        _empty(ax_cons, "not measured in this run")

    drawn = []
    for name, rows in runs.items():
        xs, ys = _series(rows, "bytes_out")
        if xs:
            mb = [y / MB for y in ys]
            ax_bytes.plot(xs, mb, color=colours[name], label=named(name, None), linewidth=1.6)
            drawn += mb
    ax_bytes.set_title("sent per round, all peers (wire headers included)", fontsize=10)
    _value_axis(ax_bytes, "sent per round", drawn, unit="MB")
    if drawn and not wants_log(drawn):
        ax_bytes.set_ylim(bottom=0, top=max(drawn) * 1.1 or 1.0)
    if not drawn:
        _empty(ax_bytes, "not measured in this run")

    rounds = [float(r["round"]) for rows in runs.values() for r in rows]
    for ax in axes.flat:
        _round_axis(ax)
        if rounds:  # every panel over the whole run, also one measured at a single round
            pad = max(0.5, 0.02 * (max(rounds) - min(rounds)))
            ax.set_xlim(min(rounds) - pad, max(rounds) + pad)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def plot_runs(
    runs: Mapping[str, Rows], path: Path, title: str, *, algorithms: Mapping[str, str] | None = None
) -> Path:
    """:func:`figure_runs` written to ``path``."""
    return save(figure_runs(runs, title, algorithms=algorithms), path)


def bytes_axis(rows: Rows) -> list[float | None]:
    """For each ``run_series`` row, the MB each peer has sent up to and including that round (the
    running sum of each round's ``bytes_out`` over the peers that reported it); None where no
    peer reported the round yet."""
    out: list[float | None] = []
    total = 0.0
    seen = False
    for r in rows:
        sent, reporting = _num(r.get("bytes_out")), _num(r.get("reporting"))
        if sent is not None and reporting:
            total += sent / reporting
            seen = True
        out.append(total / MB if seen else None)
    return out


def figure_loss_vs_bytes(
    runs: Mapping[str, Rows], title: str, *, algorithms: Mapping[str, str] | None = None
) -> Figure:
    """Loss against the bytes each peer has sent (as the daemon sends them: headers and keyframes
    included), each run (``run_series`` rows, by name) in its algorithm's colour: the train loss
    (mean over peers) and the validation loss (the averaged model where measured, else the mean of
    the peers' own models). Compressed runs are compared here at an equal byte budget."""
    algorithms = algorithms or {}
    colours = {name: colour_of(name, algorithms.get(name), i) for i, name in enumerate(runs)}
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.8))
    drawn_train: list[float] = []
    drawn_val: list[float] = []
    xs_all: list[float] = []
    for name, rows in runs.items():
        mb = bytes_axis(rows)
        for ax, keys, drawn, style in (
            (ax_train, ("train_loss",), drawn_train, {"linewidth": 1.6}),
            (ax_val, ("val_loss", "peer_val_loss"), drawn_val, {"marker": "o", "markersize": 4}),
        ):
            key = next((k for k in keys if any(_num(r.get(k)) is not None for r in rows)), None)
            if key is None:
                continue
            pts = [
                (x, y)
                for x, r in zip(mb, rows, strict=True)
                if x is not None and (y := _num(r.get(key))) is not None
            ]
            if pts:
                label = name if len(runs) > 1 else {"val_loss": "averaged model"}.get(key, "mean over peers")
                ax.plot([x for x, _ in pts], [y for _, y in pts], color=colours[name], label=label, **style)
                drawn += [y for _, y in pts]
                xs_all += [x for x, _ in pts]
    ax_train.set_title("train loss against bytes sent", fontsize=10)
    ax_val.set_title("validation loss against bytes sent", fontsize=10)
    _value_axis(ax_train, "train loss, mean over peers", drawn_train)
    _value_axis(ax_val, "validation loss", drawn_val)
    for ax, drawn in ((ax_train, drawn_train), (ax_val, drawn_val)):
        if not drawn:
            _empty(ax, "not measured in this run")
        ax.set_xlabel(
            "sent per peer so far (MB, wire headers and keyframes included)"
            + (", log" if wants_log(xs_all) else "")
        )
        if wants_log(xs_all):
            ax.set_xscale("log", nonpositive="mask")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def plot_loss_vs_bytes(
    runs: Mapping[str, Rows], path: Path, title: str, *, algorithms: Mapping[str, str] | None = None
) -> Path:
    """:func:`figure_loss_vs_bytes` written to ``path``."""
    return save(figure_loss_vs_bytes(runs, title, algorithms=algorithms), path)


def peer_band(
    per_peer: Mapping[int, Rows], key: str, *, cumulative: bool = False, scale: float = 1.0
) -> tuple[dict[int, tuple[list[float], list[float]]], list[dict[str, Any]]]:
    """``key`` of every peer (``/ scale``, optionally its running total) as ``{peer: (rounds,
    values)}``, and per round ``{"round", key, key_min, key_max}`` over the peers that have it."""
    lines: dict[int, tuple[list[float], list[float]]] = {}
    by_round: dict[int, list[float]] = {}
    for peer, rows in sorted(per_peer.items()):
        xs, ys = _series(rows, key)
        ys = [y / scale for y in ys]
        if cumulative:
            ys = list(itertools.accumulate(ys))
        if xs:
            lines[peer] = (xs, ys)
        for x, y in zip(xs, ys, strict=True):
            by_round.setdefault(int(x), []).append(y)
    band = [
        {"round": k, key: sum(v) / len(v), f"{key}_min": min(v), f"{key}_max": max(v)}
        for k, v in sorted(by_round.items())
    ]
    return lines, band


def _ratio(per_peer: Mapping[int, Rows], num: str, den: str, scale: float) -> dict[int, list[dict[str, Any]]]:
    """Rows with ``rate = row[num] / row[den] / scale`` (rows where both are numbers, den > 0)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for peer, rows in per_peer.items():
        out[peer] = [
            {"round": r["round"], "rate": a / b / scale}
            for r in rows
            if (a := _num(r.get(num))) is not None and (b := _num(r.get(den))) is not None and b > 0
        ]
    return out


def _peer_panel(
    ax: Axes,
    per_peer: Mapping[int, Rows],
    key: str,
    colour: str,
    *,
    ylabel: str,
    unit: str | None = None,
    log: bool | None = None,
    cumulative: bool = False,
    scale: float = 1.0,
    raw: bool = True,
) -> list[float]:
    """Mean over peers with the min–max band (and, with ``raw``, each peer thin and faint)."""
    lines, band = peer_band(per_peer, key, cumulative=cumulative, scale=scale)
    if raw and len(lines) > 1:
        for i, (xs, ys) in enumerate(lines.values()):
            ax.plot(xs, ys, color=colour, alpha=0.3, linewidth=0.5, label="each peer" if i == 0 else None)
    n = len(lines)
    drawn = _mean_and_band(
        ax,
        band,
        key,
        colour,
        f"mean over {n} peer{'s' * (n != 1)}",
        band_label="min–max over peers",
    )
    _value_axis(ax, ylabel, drawn, log, unit)
    return drawn


def figure_per_peer(
    per_peer: Mapping[int, Rows],
    key: str,
    *,
    title: str,
    ylabel: str,
    unit: str | None = None,
    log: bool | None = None,
    cumulative: bool = False,
    scale: float = 1.0,
    algorithm: str | None = None,
    raw: bool = True,
    events: bool = False,
) -> Figure:
    """``key`` of every peer against the round: the mean over peers with its min–max band in the
    algorithm's colour, each peer thin (``raw``); ``log`` None decides by :func:`wants_log`. With
    ``events``, the rounds where messages went missing or neighbours were down (and where fewer
    peers reported) are marked at the foot."""
    fig, ax = plt.subplots(figsize=(9, 5))
    colour = colour_of(algorithm or "", algorithm)
    drawn = _peer_panel(
        ax,
        per_peer,
        key,
        colour,
        ylabel=ylabel,
        unit=unit,
        log=log,
        cumulative=cumulative,
        scale=scale,
        raw=raw,
    )
    if not drawn:
        _empty(ax, f"no '{key}' in the metrics")
    if events:
        _events(ax, results.run_series(per_peer), EVENT_COLOUR)
    ax.set_title(title, fontsize=11)
    _round_axis(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def plot_per_peer(per_peer: Mapping[int, Rows], key: str, path: Path, **options: Any) -> Path:
    """:func:`figure_per_peer` written to ``path`` (the same keyword options)."""
    return save(figure_per_peer(per_peer, key, **options), path)


def figure_traffic(per_peer: Mapping[int, Rows], *, title: str, algorithm: str | None = None) -> Figure:
    """Two panels per peer (mean, min–max band, each peer thin): MB sent so far, and the send rate
    in MB/s (bytes sent in a round over the round's wall time)."""
    colour = colour_of(algorithm or "", algorithm)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    if not _peer_panel(
        left,
        per_peer,
        "bytes_out",
        colour,
        ylabel="sent so far",
        unit="MB",
        log=False,
        cumulative=True,
        scale=MB,
    ):
        _empty(left, "no 'bytes_out' in the metrics")
    left.set_title("sent per peer, cumulative (wire headers included)", fontsize=10)
    rates = _ratio(per_peer, "bytes_out", "t_round", MB)
    if not _peer_panel(right, rates, "rate", colour, ylabel="send rate", unit="MB/s"):
        _empty(right, "no 'bytes_out' / 't_round' in the metrics")
    right.set_title("send rate per peer (bytes of the round / its wall time)", fontsize=10)
    for ax in (left, right):
        _round_axis(ax)
        if ax.get_yscale() == "linear":
            ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def figure_timing(per_peer: Mapping[int, Rows], *, title: str, algorithm: str | None = None) -> Figure:
    """Seconds per round over the peers (mean, min–max band): the whole round, and within it the
    gradient (``t_compute``) and the waits for neighbours (``t_wait``)."""
    colour = colour_of(algorithm or "", algorithm)
    fig, ax = plt.subplots(figsize=(9, 5))
    drawn: list[float] = []
    for key, style, text in (
        ("t_round", "-", "whole round"),
        ("t_wait", "--", "waiting for neighbours"),
        ("t_compute", ":", "gradient"),
    ):
        _, rows = peer_band(per_peer, key)
        label = f"{text}, mean over peers"
        whole = key == "t_round"
        band_label = "whole round, min–max over peers" if whole else None
        drawn += _mean_and_band(
            ax, rows, key, colour, label, linestyle=style, band=whole, band_label=band_label
        )
    if not drawn:
        _empty(ax, "no timings in the metrics")
    _value_axis(ax, "time per round", drawn, unit="s")
    ax.set_title(title, fontsize=11)
    _round_axis(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders made as needed) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
