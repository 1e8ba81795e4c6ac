"""Runs, sweeps, tracking and the command line (``python -m orchestrator``).

Ray and MLflow are imported lazily, inside the commands that need them, so that ``params`` and
``bench`` work where only torch, timm and torchvision are installed.
"""
