"""Pipeline stages: each a pure function of frames (see dpm_vec.pipeline for the order)."""
