"""The end-to-end pipeline (``python -m engine pipeline CONFIG``): corpus to chat model, as a
list of stages that each run one engine command, skip when finished, and feed a report."""
