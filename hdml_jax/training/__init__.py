"""The training run: the loop and its set-up (``train``), the step (``steps``), the optimizer
(``optim``), the phases (``phases``), checkpoints, progress reports and the final outputs.
"""
