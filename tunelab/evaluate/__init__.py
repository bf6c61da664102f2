"""Prediction and metrics."""
