"""Command line: ``dpm-vec simulate | sweep | generate | import-requests | serve``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpm_vec.errors import DpmVecError


def _load_json(path: str):
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    data = json.loads(text)
    if isinstance(data, dict) and "inputs" in data and ("expected_output" in data or "expected_outputs" in data):
        return data["inputs"]  # a golden file: its request
    return data


def cmd_simulate(args) -> int:
    from dpm_vec.simulate import simulate_many

    requests, errors = [], {}
    for i, path in enumerate(args.requests):
        try:
            requests.append(_load_json(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            requests.append(None)
            errors[i] = {"type": "https://dpm-vec.dev/problems/unreadable-request", "title": "Unreadable request",
                         "status": 422, "detail": f"{path}: {exc}", "errors": [{"field": "$", "message": str(exc)}]}
    results = simulate_many([r for i, r in enumerate(requests) if i not in errors])
    it = iter(results)
    slots = [errors[i] if i in errors else next(it) for i in range(len(requests))]
    failed = any("errors" in s and s.get("status") == 422 for s in slots)
    out = slots[0] if len(slots) == 1 else slots
    json.dump(out, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpm-vec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="simulate reference-contract JSON requests; prints the result JSON")
    sim.add_argument("requests", nargs="+", help="request files (a golden file's inputs are used)")
    sim.set_defaults(func=cmd_simulate)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DpmVecError as exc:
        print(f"dpm-vec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
