"""dpm_vec: a dataframe-vectorised DPM rebalance simulation engine."""

import os

# Polars allocates through jemalloc, which by default hands freed pages back to the OS
# within seconds; an engine pass frees and re-allocates large frames all the time and
# then pays for it in page faults (about 10% of a sweep). Keeping freed pages for a
# minute costs a few percent of peak RSS. Only effective before Polars is first imported;
# an explicit setting in the environment wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:60000,muzzy_decay_ms:60000")

__version__ = "0.1.0"
