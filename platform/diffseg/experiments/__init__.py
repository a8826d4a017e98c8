"""The experiments on top of everything: the label-efficient protocol and comparisons, analysis, DatasetDDPM,
robustness, the factorized ablation and oracle masks, Tune sweeps and trials, the demo, and `launch` (what every
`jobs/*.py` does)."""
