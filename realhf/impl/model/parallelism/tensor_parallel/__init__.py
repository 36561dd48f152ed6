"""Tensor- and sequence-parallel layers, communication mappings and losses."""
