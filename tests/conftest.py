"""Test session setup: make Hypothesis's examples a function of the code alone.

Hypothesis mixes constants found in the code under test into its draws, collected from
the non-test local modules loaded at the moment it draws. dpm_vec imports some modules
lazily, so a derandomized property drew different examples depending on which tests had
run before it in the same process (the tax-walk property alone and after tests/stages
diverged from its third batch on). Importing every dpm_vec module before any test runs
fixes that pool for the whole session, whatever the selection or order.
"""
from __future__ import annotations

import importlib
import pkgutil

import dpm_vec

for _module in pkgutil.walk_packages(dpm_vec.__path__, "dpm_vec."):
    importlib.import_module(_module.name)
