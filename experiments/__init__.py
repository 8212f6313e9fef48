"""Research drivers built on the pipeline library: the Tab.-5 ablation and the bottleneck
experiment."""
