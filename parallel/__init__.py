"""Parallelism: process groups, layout checks, the CPU development backend."""
