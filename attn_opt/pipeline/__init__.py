"""The pipeline layer: runs passes over a model through an IR step adapter, checks and calibrates."""
