"""The engine core stays light: importing it must not pull in the service or cluster stacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("fastapi", "duckdb", "dask", "uvicorn", "distributed")


def _heavy_modules_after(imports: str) -> list[str]:
    """The heavy top-level packages loaded in a fresh interpreter after ``imports``."""
    code = (
        "import json, sys\n"
        f"{imports}\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_engine_import_does_not_load_heavy_dependencies():
    loaded = _heavy_modules_after("import dpm_vec.pipeline, dpm_vec.simulate")
    assert loaded == [], f"engine import pulled in {loaded}"


def test_check_detects_a_heavy_import():
    """Guard against a vacuous test: the same probe, with the same filter, reports duckdb
    imported after the engine, and the HTTP door's stack."""
    assert _heavy_modules_after("import dpm_vec.pipeline, dpm_vec.simulate, duckdb") == ["duckdb"]
    assert _heavy_modules_after("import dpm_vec.api") != []  # the HTTP door is allowed its stack


def _probe(code: str, variable: str, value: str | None, show: str) -> str:
    """What ``show`` prints in a child process that ran ``code`` with environment
    ``variable`` set to ``value`` (unset when None)."""
    env = {k: v for k, v in os.environ.items() if k != variable}
    if value is not None:
        env[variable] = value
    proc = subprocess.run([sys.executable, "-c", f"{code}\nimport os, polars\nprint({show})\n"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _allocator_conf(code: str, env_conf: str | None) -> str:
    """_RJEM_MALLOC_CONF as a child process started after ``code`` would inherit it."""
    return _probe(code, "_RJEM_MALLOC_CONF", env_conf, "os.environ['_RJEM_MALLOC_CONF']")


def _effective(conf: str) -> dict[str, str]:
    """jemalloc reads the options left to right: the last setting of each one wins."""
    return dict(option.split(":", 1) for option in conf.split(","))


def test_engine_allocator_setting_survives_a_parent_that_imported_polars_first():
    """A harness or notebook that imports Polars before dpm_vec carries Polars' half-second
    decay in its environment; the sweeps it starts must still keep freed pages a minute."""
    from dpm_vec import ENGINE_MALLOC_CONF, POLARS_MALLOC_CONF

    for code in ("import polars, dpm_vec", "import dpm_vec, polars"):
        conf = _allocator_conf(code, None)
        assert _effective(conf) == _effective(ENGINE_MALLOC_CONF), (code, conf)
        # and the child that inherits it: Polars appends the inherited value to its own
        assert _effective(POLARS_MALLOC_CONF + "," + conf) == _effective(ENGINE_MALLOC_CONF)


def test_explicit_allocator_setting_is_kept():
    conf = _allocator_conf("import polars, dpm_vec", "dirty_decay_ms:0")
    assert _effective(conf)["dirty_decay_ms"] == "0"


def _engine_affinity(code: str, env_affinity: str | None) -> str:
    """The engine Polars' collect() picks by default in a process that ran ``code``."""
    return _probe(code, "POLARS_ENGINE_AFFINITY", env_affinity, "polars.Config.state(env_only=True).get('POLARS_ENGINE_AFFINITY')")


def test_lazy_plans_run_in_memory_whichever_is_imported_first():
    """Pandera collects one lazy plan per check; on Polars' streaming engine each costs
    milliseconds of fixed overhead, so dpm_vec makes in-memory the default engine."""
    assert _engine_affinity("import polars", None) != "in-memory"  # the probe can tell
    for code in ("import polars, dpm_vec", "import dpm_vec, polars"):
        assert _engine_affinity(code, None) == "in-memory", code


def test_explicit_engine_affinity_is_kept():
    assert _engine_affinity("import polars, dpm_vec", "streaming") == "streaming"
