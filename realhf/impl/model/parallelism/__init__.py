"""Model parallelism: tensor (and sequence) parallel building blocks."""
