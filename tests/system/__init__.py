"""Tests of realhf.system."""
