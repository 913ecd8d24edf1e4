"""The DLCM network and the dense baseline: configuration, every mechanism along the data path, FLOPs counting.

Imports nothing from the training, inference, evaluation, research, data or callback layers.
"""
