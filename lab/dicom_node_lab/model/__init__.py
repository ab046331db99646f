"""Torch networks for training and export; the node itself never imports this package."""
