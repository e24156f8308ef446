"""kd-ray: knowledge distillation of text classifiers on Ray."""

__version__ = "0.1.0"
