"""What autopar knows about the hardware: ``profile`` (ClusterProfile JSON and presets, a core type),
``measure`` (``autopar profile``: timing a live cluster), ``calibrate`` (fitting the cost model to measured
probes and per-op tables) and ``predict`` (costing a hand-written Megatron-style plan with the solver's model).
"""
