"""The stages a user runs (label, finetune/distill, tune, evaluate, export, report) and `kd-ray run`, the pipeline of them."""
