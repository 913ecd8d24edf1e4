"""Research tools on top of training runs: sweeps, the scaling law, shape search, μP coordinate check, concept
analyses, plots, run metrics and the inference-FLOPs report."""
