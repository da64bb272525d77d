"""What ``rxrt bench turns`` reports: the summary, the table, the plain-words findings and the plot.

Every system is compared with RxT turn by turn, and the findings state where RxT is behind as
plainly as where it is ahead (issue 16): a faster peer at turn 1, over the whole conversation or
in time to first token is named, with the turns it leads.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def series_keys(result: dict[str, Any]) -> list[str]:
    """The systems of ``result`` in run order (older results without ``series``: rxt, baseline)."""
    return list(result.get("series", {"rxt": "RxT", "baseline": "baseline"}))


def _label(result: dict[str, Any], key: str) -> str:
    return str(result.get("series", {}).get(key, key))


def short_label(key: str) -> str:
    """A column header: ``rxt_int8`` -> ``RxT int8``, ``llamacpp_q8_0_cached`` -> ``llama.cpp q8_0 cached``."""
    if key == "baseline":
        return "transformers"
    if key.startswith("rxt_"):
        return f"RxT {key.removeprefix('rxt_')}"
    if key.startswith("llamacpp_"):
        gguf_type, _, mode = key.removeprefix("llamacpp_").rpartition("_")
        return f"llama.cpp {gguf_type} {mode}"
    return key


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Totals, turn-1 and last-turn times and TTFT of every system, their ratios to RxT (``rxt``),
    and one comparison per (RxT series, other system) pair."""
    rxt = result["rxt"]
    systems: dict[str, Any] = {}
    for key in series_keys(result):
        recs = result[key]
        row = {
            "label": _label(result, key),
            "total_s": sum(r["turn_s"] for r in recs),
            "turn_1_s": recs[0]["turn_s"],
            "last_turn_s": recs[-1]["turn_s"],
            "ttft_1_s": recs[0]["ttft_s"],
            "ttft_last_s": recs[-1]["ttft_s"],
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs),
        }
        row["over_rxt"] = {
            "turn_1": row["turn_1_s"] / rxt[0]["turn_s"],
            "last_turn": row["last_turn_s"] / rxt[-1]["turn_s"],
            "total": row["total_s"] / sum(r["turn_s"] for r in rxt),
            "ttft_1": row["ttft_1_s"] / rxt[0]["ttft_s"],
            "ttft_last": row["ttft_last_s"] / rxt[-1]["ttft_s"],
        }
        systems[key] = row
    comparisons = [
        compare(result, mine, other)
        for mine in series_keys(result)
        if mine.startswith("rxt")
        for other in series_keys(result)
        if not other.startswith("rxt")
    ]
    base = systems["baseline"]
    return {
        # the first summary's keys, kept for the docs and older readers
        "turn": rxt[-1]["turn"],
        "turn_ratio": base["over_rxt"]["last_turn"],
        "ttft_ratio": base["over_rxt"]["ttft_last"],
        "rxt_total_s": systems["rxt"]["total_s"],
        "baseline_total_s": base["total_s"],
        "systems": systems,
        "comparisons": comparisons,
        "rxt_behind": [c["sentence"] for c in comparisons if c["rxt_behind"]],
    }


def compare(result: dict[str, Any], mine: str, other: str) -> dict[str, Any]:
    """One RxT series against one other system: the turns each leads, totals, TTFT, in a sentence."""
    a, b = result[mine], result[other]
    behind = [x["turn"] for x, y in zip(a, b) if y["turn_s"] < x["turn_s"]]
    ahead = [x["turn"] for x, y in zip(a, b) if y["turn_s"] >= x["turn_s"]]
    total_a, total_b = sum(r["turn_s"] for r in a), sum(r["turn_s"] for r in b)
    ttft_behind = [x["turn"] for x, y in zip(a, b) if y["ttft_s"] < x["ttft_s"]]
    name, peer, n = _label(result, mine), _label(result, other), len(a)
    parts = []
    if behind:
        parts.append(f"BEHIND at turns {turn_ranges(behind)} (turn {behind[0]}: {a[behind[0] - 1]['turn_s']:.3f} s")
        parts[-1] += f" vs {b[behind[0] - 1]['turn_s']:.3f} s)"
    if ahead:
        parts.append(f"ahead at turns {turn_ranges(ahead)}")
    whole = "behind" if total_b < total_a else "ahead"
    parts.append(f"{n} turns in {total_a:.2f} s vs {total_b:.2f} s ({whole.upper() if whole == 'behind' else whole})")
    first, last = a[0]["ttft_s"], a[-1]["ttft_s"]
    parts.append(
        f"TTFT {first * 1e3:.0f}/{last * 1e3:.0f} ms vs {b[0]['ttft_s'] * 1e3:.0f}/{b[-1]['ttft_s'] * 1e3:.0f} ms"
        f" at turns 1/{n}" + (f" (TTFT BEHIND at turns {turn_ranges(ttft_behind)})" if ttft_behind else "")
    )
    return {
        "rxt": mine,
        "other": other,
        "rxt_behind_turns": behind,
        "rxt_behind_total": total_b < total_a,
        "rxt_behind_ttft_turns": ttft_behind,
        "rxt_behind": bool(behind or ttft_behind or total_b < total_a),
        "sentence": f"{name} vs {peer}: " + "; ".join(parts),
    }


