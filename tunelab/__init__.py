"""tunelab: prompt tuning versus fine-tuning, measured on your own data."""

__version__ = "0.1.0"
