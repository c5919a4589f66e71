"""The embedded base models: two tiny VLMs built from code, committed under models/.

Neither training nor evaluation imports this package; it is the factory that made (and
can remake) the committed weights, and the pipeline loads them like any local checkpoint.
Which model is which (`base_model.path` in config/config.yaml names them):

- `embedded` (the default): a tiny Mllama, the paper's architecture, in
  models/embedded-mllama; rule `distill_base_model`, `python -m medift.embedded distill`
  (`mllama.py`: distillation from the LLaVA, then a language stage);
- `embedded_llava`: a tiny LLaVA, the Mllama's teacher, in models/embedded-base; rule
  `pretrain_base_model`, `python -m medift.embedded recipe` (`llava.py`: its config,
  processor and model; `pretrain.py`: its pre-training curriculum).

Both read a closed word-level vocabulary (`tokenizer.py`) and learned to follow
instructions on the general-domain instruction set (`general.py`: drawn objects, no
medical image). `python -m medift.embedded evaluate` writes results/base_model.json, the
base model's accuracy on held-out general-domain questions (rule `evaluate_base_model`).
"""
