"""Minimal torchvision.ops stand-in."""
