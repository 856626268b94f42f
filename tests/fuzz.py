"""Long-run differential fuzzing: the properties of ``tests/test_differential.py`` fed
random bytes instead of their fixed examples, for as long as you give them.

    .venv/bin/python -m tests.fuzz --minutes 30
    .venv/bin/python -m tests.fuzz --minutes 5 --properties rfc,tax --seed 7 --out fuzz.jsonl

CI runs each property on the same derandomized examples every time; this draws new ones
until the time is up, each property in turn, and compares engine and oracle exactly as
the property does (its tolerances and documented limits included). Every failing example
goes to ``--out`` as one JSON line: the property, the example's number and seed, and the
property's own report, which holds each differing request whole, ready to be saved under
``tests/data/differential_failures/``. The same ``--seed`` draws the same examples. Exit
status 1 when any example failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from tests import test_differential

BUFFER_BYTES = 1 << 16  # enough for the largest list of requests a property draws


def properties(selection: str | None) -> dict[str, object]:
    """The Hypothesis properties of test_differential, by name; ``selection``: comma-separated
    parts of their names (``rfc,tax``), every one of them when None."""
    found = {name: test for name, test in vars(test_differential).items()
             if name.startswith("test_") and hasattr(test, "hypothesis")}
    if selection is None:
        return found
    parts = [part.strip() for part in selection.split(",") if part.strip()]
    chosen = {name: test for name, test in found.items() if any(part in name for part in parts)}
    if not chosen:
        raise SystemExit(f"--properties {selection!r} names none of: {', '.join(sorted(found))}")
    return chosen


def failures_in(counts: Counter) -> int:
    """The failing examples among ``fuzz``'s counts."""
    return sum(n for key, n in counts.items() if key.endswith(" failed"))


def fuzz(chosen: dict[str, object], seconds: float, seed: int, out: Path, report=print) -> Counter:
    """Run the ``chosen`` properties in turn on random buffers for ``seconds``; failures
    appended to ``out``. Returns counts per property: examples run, invalid draws, failures."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    names = sorted(chosen)
    deadline = time.monotonic() + seconds
    last_report = time.monotonic()
    with out.open("a") as failures:
        example = 0
        while time.monotonic() < deadline:
            name = names[example % len(names)]
            buffer = rng.randbytes(BUFFER_BYTES)
            example += 1
            try:
                valid = chosen[name].hypothesis.fuzz_one_input(buffer)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, whatever it is
                counts[f"{name} failed"] += 1
                message = str(exc) if isinstance(exc, AssertionError) else traceback.format_exc()
                failures.write(json.dumps({"property": name, "example": example, "seed": seed, "report": message}) + "\n")
                failures.flush()
            else:
                counts[f"{name} {'run' if valid is not None else 'invalid draw'}"] += 1
            if time.monotonic() - last_report > 60:
                last_report = time.monotonic()
                report(f"{example} examples, {failures_in(counts)} failed", flush=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default: 10)")
    parser.add_argument("--properties", help="comma-separated parts of property names (default: all)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random draws (default: a new one, printed)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures.jsonl"), help="failing examples, one JSON line each, appended")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be above 0, got {args.minutes}")
    logging.getLogger("dpm_vec").setLevel(logging.ERROR)  # the engine's notes on requests it sets aside, which the properties judge
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    chosen = properties(args.properties)
    print(f"fuzzing {len(chosen)} properties for {args.minutes:g} min, seed {seed}; failures to {args.out}", flush=True)
    counts = fuzz(chosen, args.minutes * 60, seed, args.out)
    for key in sorted(counts):
        print(f"{counts[key]:8d}  {key}")
    failed = failures_in(counts)
    print(f"{failed} failing example(s)" + (f": see {args.out}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
