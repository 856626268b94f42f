"""dpm_vec: a dataframe-vectorised DPM rebalance simulation engine."""

__version__ = "0.1.0"
