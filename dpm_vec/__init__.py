"""dpm_vec: a dataframe-vectorised DPM rebalance simulation engine."""

import os
import sys

# Polars allocates through jemalloc and, on import, asks it to hand freed pages back to
# the OS within half a second. An engine pass frees and re-allocates large frames all the
# time and then pays for every page again in faults: a 100k-portfolio sweep took 55-57 s
# that way against 44-45 s keeping freed pages for a minute, for 0.6 GiB more peak RSS
# (benchmarks/README.md). Only effective before Polars is first imported in this process.
ENGINE_MALLOC_CONF = "dirty_decay_ms:60000,muzzy_decay_ms:60000"
# What `import polars` writes into os.environ when nothing is set: a parent process that
# imported Polars first hands it to every child it starts (a benchmark harness, a
# notebook), where it is Polars' default, not a choice someone made.
POLARS_MALLOC_CONF = "dirty_decay_ms:500,muzzy_decay_ms:1000"
if os.environ.get("_RJEM_MALLOC_CONF", POLARS_MALLOC_CONF) == POLARS_MALLOC_CONF:
    os.environ["_RJEM_MALLOC_CONF"] = ENGINE_MALLOC_CONF

# Polars 2 runs a lazy query's collect() on its streaming engine unless told otherwise,
# at 0.5-3 ms per call however small the frame; the in-memory engine takes 0.1-0.4 ms.
# Pandera collects a lazy plan for every check it runs, so a single JSON request's
# stage-boundary checks took 64-69 ms that way against 36-50 ms in memory (benchmarks/
# README.md). The engine's own frames are eager; the one lazy read that wants streaming
# asks for it by name. A POLARS_ENGINE_AFFINITY already set is left as it is.
if "POLARS_ENGINE_AFFINITY" not in os.environ:
    os.environ["POLARS_ENGINE_AFFINITY"] = "in-memory"
    if "polars" in sys.modules:  # imported before dpm_vec: it has read its settings already
        sys.modules["polars"].Config.set_engine_affinity("in-memory")

__version__ = "0.1.0"
