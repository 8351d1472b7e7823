"""Data stages: download, the embedded demo corpus, frame extraction to HDF5, clip datasets.

Heavy modules are imported on use: `from svitt.data.datasets import VideoTextDataset`.
"""
