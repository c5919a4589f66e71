"""Tools for testing medift itself, not used by the pipeline.

`tiny_checkpoints`: tiny random checkpoints of each supported VLM family (the tests'
models, and bench/real_models.py's tokenizer and Mllama template);
`python -m medift.testing.tiny_checkpoints FAMILY OUT_DIR` writes one. It lives in the
package rather than under tests/ because the benchmarks and anyone adding a family use it.
"""
