"""Model construction, the proxy instruction, and the embedded default base model."""
