"""Backbones: the one place models and tokenizers are loaded."""

from tunelab.models.load import DEFAULT_MODEL, Backbone, fingerprint, load_backbone

__all__ = ["DEFAULT_MODEL", "Backbone", "fingerprint", "load_backbone"]
