"""medift: instruction-free tuning of vision-language models for medical VQA."""

__version__ = "0.1.0"
