"""Tests of realhf.scheduler."""
