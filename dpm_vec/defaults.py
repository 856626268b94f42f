"""Operational defaults shared by the CLI and the library (no heavy imports here: the
CLI reads them while it builds its argument parser)."""

# portfolios per sweep shard: peak memory follows it (4-5 GiB at ~55 holdings per portfolio)
DEFAULT_SHARD_SIZE = 25_000
