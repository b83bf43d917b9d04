"""Minimal torchvision stand-in for the reference worker of bench_evit_reference.py."""
