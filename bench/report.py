"""Adds the transport, fleet and footprint figures to a results folder's report.

`bench/compare.py` writes `report.md` with the backup/restore tables; this
script appends what `bench/run.sh` measured besides (`transport.json`,
`fleet.json`, `footprint.json`), checks those against the issue's targets,
prints the whole report and writes it back as `report.md`.

Usage: python3 bench/report.py RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MIB = 1024 * 1024
IDLE_RSS_TARGET = 20 * MIB


def load(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the part was not run."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    return json.loads(path.read_text())


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def transport_section(t: dict) -> list[str]:
    lines = ["## Raw transport (loopback)", ""]
    lines.append(f"{t['bytes'] / MIB:.0f} MiB per run.")
    lines.append("")
    lines.append("| path | MiB/s | seconds |")
    lines.append("|---|---|---|")
    for q in t["quic"]:
        lines.append(f"| QUIC, {q['streams']} stream(s) | {q['mib_per_s']:.0f} | {q['seconds']:.2f} |")
    tcp = t["tcp"]
    lines.append(f"| plain TCP | {tcp['mib_per_s']:.0f} | {tcp['seconds']:.2f} |")
    lines.append("")
    lines.append(f"Best QUIC / TCP: {t['quic_to_tcp']:.2f}×")
    return lines


def fleet_section(f: dict) -> list[str]:
    lines = ["## Fleet scale (simulated agents)", ""]
    lost, dup = f.get("lost"), f.get("duplicated")
    rows = [
        ("simulated agents", f.get("agents")),
        ("time until every agent had the task (s)", f.get("receive_max_s")),
        ("  p50 / p90 / p99 (s)", " / ".join(_num(f.get(k)) for k in ("receive_p50_s", "receive_p90_s", "receive_p99_s"))),
        ("CLI wall time until every result was in (s)", f.get("cli_seconds")),
        ("CLI exit code / succeeded summaries", f"{f.get('cli_exit_code')} / {f.get('cli_succeeded')}"),
        ("CLI peak RSS (MiB)", _mib(f.get("cli_peak_rss_bytes"))),
        ("lost tasks", lost),
        ("duplicated tasks", dup),
        ("redelivered messages", f.get("redelivered")),
        ("tasks at the wrong host / refused / failed acks", f"{f.get('unexpected')} / {f.get('rejected')} / {f.get('ack_errors')}"),
        ("heartbeats processed by serve per second (idle)", f.get("heartbeats_per_s_settle")),
        ("heartbeats processed by serve per second (dispatch)", f.get("heartbeats_per_s_dispatch")),
        ("serve CPU over the dispatch (%)", f.get("serve_cpu_percent_dispatch")),
        ("serve CPU while idle (%)", f.get("serve_cpu_percent_settle")),
        ("serve RSS / peak RSS (MiB)", f"{_mib(f.get('serve_rss_bytes'))} / {_mib(f.get('serve_peak_rss_bytes'))}"),
    ]
    lines.append("| figure | value |")
    lines.append("|---|---|")
    lines += [f"| {k} | {_num(v)} |" for k, v in rows]
    lines.append("")
    lines.append(
        "Target: zero lost and zero duplicated tasks (and no refused copy, failed ack or "
        f"failed command that could hide one): {verdict(bool(f.get('ok')))}"
    )
    return lines


def footprint_section(fp: dict) -> list[str]:
    rss = fp["agent_rss_bytes"]
    lines = ["## Agent footprint", ""]
    lines.append(
        f"Idle agent after {fp['idle_seconds']} s ({fp['profile']} build): "
        f"RSS {_mib(rss)} MiB (peak {_mib(fp['agent_peak_rss_bytes'])} MiB), "
        f"{fp['agent_threads']} threads."
    )
    sizes = ", ".join(f"{name} {_mib(size)} MiB" for name, size in fp["binary_bytes"].items())
    lines.append(f"Binaries: {sizes}.")
    lines.append("")
    lines.append(f"Target: idle agent ≤ 20 MiB RSS: {verdict(rss <= IDLE_RSS_TARGET)}")
    return lines


def _num(value: object) -> str:
    """Floats to three significant decimals; everything else as it is."""
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def main() -> int:
    results = Path(sys.argv[1])
    report = results / "report.md"
    base = report.read_text() if report.exists() else "# Flotilla benchmarks\n"
    marker = "\n<!-- run.sh -->\n"
    base = base.split(marker)[0]
    sections: list[str] = []
    for name, render in (
        ("transport.json", transport_section),
        ("fleet.json", fleet_section),
        ("footprint.json", footprint_section),
    ):
        data = load(results / name)
        if data is not None:
            sections += [""] + render(data)
    text = base.rstrip("\n") + "\n" + marker + "\n".join(sections) + "\n"
    report.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
