"""Datasets: reading EDM-format folders and zips (dataset), what dataset_tool.py converts and how
(dataset_sources, dataset_convert), a dataset held on the training device (device_data), and EDM's non-leaking
augmentation pipeline (augment).

May import: torch_utils, dnnlib.
"""
