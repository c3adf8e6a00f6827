"""Summarise the service's JSON logs: traffic, errors, latency, tokens, cost, and what the cache saved.

    python -m llm_service.report service.log          # or: ... | python -m llm_service.report
    python -m llm_service.report --json service.log   # for machines

Reads the one summary line per request (logger llm_service.request) and skips everything else, including
lines that are not JSON; a prefix before the JSON object (as `heroku logs` adds) is ignored.
Percentiles are nearest-rank: p95 is the smallest latency that at least 95% of requests do not exceed.
Tokens count what the backend produced: a cache hit's tokens (the original answer's) are left out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, TextIO

SUMMARY_LOGGER = "llm_service.request"
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


def summary_lines(lines: Iterable[str]) -> Iterable[dict[str, Any]]:
    """Yield the request summaries among `lines`, probes excluded."""
    for line in lines:
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if (
            isinstance(record, dict)
            and record.get("logger") == SUMMARY_LOGGER
            and record.get("path") not in PROBE_PATHS
        ):
            yield record


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Return the nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(math.ceil(pct / 100 * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def _money(value: Decimal) -> float:
    return float(value)


def build_report(records: Iterable[dict[str, Any]], slowest: int = 5) -> dict[str, Any]:
    """Return the report's figures for the given summary records."""
    records = list(records)
    total = len(records)
    errors = Counter(r["error_code"] for r in records if r.get("error_code"))
    statuses = Counter(str(r.get("status")) for r in records)
    latencies = sorted(float(r["latency_ms"]) for r in records if r.get("latency_ms") is not None)
    produced = [r for r in records if r.get("cache") != "hit"]
    tokens = {kind: sum(int(r.get(f"tokens_{kind}") or 0) for r in produced) for kind in ("input", "output", "total")}
    cost_by_model: dict[str, Decimal] = defaultdict(Decimal)
    cost_by_client: dict[str, Decimal] = defaultdict(Decimal)
    for record in records:
        if record.get("cost_usd"):
            cost = Decimal(str(record["cost_usd"]))  # summed exactly, as the service priced it
            cost_by_model[record.get("model") or "unknown"] += cost
            cost_by_client[record.get("client") or "anonymous"] += cost
    cache = Counter(r["cache"] for r in records if r.get("cache"))
    saved_by_model: dict[str, Decimal] = defaultdict(Decimal)
    saved_by_client: dict[str, Decimal] = defaultdict(Decimal)
    for record in records:
        if record.get("cost_saved_usd"):
            saved = Decimal(str(record["cost_saved_usd"]))
            saved_by_model[record.get("model") or "unknown"] += saved
            saved_by_client[record.get("client") or "anonymous"] += saved
    looked_up = cache["hit"] + cache["miss"]
    ordered = sorted(records, key=lambda r: float(r.get("latency_ms") or 0), reverse=True)
    return {
        "requests": total,
        "status_codes": dict(sorted(statuses.items())),
        "errors": sum(errors.values()),
        "error_rate": round(sum(errors.values()) / total, 4) if total else 0.0,
        "errors_by_code": {
            code: {"count": count, "rate": round(count / total, 4)} for code, count in errors.most_common()
        },
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "max": latencies[-1] if latencies else None,
        },
        "tokens": tokens,
        "cost_usd": {
            "total": _money(sum(cost_by_model.values(), Decimal(0))),
            "by_model": {m: _money(c) for m, c in sorted(cost_by_model.items(), key=lambda kv: -kv[1])},
            "by_client": {c: _money(v) for c, v in sorted(cost_by_client.items(), key=lambda kv: -kv[1])},
        },
        "cache": {
            "hits": cache["hit"],
            "misses": cache["miss"],
            "bypassed": cache["bypass"],
            "hit_rate": round(cache["hit"] / looked_up, 4) if looked_up else 0.0,
            "saved_usd": _money(sum(saved_by_model.values(), Decimal(0))),
            "saved_by_model": {m: _money(c) for m, c in sorted(saved_by_model.items(), key=lambda kv: -kv[1])},
            "saved_by_client": {c: _money(v) for c, v in sorted(saved_by_client.items(), key=lambda kv: -kv[1])},
        },
        "slowest": [
            {key: r.get(key) for key in ("request_id", "latency_ms", "status", "path", "model", "client", "error_code")}
            for r in ordered[:slowest]
        ],
    }


def render_text(report: dict[str, Any]) -> str:
    """Return the report as text for people."""
    lines = [f"requests        {report['requests']}"]
    errors = report["errors"]
    lines.append(f"error rate      {report['error_rate']:.2%} ({errors} error{'' if errors == 1 else 's'})")
    for code, entry in report["errors_by_code"].items():
        lines.append(f"  {code:28} {entry['count']:>6}  {entry['rate']:.2%}")
    lat = report["latency_ms"]
    lines.append("latency ms      " + "  ".join(f"{k} {'-' if v is None else v}" for k, v in lat.items()))
    tok = report["tokens"]
    lines.append(f"tokens          input {tok['input']}  output {tok['output']}  total {tok['total']}")
    cost = report["cost_usd"]
    lines.append(f"cost USD        {cost['total']:.8f}")
    for title, key in (("  by model", "by_model"), ("  by client", "by_client")):
        if cost[key]:
            lines.append(title)
            lines.extend(f"    {name:26} {value:.8f}" for name, value in cost[key].items())
    cache = report["cache"]
    lines.append(
        f"cache           hits {cache['hits']}  misses {cache['misses']}  bypassed {cache['bypassed']}"
        f"  hit rate {cache['hit_rate']:.2%}"
    )
    lines.append(f"saved USD       {cache['saved_usd']:.8f}")
    for title, key in (("  by model", "saved_by_model"), ("  by client", "saved_by_client")):
        if cache[key]:
            lines.append(title)
            lines.extend(f"    {name:26} {value:.8f}" for name, value in cache[key].items())
    if report["slowest"]:
        lines.append("slowest")
        for r in report["slowest"]:
            lines.append(
                f"  {r['latency_ms']:>10} ms  {r['status']!s:>13}  {r['path']}  {r['model'] or '-'}  {r['request_id']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_service.report", description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", help="log file; standard input when absent or '-'")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.add_argument("--slowest", type=int, default=5, help="how many of the slowest requests to list")
    args = parser.parse_args(argv)
    if args.file and args.file != "-":
        try:
            with open(args.file, encoding="utf-8", errors="replace") as handle:
                report = build_report(summary_lines(handle), args.slowest)
        except OSError as error:
            hint = " (save one with `make run | tee service.log`)" if isinstance(error, FileNotFoundError) else ""
            sys.stderr.write(f"report: cannot read {args.file}: {error.strerror}{hint}\n")
            return 1
    else:
        report = build_report(summary_lines(stdin), args.slowest)
    stdout.write((json.dumps(report, indent=2) if args.json else render_text(report)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
