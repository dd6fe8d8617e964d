"""Evaluation: metric names and maths, intervals, calibration, external sets, Grad-CAM, TTA."""
