"""Evaluation of trained checkpoints outside the trainer.

- :mod:`engine.evaluation.perplexity`: token-weighted perplexity over fixed windows of an
  indexed dataset's held-out split (or all of it).
- :mod:`engine.evaluation.generation_metrics`: n-gram repetition, EOS termination rate and
  mean length of generations.
- :mod:`engine.evaluation.report`: per-checkpoint results, ``--compare`` (forgetting), run
  sweeps, JSON and Markdown tables, the sweep plot.
- :mod:`engine.evaluation.merge`: linear and SLERP interpolation of two checkpoints.
"""
