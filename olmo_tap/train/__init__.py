"""Training the jury: per-head LoRA on disjoint shards, the uncertainty head, data generators, experiments."""