def turn_ranges(turns: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out: list[str] = []
    start = prev = None
    for t in [*turns, None]:
        if t is not None and prev is not None and t == prev + 1:
            prev = t
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = t
    return ", ".join(out)


def describe(result: dict[str, Any]) -> list[str]:
    """The summary in lines of text: per system, then every comparison, then memory."""
    s = result["summary"]
    n = s["turn"]
    lines = [weights_line(result)] if "weights" in result.get("config", {}) else []
    lines += [f"NOT MEASURED: {line}" for line in result.get("failures", {}).values()]
    for row in s["systems"].values():
        r = row["over_rxt"]
        lines.append(
            f"{row['label']}: {n} turns {row['total_s']:.2f} s ({r['total']:.2f}x RxT); turn 1 {row['turn_1_s']:.3f} s "
            f"({r['turn_1']:.2f}x), turn {n} {row['last_turn_s']:.3f} s ({r['last_turn']:.2f}x); TTFT "
            f"{row['ttft_1_s'] * 1e3:.0f} ms -> {row['ttft_last_s'] * 1e3:.0f} ms"
        )
    lines += [c["sentence"] for c in s["comparisons"]]
    memory = result.get("memory")
    if memory:
        kv = memory["llamacpp_kv_at_last_turn"]
        held = ", ".join(
            f"{_label(result, k)} {v['state_bytes'] / 2**20:.1f} MiB ({v['cached_tokens']} tokens)"
            for k, v in kv.items()
        )
        lines.append(
            f"memory per conversation: RxT STM {memory['rxt_stm_bytes'] / 2**20:.1f} MiB at every turn"
            + (f"; llama.cpp KV cache at turn {n}: {held}" if held else "")
        )
    return lines


def weights_line(result: dict[str, Any]) -> str:
    """Which weights and decode step each RxT series ran (``RxT weights: int8 (C step ...)``)."""
    cfg = result["config"]
    kernels = cfg.get("decode_kernels", {})
    keys = [k for k in series_keys(result) if k.startswith("rxt")]
    parts = [f"{fmt} ({kernels[key]})" if key in kernels else fmt for key, fmt in zip(keys, cfg["weights"])]
    requested = cfg.get("weights_requested", cfg["weights"])
    note = " (the engine's default for the device)" if "default" in requested else ""
    return f"RxT weights: {', '.join(parts)}{note}"


def format_table(result: dict[str, Any]) -> Any:
    """A rich Table: one row per turn, RxT's figures, then every other system's turn time and its
    ratio to RxT's (above 1: RxT is faster; ``cached``: llama.cpp's prompt cache kept, ``reread``:
    the history re-read)."""
    from rich.table import Table

    cfg = result["config"]
    table = Table(
        title=f"{cfg['turns']} turns, preset {cfg['preset']}, {cfg['device']} {cfg['dtype']}, "
        f"{cfg['threads']} threads (query {cfg['query_tokens']}, answer {cfg['answer_tokens']} tokens)",
        caption="\n".join(
            ([weights_line(result)] if "weights" in cfg else [])
            + [f"NOT MEASURED: {line}" for line in result.get("failures", {}).values()]
        )
        or None,
    )
    main = _label(result, "rxt")
    for name in ("turn", f"{main} TTFT s", f"{main} tok/s", f"{main} turn s", f"{main} memory update s"):
        table.add_column(name, justify="right")
    others = [k for k in series_keys(result) if k != "rxt"]
    for key in others:
        table.add_column(f"{short_label(key)} turn s (/ RxT)", justify="right")
    for i, r in enumerate(result["rxt"]):
        cells = [
            str(r["turn"]),
            f"{r['ttft_s']:.3f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['turn_s']:.3f}",
            f"{r['memory_update_s']:.3f}",
        ]
        for key in others:
            o = result[key][i]
            cells.append(f"{o['turn_s']:.3f} ({o['turn_s'] / r['turn_s']:.2f}x)")
        table.add_row(*cells)
    return table


def plot_turns(
    result: dict[str, Any], path: str | Path, extra: Sequence[tuple[str, list[dict[str, Any]]]] = ()
) -> None:
    """Turn time against turn number: every system of ``result`` (RxT also with its memory update
    as if run synchronously) and any ``extra`` (label, records) series such as RxLM's ``interact``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    turns = [r["turn"] for r in result["rxt"]]
    for key in series_keys(result):
        label = _label(result, key)
        if key.startswith("rxt"):
            label = f"{label} (rxruntime{', compiled decode' if cfg.get('compile') else ''})"
        style = "o-" if key.startswith("rxt") else ("^-" if "cached" in key else "s-")
        ax.plot(turns, [r["turn_s"] for r in result[key]], style, markersize=4, label=label)
    ax.plot(
        turns,
        [r["turn_s"] + r["memory_update_s"] for r in result["rxt"]],
        "--",
        label=f"{_label(result, 'rxt')} + memory update (if run synchronously)",
    )
    for label, records in extra:
        ax.plot([r["turn"] for r in records], [r["turn_s"] for r in records], "s-", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("turn")
    ax.set_ylabel("turn time (s), query in -> last token out")
    ax.set_title(
        f"{cfg['preset']}: {cfg['query_tokens']}-token queries, {cfg['answer_tokens']}-token answers\n"
        f"({cfg['sampling']}), {cfg['device']} {cfg['dtype']}, {cfg['threads']} threads",
        fontsize=9,
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
