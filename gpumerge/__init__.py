"""gpumerge: fast, exact, streaming gradient merges of two language-model checkpoints."""
